//! The coordinator: one thread that owns the catalog and the SQL front end, and is the
//! only sender to the shards.
//!
//! It runs a glommio executor (unpinned: it must not steal a shard's core) with two
//! command loops: the bounded queue from callers (Python) and an unbounded internal queue
//! from running queries (their scans and `INSERT … SELECT` rows). The internal queue is
//! separate so a query can always make progress while callers have filled theirs.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use datafusion::common::ScalarValue;
use glommio::channels::shared_channel::{self, ConnectedSender};
use glommio::{LocalExecutorBuilder, Placement};
use parking_lot::RwLock;

use laminardb_engine::catalog::{Catalog, SourceKind};
use laminardb_engine::config::EngineConfig;
use laminardb_engine::dataflow::{Dag, Port, Route, Upstream, Watermark};
use laminardb_engine::frontend::{Frontend, ObjectKind, QueryKind, Request, ShardAccess, Statement};
use laminardb_engine::sink::SinkPlan;
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::stream::output::Output;
use laminardb_engine::catalog::TRANSIENT_PREFIX;
use laminardb_engine::checkpoint::{self, Manifest};
use laminardb_engine::wal::{self, Record, RecoveryReport};
use laminardb_engine::{Error, ErrorCode, Result};

use crate::command::{reply_channel, Ack, AckToken, Command, PanicSite, Reply, ShardCommand};
use crate::runtime::Outputs;
use crate::shard::ShardWiring;
use crate::handle::{count_future_rows, prepare_insert, try_take, Outcome, Prepared};
use crate::health::{catch, Health};
use crate::shard;
use crate::storage::{shard_owner, CheckpointStats, Storage, CONTROL_OWNER};
use laminardb_engine::checkpoint::collect_garbage;
use laminardb_engine::recovery::Recovered;
use laminardb_engine::wal::Frontier;
use crate::store::{start_spill_thread, RetainPolicy, RowStats, SpillPolicy};
use crate::wal::{WalSpec, WalWriter};

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

/// What the shards keep of `def`'s rows (`None`: everything).
fn retain_policy(def: &laminardb_engine::catalog::SourceDef) -> Result<Option<RetainPolicy>> {
    let retention = def.retention()?;
    if !retention.is_some() {
        return Ok(None);
    }
    let time = match (retention.time_ms, &def.watermark) {
        (None, _) => None,
        (Some(span), Some(w)) => Some((def.schema.index_of(&w.column).map_err(|_| Error::invalid_schema(format!("watermark column '{}' is not a column", w.column)))?, span)),
        (Some(_), None) => {
            return Err(Error::invalid_schema(format!("retention by time needs a watermark on '{}'", def.name)))
        }
    };
    Ok(Some(RetainPolicy { time, rows: retention.rows }))
}

/// What a DDL statement does to the checkpoint's DDL history (`Coordinator::ddl_history`).
#[derive(Debug, PartialEq, Eq)]
enum DdlChange {
    /// Creates (or replaces) its object.
    Create,
    /// `CREATE … IF NOT EXISTS` of an object that exists: changes nothing.
    Nothing,
    Drop,
}

impl DdlChange {
    /// Decided before the statement runs (whether its object exists already).
    fn of(statement: &Statement, catalog: &Catalog) -> DdlChange {
        let (name, if_not_exists) = match statement {
            Statement::CreateSource { def, if_not_exists, .. } => (&def.name, *if_not_exists),
            Statement::CreateStream { def, if_not_exists, .. } => (&def.name, *if_not_exists),
            Statement::CreateSink { def, if_not_exists, .. } => (&def.name, *if_not_exists),
            Statement::Drop { .. } => return DdlChange::Drop,
            Statement::Query(_) => return DdlChange::Nothing,
        };
        if if_not_exists && catalog.contains(name) {
            DdlChange::Nothing
        } else {
            DdlChange::Create
        }
    }

    /// Applies the statement `sql`, which succeeded on `object`, to `history`.
    fn record(&self, history: &mut Vec<(String, String)>, object: &str, sql: &str) {
        match self {
            DdlChange::Nothing => {}
            DdlChange::Drop => history.retain(|(name, _)| name != object),
            DdlChange::Create => {
                history.retain(|(name, _)| name != object);
                history.push((object.to_string(), sql.to_string()));
            }
        }
    }
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
        let initial = published.read().clone();
        let coord = Rc::new(Coordinator {
            shards: Rc::new(connected),
            catalog: RefCell::new(initial),
            published,
            frontend: RefCell::new(Some(frontend)),
            access,
            watermarks: RefCell::new(HashMap::new()),
            outputs: outputs.clone(),
            inflight: Arc::new(AtomicUsize::new(0)),
            running: Cell::new(false),
            stopped: Cell::new(false),
            connected: RefCell::new(HashMap::new()),
            idle: RefCell::new(HashSet::new()),
            flows: RefCell::default(),
            idle_timeout: std::time::Duration::from_millis(config.idle_timeout_ms),
            max_event_ahead_ms,
            next_idle_check: Cell::new(Instant::now()),
            logging: Cell::new(control.is_some()),
            control: futures::lock::Mutex::new(control.map(WalSpec::writer)),
            next_lsn: Cell::new(recovered.as_ref().map_or(1, |r| r.next_lsn)),
            frontier: Arc::new(Frontier::new(recovered.as_ref().map_or(1, |r| r.next_lsn))),
            root,
            ddl_history: RefCell::new(Vec::new()),
            ddl_lock: futures::lock::Mutex::new(()),
            dispatch_lock: futures::lock::Mutex::new(()),
            last_checkpoint: Cell::new(0),
            checkpoints: checkpoints.clone(),
            stopping: Cell::new(false),
            gc: RefCell::new(None),
            timers: RefCell::new(Vec::new()),
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
            let frontend = coord.frontend.borrow_mut().take();
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
        if coord.root.is_some() {
            // Reopening then loads this checkpoint instead of replaying the whole WAL.
            if let Err(e) = coord.checkpoint().await {
                log::warn!("checkpoint at close failed: {e}");
            }
        }
        coord.finish_gc().await;
        let timers = coord.timers.take();
        for timer in timers {
            timer.cancel().await;
        }
        for tx in coord.shards.iter() {
            let _ = tx.send(ShardCommand::Stop).await;
        }
        for output in coord.outputs.write().drain() {
            output.1.close();
        }
        if let Some(control) = coord.control.lock().await.take() {
            control.close().await;
        }
        let frontend = coord.frontend.borrow_mut().take();
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

/// Takes a checkpoint every `every_ms` until the database closes.
fn start_checkpoint_timer(coord: Rc<Coordinator>, every_ms: u64) {
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

/// The next caller command: polled for up to `spin` first (a wake-up from sleep costs
/// tens of microseconds), then awaited.
async fn next_command(commands: &flume::Receiver<Command>, spin: std::time::Duration) -> Result<Command, flume::RecvError> {
    match laminardb_engine::config::poll_for(spin, || try_take(commands)) {
        Some(result) => result,
        None => commands.recv_async().await,
    }
}

/// A source as inserts reach it, and where its watermark goes (`Coordinator::flow`).
struct Flow {
    /// The source's name, shared by every command its inserts send to the shards.
    name: Arc<str>,
    /// A window downstream can close on it: the shards must hear it.
    matters: bool,
    /// The source drops rows by event time (`retention`): the shards must hear it too.
    retains: bool,
    /// Every stream downstream, whose watermark metric follows it otherwise.
    streams: Vec<String>,
}

struct Coordinator {
    shards: Rc<Vec<ConnectedSender<ShardCommand>>>,
    catalog: RefCell<Arc<Catalog>>,
    published: Published,
    frontend: RefCell<Option<Box<dyn Frontend>>>,
    access: Arc<dyn ShardAccess>,
    watermarks: RefCell<HashMap<String, Watermark>>,
    outputs: Outputs,
    /// Inserts and watermarks still travelling through the shards.
    inflight: Arc<AtomicUsize>,
    /// `start()` was called: connector sources read from creation on.
    running: Cell<bool>,
    /// `shutdown()` stopped the pipeline: rows, watermarks and `start()` are refused.
    stopped: Cell<bool>,
    /// Connector sources, and whether the shards have been told to read them.
    connected: RefCell<HashMap<String, bool>>,
    /// Sources declared idle (`update_idleness`), until their next rows or watermark.
    idle: RefCell<HashSet<String>>,
    idle_timeout: std::time::Duration,
    /// `EngineConfig::max_event_ahead_ms`, for the inserts the coordinator prepares itself.
    max_event_ahead_ms: Option<u64>,
    /// When `update_idleness` next looks for idle sources.
    next_idle_check: Cell<Instant>,
    /// Each source's name and where its watermark goes, worked out from the catalog on the
    /// first insert after a catalog change (`flow`).
    flows: RefCell<HashMap<String, Rc<Flow>>>,
    /// Accepted work goes to the WAL: there is a storage directory and no replay is
    /// running.
    logging: Cell<bool>,
    /// The control log: catalog changes and watermark calls. Async-locked: both command
    /// loops may log.
    control: futures::lock::Mutex<Option<WalWriter>>,
    /// The next log sequence number: one per logged command, across all WAL owners.
    next_lsn: Cell<u64>,
    /// The lsns taken and not yet acknowledged: every logged record carries what it
    /// proves was acknowledged before it (`wal::Frontier`, checked by recovery).
    frontier: Arc<Frontier>,
    /// The storage directory, if any.
    root: Option<Arc<std::path::Path>>,
    /// The statement that created each live object, in creation order: the catalog part
    /// of a checkpoint. A drop removes its object's entry, a replace moves it to the end,
    /// so it holds what exists, however many objects came and went.
    ddl_history: RefCell<Vec<(String, String)>>,
    /// Held by catalog changes and checkpoints (the timer's checkpoints run beside the
    /// command loop).
    ddl_lock: futures::lock::Mutex<()>,
    /// Held while an insert or a watermark call is sent to the shards (taken before its
    /// Ack exists), and by a checkpoint from its drain until every shard has written its
    /// part: nothing new enters the shards meanwhile.
    dispatch_lock: futures::lock::Mutex<()>,
    last_checkpoint: Cell<u64>,
    checkpoints: Arc<parking_lot::Mutex<CheckpointStats>>,
    stopping: Cell<bool>,
    /// Deleting what the latest manifest made obsolete, off the checkpoint's path
    /// (`spawn_gc`); finished before the next checkpoint writes files.
    gc: RefCell<Option<std::thread::JoinHandle<()>>>,
    /// Timer tasks (automatic checkpoints, `EMIT EVERY` ticks), cancelled at
    /// shutdown: a task still sleeping when the executor ends would pin its resources.
    timers: RefCell<Vec<glommio::Task<()>>>,
}

fn stopped_error() -> Error {
    Error::new(
        ErrorCode::Shutdown,
        "the pipeline was shut down: it takes no more rows or watermarks (open the database again to go on)",
    )
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
            Command::Insert { reply, .. } if self.stopped.get() => {
                let _ = reply.send(Err(stopped_error()));
            }
            Command::Watermark { reply, .. } if self.stopped.get() => {
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
            Command::Watermark { source, mark: asked, reply } => {
                let name = match self.catalog.borrow().source(&source) {
                    Ok(def) => def.name.clone(),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                if asked.is_some() {
                    if let Some(output) = self.outputs.read().get(&name) {
                        output.touch();
                    }
                }
                let _dispatching = self.dispatch_lock.lock().await;
                let moving = asked.filter(|m| self.watermarks.borrow().get(&name).is_none_or(|now| m > now));
                if let Some(moving) = moving {
                    let record = |lsn| Record::Watermark { lsn, source: name.clone(), watermark: moving.ms() };
                    if let Err(e) = self.log_control(record).await {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                // Answered once the watermark has passed through every stream.
                let mark = Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN));
                let ack = Ack::new(&self.inflight, {
                    let mark = mark.clone();
                    move |r| {
                        let _ = reply.send(r.map(|_| Watermark::decode(mark.load(Ordering::Acquire))));
                    }
                });
                let flow = self.flow(&name);
                if asked.is_some() {
                    self.update_idleness(&flow.name, &ack).await;
                }
                let mut now = self.advance_watermark(&flow, Watermark::encode(asked), &ack).await;
                // A connector source's watermark moves on the shards, into its output.
                if let Some(output) = self.outputs.read().get(&name) {
                    now = now.max(output.counters.watermark.load(Ordering::Relaxed));
                }
                mark.store(now, Ordering::Release);
            }
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
                    self.stopped.set(true);
                    self.running.set(false);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Checkpoint { reply } => {
                let _ = reply.send(self.checkpoint().await);
            }
            Command::Start { reply } if self.stopped.get() => {
                let _ = reply.send(Err(stopped_error()));
            }
            Command::Start { reply } => {
                self.running.set(true);
                let names: Vec<String> = self.connected.borrow().keys().cloned().collect();
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

    async fn execute(&self, sql: &str, params: &[ScalarValue]) -> Result<Vec<Outcome>> {
        let statements = self.with_frontend(|f| f.split(sql))?;
        if statements.is_empty() {
            return Err(Error::parse("empty SQL statement"));
        }
        let mut outcomes = Vec::with_capacity(statements.len());
        for text in &statements {
            let catalog = self.catalog.borrow().clone();
            let access = self.access.clone();
            let statement = self.with_frontend(|f| f.plan(text, params, &catalog, access))?;
            let is_ddl = !matches!(statement, Statement::Query(_));
            let _ddl = if is_ddl { Some(self.ddl_lock.lock().await) } else { None };
            let change = DdlChange::of(&statement, &self.catalog.borrow());
            let outcome = self.apply(statement).await?;
            if let Outcome::Ddl { object, .. } = &outcome {
                if !object.starts_with(TRANSIENT_PREFIX) && self.root.is_some() {
                    change.record(&mut self.ddl_history.borrow_mut(), object, text);
                    self.log_control(|lsn| Record::Ddl { lsn, sql: text.clone() }).await?;
                }
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// A structured request of the binding: planned by the front end from its parts, and
    /// never logged (a subscription's hidden stream lives as long as the connection).
    async fn request(&self, request: &Request) -> Result<Outcome> {
        let catalog = self.catalog.borrow().clone();
        let access = self.access.clone();
        let statement = self.with_frontend(|f| f.plan_request(request, &catalog, access))?;
        let is_ddl = !matches!(statement, Statement::Query(_));
        let _ddl = if is_ddl { Some(self.ddl_lock.lock().await) } else { None };
        self.apply(statement).await
    }

    fn with_frontend<T>(&self, f: impl FnOnce(&mut dyn Frontend) -> Result<T>) -> Result<T> {
        let mut guard = self.frontend.borrow_mut();
        let frontend = guard.as_mut().ok_or_else(Error::shutdown)?;
        catch("the SQL front end", || f(frontend.as_mut()))
    }

    async fn apply(&self, statement: Statement) -> Result<Outcome> {
        match statement {
            Statement::CreateSource { def, if_not_exists, or_replace } => {
                let verb = match def.kind {
                    SourceKind::Source => "CREATE SOURCE",
                    SourceKind::Table => "CREATE TABLE",
                };
                let name = def.name.clone();
                let exists = self.catalog.borrow().contains(&name);
                if exists && if_not_exists {
                    return Ok(Outcome::Ddl { verb: verb.into(), object: name });
                }
                if exists && or_replace {
                    self.drop_source(&name).await?;
                }
                let schema = def.schema.clone();
                let connected = def.connector.is_some();
                let retention = retain_policy(&def)?;
                self.update_catalog(|c| c.add_source(def))?;
                self.outputs.write().insert(name.clone(), Output::new(name.clone(), schema));
                if let Some(policy) = retention {
                    let source: Arc<str> = name.as_str().into();
                    for tx in self.shards.iter() {
                        tx.send(ShardCommand::Retain { source: source.clone(), policy })
                            .await
                            .map_err(|_| Error::internal("a shard has stopped"))?;
                    }
                }
                if connected {
                    self.connected.borrow_mut().insert(name.clone(), false);
                    if self.running.get() {
                        self.start_source(&name).await?;
                    }
                }
                Ok(Outcome::Ddl { verb: verb.into(), object: name })
            }
            Statement::CreateStream { def, if_not_exists, or_replace } => {
                let verb = if def.plan.materialized { "CREATE MATERIALIZED VIEW" } else { "CREATE STREAM" };
                let name = def.name.clone();
                let exists = self.catalog.borrow().contains(&name);
                if exists && if_not_exists {
                    return Ok(Outcome::Ddl { verb: verb.into(), object: name });
                }
                if exists && or_replace {
                    self.drop_stream(&name).await?;
                }
                let plan = def.plan.clone();
                self.update_catalog(|c| c.add_stream(def))?;
                if let Some(ms) = plan.tick_ms() {
                    self.start_ticker(&name, ms);
                }
                let output = Output::new(name.clone(), plan.schema.clone());
                self.outputs.write().insert(name.clone(), output.clone());
                // No insert between adding the stream and its backfill: what is retained
                // then is read once by the backfill, what comes after once as it arrives.
                let _dispatching = self.dispatch_lock.lock().await;
                let marks: Vec<(Arc<str>, Watermark)> =
                    self.watermarks.borrow().iter().map(|(k, v)| (Arc::from(k.as_str()), *v)).collect();
                let added = self
                    .ask_shards(|_, reply| ShardCommand::AddStream { plan: plan.clone(), output: output.clone(), marks: marks.clone(), reply })
                    .await?;
                for rx in added {
                    let result = rx.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))?;
                    if let Err(e) = result {
                        output.record_error(&e.to_string());
                    }
                }
                if plan.backfill {
                    let (reply, done) = reply_channel();
                    let ack = Ack::replying(None, &self.inflight, reply);
                    let stream: Arc<str> = Arc::from(name.as_str());
                    self.tell_shards(&ack, || ShardCommand::Backfill { stream: stream.clone(), ack: ack.clone() }).await;
                    drop(ack);
                    let backfilled = done.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))?;
                    if let Err(e) = backfilled {
                        output.record_error(&format!("reading the rows retained before the stream was created: {e}"));
                    }
                }
                Ok(Outcome::Ddl { verb: verb.into(), object: name })
            }
            Statement::CreateSink { def, stream, if_not_exists } => {
                let name = def.name.clone();
                if if_not_exists && self.catalog.borrow().contains(&name) {
                    return Ok(Outcome::Ddl { verb: "CREATE SINK".into(), object: name });
                }
                if self.catalog.borrow().contains(&name) {
                    return Err(Error::table_exists(&name));
                }
                if let Some(stream) = stream {
                    let verb = self.apply(Statement::CreateStream { def: stream, if_not_exists: false, or_replace: false });
                    Box::pin(verb).await?;
                }
                let input = self.outputs.read().get(&def.input).cloned().ok_or_else(|| Error::table_not_found(&def.input))?;
                let counters = Output::new(name.clone(), input.schema.clone());
                // The sink is the one node of its own dataflow, on every shard; opened once
                // here first, so a connector that cannot open fails the CREATE.
                let opened = laminardb_engine::sink::open(&def.connector, &def.options)
                    .and_then(|mut probe| probe.close())
                    .and_then(|()| self.update_catalog(|c| c.add_sink(def.clone())));
                if let Err(e) = opened {
                    if def.owns_input {
                        let _ = Box::pin(self.drop_stream(&def.input)).await;
                    }
                    return Err(e);
                }
                let spec = SinkPlan { connector: def.connector.clone(), options: def.options.clone(), schema: input.schema.clone(), counters: counters.clone() };
                let mut dag = Dag::default();
                dag.add(Arc::new(spec), vec![Port { from: Upstream::Input(def.input.clone()), route: Route::Forward }]);
                let plan = Arc::new(StreamPlan { name: name.clone(), sql: def.sql.clone(), dag, schema: input.schema.clone(), materialized: false, backfill: false });
                self.outputs.write().insert(name.clone(), counters.clone());
                // No insert half-way: every shard's sink starts with the same rows.
                let _dispatching = self.dispatch_lock.lock().await;
                let added = self
                    .ask_shards(|_, reply| ShardCommand::AddStream { plan: plan.clone(), output: counters.clone(), marks: vec![], reply })
                    .await?;
                for rx in added {
                    let result = rx.recv_async().await.map_err(|_| Error::internal("a shard has stopped"))?;
                    if let Err(e) = result {
                        counters.record_error(&e.to_string());
                    }
                }
                Ok(Outcome::Ddl { verb: "CREATE SINK".into(), object: name })
            }
            Statement::Drop { kind, name, if_exists } => {
                let verb = format!("DROP {}", kind.sql_name());
                match kind {
                    ObjectKind::Source | ObjectKind::Table => match self.drop_source(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                    ObjectKind::Stream | ObjectKind::View => match self.drop_stream(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                    ObjectKind::Sink => match self.drop_sink(&name).await {
                        Err(e) if e.code == ErrorCode::TableNotFound && if_exists => {}
                        other => other?,
                    },
                }
                Ok(Outcome::Ddl { verb, object: name })
            }
            Statement::Query(prepared) => {
                let kind = prepared.kind();
                let handle = prepared.start()?;
                if kind != QueryKind::RowsAffected {
                    return Ok(Outcome::Query { kind, handle });
                }
                let mut affected = 0u64;
                while let Ok(batch) = handle.batches.recv_async().await {
                    affected += crate::handle::count_of(&batch?)?;
                }
                Ok(Outcome::RowsAffected(affected))
            }
        }
    }

    /// Sends `EMIT EVERY` ticks to every shard until the stream is gone.
    fn start_ticker(&self, name: &str, every_ms: i64) {
        let (published, shards) = (self.published.clone(), self.shards.clone());
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

    async fn drop_sink(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_sink(name))?;
        // Each shard closes its instance (which delivers what is pending).
        let name: Arc<str> = removed.name.as_str().into();
        for tx in self.shards.iter() {
            let _ = tx.send(ShardCommand::DropStream { name: name.clone() }).await;
        }
        self.outputs.write().remove(&removed.name);
        if removed.owns_input {
            self.drop_stream(&removed.input).await?;
        }
        Ok(())
    }

    async fn drop_stream(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_stream(name))?;
        if let Some(output) = self.outputs.write().remove(&removed.name) {
            output.close();
        }
        let name: Arc<str> = removed.name.as_str().into();
        for tx in self.shards.iter() {
            tx.send(ShardCommand::DropStream { name: name.clone() })
                .await
                .map_err(|_| Error::internal("a shard has stopped"))?;
        }
        Ok(())
    }

    /// Starts the shards reading connector source `name`, once.
    async fn start_source(&self, name: &str) -> Result<()> {
        match self.connected.borrow_mut().get_mut(name) {
            Some(started) if !*started => *started = true,
            _ => return Ok(()),
        }
        let catalog = self.catalog.borrow().clone();
        let def = catalog.source(name)?;
        let Some(connector) = def.connector.clone() else { return Ok(()) };
        let delay_ms = def.watermark.as_ref().map_or(0, |w| w.delay_ms);
        let time_column = def.watermark.as_ref().and_then(|w| def.schema.index_of(&w.column).ok());
        let source: Arc<str> = name.into();
        for tx in self.shards.iter() {
            let cmd = ShardCommand::StartSource { source: source.clone(), connector: connector.clone(), delay_ms, time_column };
            tx.send(cmd).await.map_err(|_| Error::internal("a shard has stopped"))?;
        }
        Ok(())
    }

    /// Waits (bounded) until every accepted insert and watermark has passed through every
    /// stream, so a shutdown delivers everything it accepted.
    async fn drain(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.inflight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
        }
    }

    /// Moves `source`'s watermark to `mark` if that is later, telling every shard (after the
    /// rows already sent to it). Returns the source's watermark.
    async fn advance_watermark(&self, source: &Flow, mark: i64, ack: &AckToken) -> i64 {
        let Some(current) = self.bump_watermark(source, mark) else {
            return Watermark::encode(self.watermarks.borrow().get(&*source.name).copied());
        };
        self.tell_shards(ack, || ShardCommand::Watermark { source: source.name.clone(), watermark: current, ack: ack.clone() }).await;
        current
    }

    /// Moves the watermark of `flow`'s source forward to `mark`. Returns `Some(mark)` if it moved and a
    /// window downstream may care, so the shards must hear it; otherwise (no windowed
    /// stream downstream) only the metrics of the streams it feeds move, and the shards
    /// catch up when a stream is added (`AddStream::marks`).
    fn bump_watermark(&self, flow: &Flow, mark: i64) -> Option<i64> {
        let source = &*flow.name;
        let moved = Watermark::decode(mark)?;
        {
            let mut marks = self.watermarks.borrow_mut();
            match marks.get_mut(source) {
                Some(current) if moved <= *current => return None,
                Some(current) => *current = moved,
                None => {
                    marks.insert(source.to_string(), moved);
                }
            }
        }
        let outputs = self.outputs.read();
        if let Some(output) = outputs.get(source) {
            output.counters.watermark.fetch_max(mark, Ordering::Relaxed);
        }
        if flow.matters || flow.retains {
            return Some(mark);
        }
        for stream in &flow.streams {
            if let Some(output) = outputs.get(stream) {
                output.counters.watermark.fetch_max(mark, Ordering::Relaxed);
            }
        }
        None
    }

    /// `source` as inserts reach it under the current catalog (cached per catalog: every
    /// insert asks).
    fn flow(&self, source: &str) -> Rc<Flow> {
        if let Some(flow) = self.flows.borrow().get(source) {
            return flow.clone();
        }
        let catalog = self.catalog.borrow().clone();
        let flow = Rc::new(Flow {
            name: source.into(),
            matters: catalog.watermark_matters(source),
            retains: catalog.sources.get(source).is_some_and(|s| s.retention().is_ok_and(|r| r.time_ms.is_some())),
            streams: catalog.downstream(source).iter().map(|s| s.name.clone()).collect(),
        });
        self.flows.borrow_mut().insert(source.to_string(), flow.clone());
        flow
    }

    async fn drop_source(&self, name: &str) -> Result<()> {
        let removed = self.update_catalog(|c| c.drop_source(name))?;
        self.watermarks.borrow_mut().remove(&removed.name);
        self.connected.borrow_mut().remove(&removed.name);
        if let Some(output) = self.outputs.write().remove(&removed.name) {
            output.close();
        }
        let source: Arc<str> = removed.name.as_str().into();
        for tx in self.shards.iter() {
            tx.send(ShardCommand::DropSource { source: source.clone() })
                .await
                .map_err(|_| Error::internal("a shard has stopped"))?;
        }
        Ok(())
    }

    fn update_catalog<T>(&self, change: impl FnOnce(&mut Catalog) -> Result<T>) -> Result<T> {
        let mut next = (**self.catalog.borrow()).clone();
        let out = change(&mut next)?;
        let next = Arc::new(next);
        *self.catalog.borrow_mut() = next.clone();
        self.flows.borrow_mut().clear();
        *self.published.write() = next;
        Ok(out)
    }

    /// `born`: when the work entered the engine, for the latency histograms (`None` for
    /// rows replayed from the WAL).
    async fn insert(&self, source: &str, parts: Vec<Vec<RecordBatch>>, max_event_ms: Option<i64>, born: Option<Instant>, reply: Reply<u64>) {
        let (flow, watermark) = {
            let catalog = self.catalog.borrow();
            match catalog.source(source) {
                // The caller cast against a catalog snapshot; a source dropped and re-created
                // with another schema since then must not receive those rows.
                Ok(def) if parts.iter().flatten().all(|b| b.schema().fields() == def.schema.fields()) => {
                    let mark = def.watermark.as_ref().zip(max_event_ms).map(|(w, max)| max.saturating_sub(w.delay_ms));
                    (self.flow(&def.name), mark)
                }
                Ok(_) => {
                    let _ = reply.send(Err(Error::new(
                        ErrorCode::SchemaMismatch,
                        format!("'{source}' changed while the insert was prepared; retry"),
                    )));
                    return;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        };
        let _dispatching = self.dispatch_lock.lock().await;
        let ack = Ack::replying(born, &self.inflight, reply);
        self.update_idleness(&flow.name, &ack).await;
        let watermark = watermark.and_then(|mark| self.bump_watermark(&flow, mark));
        // While logging, each shard writes its rows to its WAL under one new lsn first.
        let with_rows = parts.iter().filter(|p| !p.is_empty()).count();
        let lsn = (self.logging.get() && with_rows > 0).then(|| self.take_lsn());
        let claim = lsn.map(|lsn| {
            ack.logged(lsn, self.frontier.clone());
            self.frontier.claim()
        });
        for (shard, batches) in parts.into_iter().enumerate() {
            if batches.is_empty() && watermark.is_none() {
                continue;
            }
            let log = lsn.zip(claim).filter(|_| !batches.is_empty()).map(|(lsn, claim)| (lsn, with_rows as u16, claim));
            let cmd = ShardCommand::Append { source: flow.name.clone(), batches, watermark, log, ack: ack.clone() };
            if self.shards[shard].send(cmd).await.is_err() {
                ack.fail(Error::internal(format!("shard {shard} has stopped")));
            }
        }
    }

    /// `source` has rows or a watermark (called under the dispatch lock, before they are
    /// sent). Every other caller-fed source feeding a watermark-driven stream that has had
    /// neither for `idle_timeout_ms` is declared idle (looked for at most every half
    /// timeout), and `source` active again if it was idle: every shard hears it at this
    /// point of its command stream (`ShardRuntime::set_idle`). Idleness matters only while
    /// another source is active, which is exactly when this runs, so no timer is needed.
    async fn update_idleness(&self, source: &Arc<str>, ack: &AckToken) {
        let now = Instant::now();
        if now >= self.next_idle_check.get() {
            self.next_idle_check.set(now + self.idle_timeout / 2);
            let timeout = i64::try_from(self.idle_timeout.as_millis()).unwrap_or(i64::MAX);
            let quiet: Vec<Arc<str>> = {
                let catalog = self.catalog.borrow().clone();
                let outputs = self.outputs.read();
                let (idle, connected) = (self.idle.borrow(), self.connected.borrow());
                catalog
                    .sources
                    .keys()
                    .filter(|name| name.as_str() != &**source && !idle.contains(*name) && !connected.contains_key(*name))
                    .filter(|name| self.flow(name).matters)
                    .filter(|name| outputs.get(*name).is_some_and(|output| output.idle_ms() > timeout))
                    .map(|name| name.as_str().into())
                    .collect()
            };
            for name in quiet {
                self.idle.borrow_mut().insert(name.to_string());
                log::debug!("source '{name}' is idle: streams reading it no longer wait for its watermark");
                self.send_idle(&name, true, ack).await;
            }
        }
        if self.idle.borrow().is_empty() || !self.idle.borrow_mut().remove(&**source) {
            return;
        }
        if let Some(output) = self.outputs.read().get(&**source) {
            output.touch();
        }
        self.send_idle(source, false, ack).await;
    }

    async fn send_idle(&self, source: &Arc<str>, idle: bool, ack: &AckToken) {
        self.tell_shards(ack, || ShardCommand::Idle { source: source.clone(), idle, ack: ack.clone() }).await;
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

    /// The next lsn, taken: it stays in the acknowledged frontier until its work is done.
    fn take_lsn(&self) -> u64 {
        let lsn = self.next_lsn.get();
        self.next_lsn.set(lsn + 1);
        self.frontier.begin(lsn);
        lsn
    }

    /// Appends one record to the control log and returns once it is durable; nothing
    /// without a storage directory or while replaying.
    async fn log_control(&self, record: impl FnOnce(u64) -> Record) -> Result<()> {
        if !self.logging.get() {
            return Ok(());
        }
        let mut control = self.control.lock().await;
        let Some(writer) = control.as_mut() else { return Ok(()) };
        let lsn = self.take_lsn();
        let claim = self.frontier.claim();
        writer.write(&[(&record(lsn), claim)], "the coordinator").await?;
        self.frontier.done(lsn);
        Ok(())
    }

    /// Runs `timer` on this executor until it returns or the database closes.
    fn start_timer(&self, timer: impl std::future::Future<Output = ()> + 'static) {
        self.timers.borrow_mut().push(glommio::spawn_local(timer));
    }

    /// Deletes, on a thread of its own, the WAL segments and data files `manifest` (just
    /// published) made obsolete: unlinking takes long on this file system (discard), and
    /// nothing waits for it. Failures only leave files behind.
    fn spawn_gc(&self, root: Arc<std::path::Path>, manifest: Manifest) {
        let spawned = std::thread::Builder::new().name("laminar-gc".into()).spawn(move || collect_garbage(&root, &manifest));
        match spawned {
            Ok(thread) => *self.gc.borrow_mut() = Some(thread),
            Err(e) => log::warn!("cannot start the checkpoint's file collection: {e}"),
        }
    }

    /// Waits for the collection `spawn_gc` started, if any.
    async fn finish_gc(&self) {
        let Some(thread) = self.gc.borrow_mut().take() else { return };
        while !thread.is_finished() {
            glommio::timer::sleep(std::time::Duration::from_micros(100)).await;
        }
        let _ = thread.join();
    }

    /// Takes a checkpoint: under the dispatch lock (a few microseconds: no insert is half
    /// sent), takes its lsn, puts its barrier into every shard's command stream and rolls
    /// the control log; inserts then flow again while the shards snapshot at the barrier
    /// and record the exchange messages still in flight to them (Chandy–Lamport: see
    /// `ShardRuntime::begin_checkpoint`). Once every shard has answered, publishes the
    /// manifest and deletes the WAL segments and files it made obsolete. Returns the id.
    async fn checkpoint(&self) -> Result<u64> {
        let root = self.root.clone().ok_or_else(|| {
            Error::checkpoint("checkpointing is disabled: open the database with a path or LaminarConfig(storage_dir=…)")
        })?;
        let _ddl = self.ddl_lock.lock().await;
        let started = Instant::now();
        // The previous checkpoint's collection deletes data files its manifest does not
        // name: it must be over before this one writes any.
        self.finish_gc().await;
        let dispatching = self.dispatch_lock.lock().await;
        let paused = Instant::now();
        let id = self.last_checkpoint.get() + 1;
        // Every record below the next lsn is before the barrier (the lsn is not taken:
        // lsns stay dense, so recovery can tell a lost record from an unused number).
        let lsn = self.next_lsn.get();
        let waits = self.ask_shards(|_, reply| ShardCommand::Checkpoint { root: root.clone(), id, reply }).await?;
        if let Some(control) = self.control.lock().await.as_mut() {
            control.roll().await;
        }
        // The sources' watermarks as of the barrier (later inserts may move them on).
        let watermarks: Vec<(String, i64)> = self.watermarks.borrow().iter().map(|(k, v)| (k.clone(), v.ms())).collect();
        drop(dispatching);
        let pause = paused.elapsed();
        // Every answer is awaited, failed or not, so no shard is still completing this
        // checkpoint when the next one begins.
        let shard_files = answers(waits).await.map_err(|e| Error::checkpoint(format!("checkpoint {id}: {e}")))?;
        // Counters as of the barrier: the sum of what each shard had published by then.
        let catalog = self.catalog.borrow().clone();
        let outputs = self.outputs.read();
        let mut totals: HashMap<String, [i64; 4]> = catalog
            .sources
            .keys()
            .chain(catalog.streams.keys())
            .filter_map(|name| outputs.get(name).map(|o| (name.clone(), [0, 0, 0, o.counters.watermark.load(Ordering::Relaxed)])))
            .collect();
        drop(outputs);
        for files in &shard_files {
            for (name, counts) in &files.counters {
                if let Some(total) = totals.get_mut(name) {
                    for (t, c) in total.iter_mut().zip(counts) {
                        *t += *c as i64;
                    }
                }
            }
        }
        let manifest = Manifest {
            id,
            lsn,
            shards: self.shards.len(),
            created_ms: laminardb_engine::stream::time::now_ms(),
            ddl: self.ddl_history.borrow().iter().map(|(_, sql)| sql.clone()).collect(),
            watermarks,
            counters: totals.into_iter().collect(),
            bytes_written: shard_files.iter().map(|f| f.bytes_written).sum(),
            shard_files,
        };
        checkpoint::write_manifest(&root, &manifest)?;
        self.last_checkpoint.set(id);
        let bytes_written = manifest.bytes_written;
        self.spawn_gc(root, manifest);
        let mut stats = self.checkpoints.lock();
        stats.count += 1;
        stats.last_id = id;
        stats.last_ms = started.elapsed().as_secs_f64() * 1e3;
        stats.last_pause_ms = pause.as_secs_f64() * 1e3;
        stats.last_bytes = bytes_written;
        Ok(id)
    }

    /// Loads the checkpoint read at open: the catalog (its DDL, run again without
    /// logging), every shard's rows and state, the sources' watermarks and counters.
    async fn restore(&self, manifest: &Manifest) -> Result<()> {
        let root = self.root.clone().ok_or_else(|| Error::internal("restoring without a storage directory"))?;
        for sql in &manifest.ddl {
            self.execute(sql, &[]).await.map_err(|e| Error::checkpoint(format!("rebuilding the catalog: {sql}: {e}")))?;
        }
        let files = &manifest.shard_files;
        answers(self.ask_shards(|shard, reply| ShardCommand::Restore { root: root.clone(), files: files[shard].clone(), reply }).await?)
            .await?;
        // Exchange messages that were in flight at the checkpoint, now that every shard
        // they may route rows on to holds its state.
        let ack = Ack::born_at(None, &self.inflight, |_| {});
        for tx in self.shards.iter() {
            tx.send(ShardCommand::ReplayChannel { ack: ack.clone() }).await.map_err(|_| Error::internal("a shard has stopped"))?;
        }
        for (source, mark) in &manifest.watermarks {
            if let Some(mark) = Watermark::decode(*mark) {
                self.watermarks.borrow_mut().insert(source.clone(), mark);
            }
        }
        let outputs = self.outputs.read();
        for (name, [rows, batches, late, mark]) in &manifest.counters {
            if let Some(o) = outputs.get(name) {
                o.counters.rows.store(*rows as u64, Ordering::Relaxed);
                o.counters.batches.store(*batches as u64, Ordering::Relaxed);
                o.counters.late_rows.store(*late as u64, Ordering::Relaxed);
                o.counters.watermark.fetch_max(*mark, Ordering::Relaxed);
            }
        }
        self.last_checkpoint.set(manifest.id);
        Ok(())
    }

    /// Replays the WAL read at open through the ordinary paths, in lsn order, without
    /// logging it again: catalog changes run as SQL, inserts are re-partitioned for the
    /// current shard count, watermark calls move watermarks. Streams rebuild their state
    /// from the replayed input. Returns once everything has passed through every stream.
    /// A checkpoint that cannot be loaded fails the open: the WAL before it is gone, so
    /// going on would serve a database missing what the checkpoint held.
    async fn recover(&self, recovered: Recovered) -> Result<RecoveryReport> {
        let started = Instant::now();
        let Recovered { groups, mut report, manifest, checkpoint_now, .. } = recovered;
        let logging = self.logging.replace(false);
        if let Some(m) = &manifest {
            self.restore(m).await.map_err(|e| Error::checkpoint(format!("loading checkpoint {}: {}", m.id, e.message)))?;
            // What a crash kept the last checkpoint's collection from deleting.
            if let Some(root) = self.root.clone() {
                self.spawn_gc(root, m.clone());
            }
        }
        // `groups` holds only what follows the checkpoint (`Storage::read`).
        for group in groups {
            let lsn = group[0].lsn();
            let step = match &group[0] {
                Record::Ddl { sql, .. } => self.execute(sql, &[]).await.map(drop),
                Record::Watermark { source, watermark, .. } => {
                    let ack = Ack::born_at(None, &self.inflight, |_| {});
                    self.advance_watermark(&self.flow(source), *watermark, &ack).await;
                    Ok(())
                }
                Record::Append { .. } => match wal::append_batches(group) {
                    Some((source, batches)) => {
                        report.rows += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
                        self.replay_insert(&source, batches).await
                    }
                    None => Ok(()),
                },
            };
            if let Err(e) = step {
                report.errors.push(format!("lsn {lsn}: {e}"));
            }
        }
        self.drain().await;
        self.logging.set(logging);
        if checkpoint_now {
            // Damage was cut (recovery='truncate'): a checkpoint now puts it behind the
            // database, so the next open neither finds nor cuts it again.
            self.checkpoint().await.map_err(|e| Error::checkpoint(format!("the checkpoint after cutting damage failed: {e}")))?;
        }
        report.millis = started.elapsed().as_secs_f64() * 1e3;
        for line in report.torn_tails.iter().chain(&report.damage).chain(&report.errors) {
            log::warn!("recovery: {line}");
        }
        Ok(report)
    }

    /// Logged rows go in as an insert does (re-partitioned for the current shard count).
    async fn replay_insert(&self, source: &str, batches: Vec<RecordBatch>) -> Result<()> {
        let catalog = self.catalog.borrow().clone();
        let Prepared { parts, max_event_ms, future_rows } =
            prepare_insert(catalog.source(source)?, &batches, self.shards.len(), self.max_event_ahead_ms)?;
        count_future_rows(&self.outputs, source, future_rows, self.max_event_ahead_ms);
        let (reply, answer) = reply_channel();
        self.insert(source, parts, max_event_ms, None, reply).await;
        // Refused at once (the source is gone or changed), or answered later: not waited on.
        match answer.try_recv() {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    async fn stats(&self, source: &str) -> Result<Vec<RowStats>> {
        let name: Arc<str> = self.catalog.borrow().source(source)?.name.as_str().into();
        answers(self.ask_shards(|_, reply| ShardCommand::Stats { source: name.clone(), reply }).await?).await
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
async fn answers<T>(waits: Vec<flume::Receiver<Result<T>>>) -> Result<Vec<T>> {
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
