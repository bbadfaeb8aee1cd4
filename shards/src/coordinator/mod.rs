//! The coordinator: one thread that owns the catalog and the SQL front end, and is the
//! only sender to the shards.
//!
//! It runs a glommio executor (unpinned: it must not steal a shard's core) with two
//! command loops: the bounded queue from callers (Python) and an unbounded internal queue
//! from running queries (their scans and `INSERT … SELECT` rows). The internal queue is
//! separate so a query can always make progress while callers have filled theirs.
//!
//! Its state and code come in parts with one job each:
//! * [`ddl`]: the catalog and the front end; statements applied to the shards;
//! * [`ingest`]: inserts and watermark calls in order into the shards, sources'
//!   watermarks and idleness, connector sources started;
//! * [`durable`]: the control log, checkpoints, and recovery at open;
//! * [`timers`]: automatic checkpoints and `EMIT EVERY` ticks;
//!
//! and this file: startup, the command loops, shutdown, and the links to the shards.
//! No part is on the data path: a shard never waits on the coordinator's state.

mod ddl;
mod durable;
mod ingest;
mod timers;

pub(crate) use ingest::stopped_error;
use timers::start_checkpoint_timer;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use glommio::channels::shared_channel::{self, ConnectedSender};
use glommio::{LocalExecutorBuilder, Placement};
use parking_lot::RwLock;

use laminardb_engine::catalog::Catalog;
use laminardb_engine::config::EngineConfig;
use laminardb_engine::frontend::{Frontend, ShardAccess};
use laminardb_engine::wal::RecoveryReport;
use laminardb_engine::{Error, ErrorCode, Result};

use crate::command::{reply_channel, AckToken, Command, PanicSite, Reply, ShardCommand};
use crate::runtime::Outputs;
use crate::shard::ShardWiring;
use crate::handle::{count_future_rows, prepare_insert, try_take, Prepared};
use crate::health::{catch, Health};
use crate::shard;
use crate::storage::{shard_owner, CheckpointStats, Storage, CONTROL_OWNER};
use crate::store::{start_spill_thread, RowStats, SpillPolicy};
use crate::wal::WalSpec;

pub(crate) type Published = Arc<RwLock<Arc<Catalog>>>;

pub(crate) struct Startup {
    pub config: EngineConfig,
    pub frontend: Box<dyn Frontend>,
    pub commands: flume::Receiver<Command>,
    pub internal: (flume::Sender<Command>, flume::Receiver<Command>),
    pub published: Published,
    pub outputs: Outputs,
    pub health: Arc<Health>,
    /// The checkpoints taken, for metrics.
    pub checkpoints: Arc<parking_lot::Mutex<CheckpointStats>>,
    /// Answered once running, with what recovery from the storage directory found.
    pub ready: flume::Sender<Result<RecoveryReport>>,
}

/// The coordinator thread's body. Returns once shut down and every shard has stopped.
pub(crate) fn run(startup: Startup) {
    let Startup { config, frontend, commands, internal, published, outputs, health, checkpoints, ready } = startup;
    // Locked before anything starts, released when this function returns.
    let (storage, recovered) = match Storage::open(&config).and_then(|mut s| {
        let recovered = s.as_mut().map(Storage::read).transpose()?;
        if let Some(manifest) = recovered.as_ref().and_then(|r| r.manifest.as_ref()) {
            if manifest.shards != config.shards {
                return Err(Error::new(
                    ErrorCode::ConnectionFailed,
                    format!("the checkpoint was taken with {} shards, not {}", manifest.shards, config.shards),
                ));
            }
        }
        Ok((s, recovered))
    }) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default();
    // Spill files are not part of durability (checkpoints and the WAL are): the directory
    // is emptied at open and removed at close. Without storage it is a temporary one,
    // locked while open; those of killed processes are removed here.
    crate::tempdirs::clean_orphans(&std::env::temp_dir());
    let (spill_dir, spill_temp) = match &storage {
        Some(s) => {
            let dir = s.root.join("spill");
            let _ = std::fs::remove_dir_all(&dir);
            (dir, None)
        }
        None => match crate::tempdirs::LockedDir::create(crate::tempdirs::SPILL_PREFIX) {
            Ok(temp) => (temp.path.clone(), Some(temp)),
            Err(e) => {
                let _ = ready.send(Err(Error::new(ErrorCode::ConnectionFailed, format!("cannot create a spill directory: {e}"))));
                return;
            }
        },
    };
    let (spill_thread, spill_jobs) = match start_spill_thread() {
        Ok(spill) => spill,
        Err(e) => {
            let _ = ready.send(Err(Error::new(ErrorCode::ConnectionFailed, format!("cannot start the spill thread: {e}"))));
            return;
        }
    };
    let spill_limit = (config.table_spill_threshold as u64).div_ceil(config.shards as u64).max(1);
    let mut senders = Vec::with_capacity(config.shards);
    let mut joins = Vec::with_capacity(config.shards);
    let (exchange_tx, exchange_rx): (Vec<_>, Vec<_>) = (0..config.shards).map(|_| flume::unbounded()).unzip();
    for (id, exchange_inbox) in exchange_rx.into_iter().enumerate() {
        let (tx, rx) = shared_channel::new_bounded(config.queue_capacity());
        let cpu = (config.pin_shards && !cores.is_empty()).then(|| cores[id % cores.len()]);
        let wal = storage.as_ref().map(|s| s.wal(&shard_owner(id)));
        let policy = SpillPolicy { dir: spill_dir.join(format!("shard-{id}")), limit: spill_limit };
        let spill = Some((policy, spill_jobs.clone()));
        let wiring = ShardWiring { inbox: rx, outputs: outputs.clone(), exchange: exchange_tx.clone(), exchange_inbox, wal, spill };
        match shard::spawn(id, cpu, cores.clone(), config.spin_us, wiring, health.clone()) {
            Ok(join) => {
                senders.push(tx);
                joins.push(join);
            }
            Err(e) => {
                let _ = ready.send(Err(Error::new(ErrorCode::ConnectionFailed, format!("cannot start shard {id}: {e}"))));
                return;
            }
        }
    }
    let executor = match LocalExecutorBuilder::new(Placement::Unbound)
        .name("laminar-coordinator")
        .io_memory(shard::SHARD_IO_MEMORY_BYTES)
        .make()
    {
        Ok(ex) => ex,
        Err(e) => {
            let _ = ready.send(Err(Error::new(ErrorCode::ConnectionFailed, format!("cannot start coordinator: {e}"))));
            return;
        }
    };
    let shards = config.shards;
    let spin_us = config.coord_spin_us;
    let control = storage.as_ref().map(|s| s.wal(CONTROL_OWNER));
    let root: Option<Arc<std::path::Path>> = storage.as_ref().map(|s| Arc::from(s.root.as_path()));
    let checkpoint_every = config.checkpoint_interval_ms;
    let max_event_ahead_ms = config.max_event_ahead_ms;
    let reopens = !config.ephemeral_storage;
    let (frontend, shutdown_reply) = executor.run(async move {
        let mut connected = Vec::with_capacity(senders.len());
        for tx in senders {
            connected.push(tx.connect().await);
        }
        let access: Arc<dyn ShardAccess> =
            Arc::new(CoordinatorAccess {
                internal: internal.0.clone(),
                published: published.clone(),
                shards,
                outputs: outputs.clone(),
                max_event_ahead_ms,
            });
        let next_lsn = recovered.as_ref().map_or(1, |r| r.next_lsn);
        let coord = Rc::new(Coordinator {
            shards: Rc::new(connected),
            outputs: outputs.clone(),
            access,
            ddl: ddl::Ddl::new(published, frontend),
            ingest: ingest::Ingest::new(config.idle_timeout_ms, max_event_ahead_ms),
            durable: durable::Durable::new(control.map(WalSpec::writer), root, reopens, next_lsn, checkpoints.clone()),
            timers: timers::Timers::default(),
            stopping: Cell::new(false),
        });
        let report = match recovered {
            Some(recovered) => coord.recover(recovered).await,
            None => Ok(RecoveryReport::default()),
        };
        let failed = report.is_err();
        let _ = ready.send(report);
        if failed {
            // The caller got the error and never sees this database: stop everything.
            coord.stopping.set(true);
            for tx in coord.shards.iter() {
                let _ = tx.send(ShardCommand::Stop).await;
            }
            let frontend = coord.ddl.frontend.borrow_mut().take();
            return (frontend, None);
        }
        if let Some(every) = checkpoint_every {
            start_checkpoint_timer(coord.clone(), every);
        }
        let internal_tx = internal.0;
        // Not detached: at shutdown this loop must finish (and drop its pending receive)
        // inside the executor, or its waker would keep the executor's resources alive.
        let internal_loop = glommio::spawn_local({
            let coord = coord.clone();
            let rx = internal.1;
            async move {
                while let Ok(cmd) = rx.recv_async().await {
                    if matches!(cmd, Command::Shutdown { .. }) {
                        break;
                    }
                    coord.handle(cmd).await;
                }
            }
        });
        let mut shutdown_reply = None;
        let spin = std::time::Duration::from_micros(spin_us);
        while let Ok(cmd) = next_command(&commands, spin).await {
            if let Command::Shutdown { reply, sent } = cmd {
                if let Some(sent) = sent {
                    // A short blocking wait, once, at shutdown (see `Handle::close`).
                    let _ = sent.recv_timeout(std::time::Duration::from_secs(1));
                }
                shutdown_reply = Some(reply);
                break;
            }
            coord.handle(cmd).await;
        }
        let (reply, _) = reply_channel();
        let _ = internal_tx.send(Command::Shutdown { reply, sent: None });
        internal_loop.await;
        coord.stopping.set(true);
        coord.drain().await;
        if coord.durable.root.is_some() {
            // Reopening then loads this checkpoint instead of replaying the whole WAL.
            if let Err(e) = coord.checkpoint().await {
                log::warn!("checkpoint at close failed: {e}");
            }
        }
        coord.finish_gc().await;
        coord.timers.cancel_all().await;
        for tx in coord.shards.iter() {
            let _ = tx.send(ShardCommand::Stop).await;
        }
        for output in coord.outputs.write().drain() {
            output.1.close();
        }
        if let Some(control) = coord.durable.control.lock().await.take() {
            control.close().await;
        }
        let frontend = coord.ddl.frontend.borrow_mut().take();
        (frontend, shutdown_reply)
    });
    if let Some(mut frontend) = frontend {
        frontend.shutdown();
    }
    for join in joins {
        if join.join().is_err() {
            health.thread_died("shard", "its thread panicked".into());
        }
    }
    // The shards held the other senders: the spill thread ends once its queue is empty.
    drop(spill_jobs);
    let _ = spill_thread.join();
    let _ = std::fs::remove_dir_all(&spill_dir);
    drop(spill_temp);
    if let Some(storage) = storage {
        let root = storage.root.clone();
        drop(storage);
        if config.ephemeral_storage {
            let _ = std::fs::remove_dir_all(root);
        }
    }
    if let Some(reply) = shutdown_reply {
        let _ = reply.send(Ok(()));
    }
}

/// The next caller command: polled for up to `spin` first (a wake-up from sleep costs
/// tens of microseconds), then awaited.
async fn next_command(commands: &flume::Receiver<Command>, spin: std::time::Duration) -> Result<Command, flume::RecvError> {
    match laminardb_engine::config::poll_for(spin, || try_take(commands)) {
        Some(result) => result,
        None => commands.recv_async().await,
    }
}

/// The coordinator's state, in parts that each have one job; their code is in the file
/// of the same name. Every part lives on this one thread (cells, no locks): the async
/// mutexes order the coordinator's own tasks (the command loops and timers), never a
/// shard.
struct Coordinator {
    /// The command queue of every shard: the coordinator is the only sender.
    shards: Rc<Vec<ConnectedSender<ShardCommand>>>,
    /// Every source's and stream's counters and subscriptions, shared with the shards and
    /// callers (a shard caches what it publishes to; it takes this map's lock only when
    /// a stream is added).
    outputs: Outputs,
    access: Arc<dyn ShardAccess>,
    /// The catalog and DDL: statements planned and applied, the history a checkpoint keeps.
    ddl: ddl::Ddl,
    /// Ingest sequencing and watermarks: what enters the shards, in what order; sources'
    /// watermarks and idleness; connector sources started.
    ingest: ingest::Ingest,
    /// Checkpoints and recovery: the control log, lsns, checkpoints and their file
    /// collection, the replay at open.
    durable: durable::Durable,
    /// Timers: automatic checkpoints, `EMIT EVERY` ticks.
    timers: timers::Timers,
    /// The database is closing: timers end, nothing new starts.
    stopping: Cell<bool>,
}

impl Coordinator {
    async fn handle(&self, cmd: Command) {
        match cmd {
            Command::Execute { sql, params, reply } => {
                let _ = reply.send(self.execute(&sql, &params).await);
            }
            Command::Request { request, reply } => {
                let _ = reply.send(self.request(&request).await);
            }
            Command::Insert { reply, .. } if self.ingest.stopped.get() => {
                let _ = reply.send(Err(stopped_error()));
            }
            Command::Watermark { reply, .. } if self.ingest.stopped.get() => {
                let _ = reply.send(Err(stopped_error()));
            }
            Command::Insert { source, parts, max_event_ms, born, reply } => {
                self.insert(&source, parts, max_event_ms, Some(born), reply).await;
            }
            Command::Scan { source, shard, reply } => {
                let Some(tx) = self.shards.get(shard) else {
                    let _ = reply.send(Err(Error::internal(format!("no shard {shard}"))));
                    return;
                };
                let _ = tx.send(ShardCommand::Scan { source: source.into(), reply }).await;
            }
            Command::Stats { source, reply } => {
                let _ = reply.send(self.stats(&source).await);
            }
            Command::Watermark { source, mark, reply } => self.watermark_call(&source, mark, reply).await,
            Command::InjectPanic { site, reply } => match site {
                PanicSite::Coordinator => {
                    let _ = reply.send(catch("coordinator", || panic!("injected panic (test hook)")));
                }
                PanicSite::Shard => {
                    let _ = self.shards[0].send(ShardCommand::InjectPanic { reply }).await;
                }
            },
            Command::Drain { reply, stop } => {
                self.drain().await;
                if stop {
                    self.ingest.stopped.set(true);
                    self.ingest.running.set(false);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Checkpoint { reply } => {
                let _ = reply.send(self.checkpoint().await);
            }
            Command::Start { reply } if self.ingest.stopped.get() => {
                let _ = reply.send(Err(stopped_error()));
            }
            Command::Start { reply } => {
                self.ingest.running.set(true);
                let names: Vec<String> = self.ingest.connected.borrow().keys().cloned().collect();
                let mut result = Ok(());
                for name in names {
                    result = result.and(self.start_source(&name).await);
                }
                let _ = reply.send(result);
            }
            Command::Shutdown { reply, .. } => {
                let _ = reply.send(Err(Error::internal("shutdown arrived on the internal queue")));
            }
        }
    }

    async fn stats(&self, source: &str) -> Result<Vec<RowStats>> {
        let name: Arc<str> = self.ddl.catalog.borrow().source(source)?.name.as_str().into();
        answers(self.ask_shards(|_, reply| ShardCommand::Stats { source: name.clone(), reply }).await?).await
    }

    /// Sends every shard the command `make` builds; an error once a shard has stopped.
    async fn send_shards(&self, make: impl Fn() -> ShardCommand) -> Result<()> {
        for tx in self.shards.iter() {
            tx.send(make()).await.map_err(|_| Error::internal("a shard has stopped"))?;
        }
        Ok(())
    }

    /// Sends every shard the command `make` builds, as part of the work `ack` tracks (a
    /// stopped shard fails it); nothing is answered but the ack.
    async fn tell_shards(&self, ack: &AckToken, make: impl Fn() -> ShardCommand) {
        for tx in self.shards.iter() {
            if tx.send(make()).await.is_err() {
                ack.fail(Error::internal("a shard has stopped"));
            }
        }
    }

    /// Sends every shard the command `make(shard, reply)` builds; the answers arrive on
    /// the returned receivers, in shard order.
    async fn ask_shards<T>(&self, mut make: impl FnMut(usize, Reply<T>) -> ShardCommand) -> Result<Vec<flume::Receiver<Result<T>>>> {
        let mut waits = Vec::with_capacity(self.shards.len());
        for (shard, tx) in self.shards.iter().enumerate() {
            let (reply, rx) = reply_channel();
            tx.send(make(shard, reply)).await.map_err(|_| Error::internal("a shard has stopped"))?;
            waits.push(rx);
        }
        Ok(waits)
    }
}

/// Every shard's answer, each awaited even after one failed (so no shard is still at the
/// work when the caller goes on); the first failure, if any.
pub(super) async fn answers<T>(waits: Vec<flume::Receiver<Result<T>>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(waits.len());
    let mut failure = None;
    for rx in waits {
        match rx.recv_async().await.map_err(|_| Error::internal("a shard has stopped")).and_then(|r| r) {
            Ok(answer) => out.push(answer),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    failure.map_or(Ok(out), Err)
}

/// The front end's window onto the shards, used from its query threads.
struct CoordinatorAccess {
    internal: flume::Sender<Command>,
    published: Published,
    shards: usize,
    outputs: Outputs,
    max_event_ahead_ms: Option<u64>,
}

impl ShardAccess for CoordinatorAccess {
    fn shards(&self) -> usize {
        self.shards
    }

    fn scan(&self, source: &str, shard: usize) -> Result<flume::Receiver<Result<Vec<RecordBatch>>>> {
        let (reply, rx) = reply_channel();
        self.internal
            .send(Command::Scan { source: source.to_string(), shard, reply })
            .map_err(|_| Error::shutdown())?;
        Ok(rx)
    }

    fn insert(&self, source: &str, batch: RecordBatch) -> Result<flume::Receiver<Result<u64>>> {
        let catalog = self.published.read().clone();
        let def = catalog.source(source)?;
        let Prepared { parts, max_event_ms, future_rows } = prepare_insert(def, &[batch], self.shards, self.max_event_ahead_ms)?;
        count_future_rows(&self.outputs, &def.name, future_rows, self.max_event_ahead_ms);
        let (reply, rx) = reply_channel();
        self.internal
            .send(Command::Insert { source: def.name.clone(), parts, max_event_ms, born: Instant::now(), reply })
            .map_err(|_| Error::shutdown())?;
        Ok(rx)
    }
}
