//! One shard reactor: a glommio executor pinned to a core, owning its [`ShardRuntime`]:
//! one task for commands from the coordinator, one for messages from the other shards.

use std::sync::Arc;

use glommio::channels::shared_channel::SharedReceiver;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use std::cell::RefCell;
use std::rc::Rc;

use crate::command::{Exchange, ShardCommand};
use crate::health::{catch, Health};
use crate::runtime::{Outputs, ShardRuntime};

/// io_uring registered-buffer memory per shard; the hard memlock limit here is 8 MiB for
/// every executor of the process, so stay small until the WAL needs more.
pub(crate) const SHARD_IO_MEMORY_BYTES: usize = 512 << 10;

pub(crate) struct ShardWiring {
    pub inbox: SharedReceiver<ShardCommand>,
    pub outputs: Outputs,
    /// Every shard's exchange inbox (this one's included), and this shard's own.
    pub exchange: Vec<flume::Sender<Exchange>>,
    pub exchange_inbox: flume::Receiver<Exchange>,
}

pub(crate) fn spawn(
    id: usize,
    cpu: Option<usize>,
    spin_us: u64,
    wiring: ShardWiring,
    health: Arc<Health>,
) -> glommio::Result<ExecutorJoinHandle<()>, ()> {
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let mut builder = LocalExecutorBuilder::new(placement).name(&format!("laminar-shard-{id}")).io_memory(SHARD_IO_MEMORY_BYTES);
    if spin_us > 0 {
        // glommio spins only on pinned executors.
        builder = builder.spin_before_park(std::time::Duration::from_micros(spin_us));
    }
    builder
        .spawn(move || async move {
            let name = format!("shard {id}");
            if let Err(why) = run(id, wiring).await {
                health.thread_died(&name, why);
            }
        })
}

async fn run(id: usize, wiring: ShardWiring) -> Result<(), String> {
    let ShardWiring { inbox, outputs, exchange, exchange_inbox } = wiring;
    let inbox = inbox.connect().await;
    let own_exchange = exchange[id].clone();
    let runtime = Rc::new(RefCell::new(ShardRuntime::new(id, outputs, exchange)));
    let place = format!("shard {id}");
    // Not detached: it must finish inside this executor at shutdown.
    let peers = glommio::spawn_local({
        let runtime = runtime.clone();
        let place = place.clone();
        async move {
            while let Ok(msg) = exchange_inbox.recv_async().await {
                if matches!(msg, Exchange::Stop) {
                    break;
                }
                let _ = catch(&place, || {
                    runtime.borrow_mut().on_exchange(msg);
                    Ok(())
                });
            }
        }
    });
    let result = loop {
        let Some(cmd) = inbox.recv().await else {
            break Err("coordinator channel closed without Stop".to_string());
        };
        let mut rt = runtime.borrow_mut();
        match cmd {
            ShardCommand::Append { source, batches, watermark, ack } => {
                if let Err(e) = catch(&place, || {
                    rt.append(&source, batches, &ack)?;
                    if let Some(mark) = watermark {
                        rt.watermark(&source, mark, &ack);
                    }
                    Ok(())
                }) {
                    ack.fail(e);
                }
            }
            ShardCommand::Watermark { source, watermark, ack } => {
                if let Err(e) = catch(&place, || {
                    rt.watermark(&source, watermark, &ack);
                    Ok(())
                }) {
                    ack.fail(e);
                }
            }
            ShardCommand::AddStream { plan, output, marks } => {
                if let Err(e) = catch(&place, || rt.add_stream(plan, output.clone(), &marks)) {
                    output.record_error(&e.to_string());
                }
            }
            ShardCommand::DropStream { name } => rt.drop_stream(&name),
            ShardCommand::Tick { stream } => {
                let _ = catch(&place, || {
                    rt.tick(&stream);
                    Ok(())
                });
            }
            ShardCommand::Scan { source, reply } => {
                let _ = reply.send(catch(&place, || rt.scan(&source)));
            }
            ShardCommand::Stats { source, reply } => {
                let _ = reply.send(Ok(rt.store().rows(&source)));
            }
            ShardCommand::DropSource { source } => rt.drop_source(&source),
            ShardCommand::InjectPanic { reply } => {
                let _ = reply.send(catch(&place, || panic!("injected panic (test hook)")));
            }
            ShardCommand::Stop => break Ok(()),
        }
    };
    let _ = own_exchange.send(Exchange::Stop);
    peers.await;
    result
}
