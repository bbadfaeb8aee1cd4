//! The coordinator's timers: automatic checkpoints and `EMIT EVERY` ticks, as tasks on its
//! executor, cancelled at close.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use super::Coordinator;
use crate::command::ShardCommand;

/// Timer tasks (automatic checkpoints, `EMIT EVERY` ticks), cancelled at shutdown: a
/// task still sleeping when the executor ends would pin its resources.
#[derive(Default)]
pub(super) struct Timers {
    pub(super) tasks: RefCell<Vec<glommio::Task<()>>>,
}

impl Timers {
    /// Cancels every timer task (the database closes).
    pub(super) async fn cancel_all(&self) {
        let tasks = self.tasks.take();
        for task in tasks {
            task.cancel().await;
        }
    }
}

/// Takes a checkpoint every `every_ms` until the database closes.
pub(super) fn start_checkpoint_timer(coord: Rc<Coordinator>, every_ms: u64) {
    coord.clone().start_timer(async move {
        loop {
            glommio::timer::sleep(std::time::Duration::from_millis(every_ms.max(1))).await;
            if coord.stopping.get() {
                return;
            }
            if let Err(e) = coord.checkpoint().await {
                log::warn!("automatic checkpoint failed: {e}");
            }
        }
    });
}

impl Coordinator {
    /// Sends `EMIT EVERY` ticks to every shard until the stream is gone.
    pub(super) fn start_ticker(&self, name: &str, every_ms: i64) {
        let (published, shards) = (self.ddl.published.clone(), self.shards.clone());
        let name: Arc<str> = name.into();
        let version = published.read().stream(&name).map(|s| Arc::as_ptr(s) as usize).unwrap_or(0);
        self.start_timer(async move {
            loop {
                glommio::timer::sleep(std::time::Duration::from_millis(every_ms as u64)).await;
                // Stop once the stream was dropped (or replaced by another of that name).
                let current = published.read().stream(&name).map(|s| Arc::as_ptr(s) as usize).unwrap_or(0);
                if current != version {
                    return;
                }
                for tx in shards.iter() {
                    if tx.send(ShardCommand::Tick { stream: name.clone() }).await.is_err() {
                        return;
                    }
                }
            }
        });
    }

    /// Runs `timer` on this executor until it returns or the database closes.
    pub(super) fn start_timer(&self, timer: impl std::future::Future<Output = ()> + 'static) {
        self.timers.tasks.borrow_mut().push(glommio::spawn_local(timer));
    }
}
