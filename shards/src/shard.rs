//! One shard reactor: a glommio executor pinned to a core, owning its [`LocalStore`].

use std::sync::Arc;

use glommio::channels::shared_channel::SharedReceiver;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::command::ShardCommand;
use crate::health::{catch, Health};
use crate::store::LocalStore;

/// io_uring registered-buffer memory per shard; the hard memlock limit here is 8 MiB for
/// every executor of the process, so stay small until the WAL needs more.
pub(crate) const SHARD_IO_MEMORY_BYTES: usize = 512 << 10;

pub(crate) fn spawn(
    id: usize,
    cpu: Option<usize>,
    inbox: SharedReceiver<ShardCommand>,
    health: Arc<Health>,
) -> glommio::Result<ExecutorJoinHandle<()>, ()> {
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    LocalExecutorBuilder::new(placement)
        .name(&format!("laminar-shard-{id}"))
        .io_memory(SHARD_IO_MEMORY_BYTES)
        .spawn(move || async move {
            let name = format!("shard {id}");
            if let Err(why) = run(id, inbox).await {
                health.thread_died(&name, why);
            }
        })
}

async fn run(id: usize, inbox: SharedReceiver<ShardCommand>) -> Result<(), String> {
    let inbox = inbox.connect().await;
    let mut store = LocalStore::default();
    let place = format!("shard {id}");
    while let Some(cmd) = inbox.recv().await {
        match cmd {
            ShardCommand::Append { source, batches, ack } => {
                ack.done(catch(&place, || {
                    batches.into_iter().try_fold(0, |n, b| Ok(n + store.append(&source, b)?))
                }));
            }
            ShardCommand::Scan { source, reply } => {
                let _ = reply.send(catch(&place, || Ok(store.scan(&source))));
            }
            ShardCommand::Stats { source, reply } => {
                let _ = reply.send(Ok(store.rows(&source)));
            }
            ShardCommand::DropSource { source } => store.drop_source(&source),
            ShardCommand::InjectPanic { reply } => {
                let _ = reply.send(catch(&place, || panic!("injected panic (test hook)")));
            }
            ShardCommand::Stop => return Ok(()),
        }
    }
    Err("coordinator channel closed without Stop".into())
}
