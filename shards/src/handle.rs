//! [`Handle`]: the caller's end of one database. Every call is a command on a bounded
//! queue to the coordinator, answered on a one-shot channel. Callers (Python) release the
//! GIL before calling in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow::array::{Array, RecordBatch, UInt64Array};
use datafusion::common::ScalarValue;
use parking_lot::{Mutex, RwLock};

use laminardb_engine::catalog::{Catalog, SourceDef};
use laminardb_engine::stream::output::Output;
use laminardb_engine::stream::time::{max_millis, max_millis_below, now_ms};
use laminardb_engine::config::{poll_for, EngineConfig};
use laminardb_engine::frontend::{Frontend, QueryHandle, QueryKind};
use laminardb_engine::ingest::cast_to_schema;
use laminardb_engine::stream::op::change_signs;
use laminardb_engine::partition::partition_batch;
use laminardb_engine::wal::RecoveryReport;
use laminardb_engine::{Error, Result};

use crate::command::{reply_channel, Command, PanicSite, Reply};
use crate::coordinator::{self, Published, Startup};
use crate::health::Health;
pub use crate::storage::CheckpointStats;
pub use crate::store::RowStats;
use crate::storage;
use crate::runtime::Outputs;

/// What one executed statement produced.
pub enum Outcome {
    Ddl { verb: String, object: String },
    RowsAffected(u64),
    Query { kind: QueryKind, handle: QueryHandle },
}

/// An insert cast and split, not sent yet (`Handle::prepare`).
pub struct PreparedInsert {
    source: String,
    prepared: Prepared,
}

impl PreparedInsert {
    /// Rows in the insert.
    pub fn rows(&self) -> usize {
        self.prepared.parts.iter().flatten().map(RecordBatch::num_rows).sum()
    }
}

/// An insert in the coordinator's hands, not answered yet (`Handle::send_insert`).
pub struct SentInsert {
    rx: flume::Receiver<Result<u64>>,
    source: String,
    future_rows: u64,
}

pub struct Handle {
    commands: flume::Sender<Command>,
    queue_capacity: usize,
    published: Published,
    outputs: Outputs,
    shards: usize,
    health: Arc<Health>,
    coordinator: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    stopped: AtomicBool,
    caller_spin: std::time::Duration,
    idle_timeout_ms: u64,
    subscriber_queue_bytes: u64,
    recovery: RecoveryReport,
    checkpoints: Arc<Mutex<CheckpointStats>>,
    checkpoint_enabled: bool,
    max_event_ahead_ms: Option<u64>,
}

impl Handle {
    /// Starts the shards and the coordinator; returns once all are running.
    pub fn open(config: EngineConfig, frontend: Box<dyn Frontend>) -> Result<Handle> {
        let config = storage::settle(config)?;
        let shards = config.shards.max(1);
        let config = EngineConfig { shards, ..config };
        let queue_capacity = config.queue_capacity();
        let caller_spin = std::time::Duration::from_micros(config.caller_spin_us);
        let idle_timeout_ms = config.idle_timeout_ms;
        let max_event_ahead_ms = config.max_event_ahead_ms;
        let subscriber_queue_bytes = config.subscriber_queue_bytes;
        let (commands_tx, commands_rx) = flume::bounded(queue_capacity);
        let mut catalog = Catalog::default();
        catalog.functions = config.functions.clone();
        let published: Published = Arc::new(RwLock::new(Arc::new(catalog)));
        let outputs: Outputs = Arc::default();
        let health = Arc::new(Health::default());
        let checkpoints: Arc<Mutex<CheckpointStats>> = Arc::default();
        let checkpoint_enabled = config.checkpoint_interval_ms.is_some();
        let (ready_tx, ready_rx) = flume::bounded(1);
        let startup = Startup {
            config,
            frontend,
            commands: commands_rx,
            internal: flume::unbounded(),
            published: published.clone(),
            outputs: outputs.clone(),
            health: health.clone(),
            checkpoints: checkpoints.clone(),
            ready: ready_tx,
        };
        let coordinator = std::thread::Builder::new()
            .name("laminar-coordinator".into())
            .stack_size(laminardb_engine::config::ENGINE_STACK_BYTES)
            .spawn({
                let health = health.clone();
                move || {
                    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| coordinator::run(startup))) {
                        health.thread_died("coordinator", laminardb_engine::error::panic_message(&*payload));
                    }
                }
            })
            .map_err(|e| Error::new(laminardb_engine::ErrorCode::ConnectionFailed, e.to_string()))?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(Error::new(laminardb_engine::ErrorCode::ConnectionFailed, "the runtime failed to start")));
        let recovery = match started {
            Ok(report) => report,
            Err(e) => {
                let _ = coordinator.join();
                return Err(e);
            }
        };
        Ok(Handle {
            commands: commands_tx,
            queue_capacity,
            published,
            outputs,
            shards,
            health,
            coordinator: Mutex::new(Some(coordinator)),
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            caller_spin,
            idle_timeout_ms,
            subscriber_queue_bytes,
            recovery,
            checkpoints,
            checkpoint_enabled,
            max_event_ahead_ms,
        })
    }

    /// Automatic checkpoints are configured (`checkpoint_interval_ms`; without a storage
    /// directory they go to a temporary one, see `storage::settle`).
    pub fn checkpoint_enabled(&self) -> bool {
        self.checkpoint_enabled
    }

    pub fn checkpoint_stats(&self) -> CheckpointStats {
        self.checkpoints.lock().clone()
    }

    /// What opening found in the storage directory and replayed (empty without one).
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// After this long without rows or watermarks a source counts as idle.
    pub fn idle_timeout_ms(&self) -> u64 {
        self.idle_timeout_ms
    }

    /// Bytes a subscriber's queue holds at most (`EngineConfig::subscriber_queue_bytes`).
    pub fn subscriber_queue_bytes(&self) -> u64 {
        self.subscriber_queue_bytes
    }

    /// Capacity, in commands, of the queue into the coordinator.
    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }

    /// Requests waiting in the coordinator's queue (inserts among them): at
    /// `queue_capacity`, callers wait.
    pub fn queue_len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The latest catalog the coordinator published.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.published.read().clone()
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let rx = self.send(make)?;
        self.answer(recv_spinning(&rx, self.caller_spin))
    }

    /// Puts a command in the coordinator's queue (waiting while it is full); its answer
    /// comes on the returned channel.
    fn send<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<flume::Receiver<Result<T>>> {
        if self.is_closed() {
            return Err(Error::closed());
        }
        self.health.check()?;
        let (reply, rx) = reply_channel();
        if self.commands.send(make(reply)).is_err() {
            self.health.check()?;
            return Err(Error::shutdown());
        }
        Ok(rx)
    }

    fn answer<T>(&self, received: Result<Result<T>, flume::RecvError>) -> Result<T> {
        match received {
            Ok(result) => result,
            Err(_) => {
                self.health.check()?;
                Err(Error::internal("the coordinator dropped a command without answering"))
            }
        }
    }

    pub fn execute(&self, sql: &str, params: Vec<ScalarValue>) -> Result<Vec<Outcome>> {
        self.call(|reply| Command::Execute { sql: sql.to_string(), params, reply })
    }

    /// A structured request (`frontend::Request`): a subscription's hidden stream, a
    /// filtered read of a stream.
    pub fn request(&self, request: laminardb_engine::frontend::Request) -> Result<Outcome> {
        self.call(|reply| Command::Request { request, reply })
    }

    /// Casts `batches` to the source's schema (all or nothing), splits them by shard and
    /// stores them. Returns after every shard has acknowledged, so a later query sees them.
    pub fn insert(&self, source: &str, batches: &[RecordBatch]) -> Result<u64> {
        let born = std::time::Instant::now();
        let insert = self.prepare(source, batches)?;
        let sent = self.send_insert(insert, born)?;
        self.finish(sent, true).unwrap_or_else(|| Err(Error::internal("an insert was not answered")))
    }

    /// Casts `batches` to the source's schema (all or nothing) and splits them by shard:
    /// every error an insert's rows can cause, found before anything is sent.
    pub fn prepare(&self, source: &str, batches: &[RecordBatch]) -> Result<PreparedInsert> {
        let catalog = self.catalog();
        let def = catalog.source(source)?;
        let prepared = prepare_insert(def, batches, self.shards, self.max_event_ahead_ms)?;
        Ok(PreparedInsert { source: def.name.clone(), prepared })
    }

    /// Sends a prepared insert without waiting for it to be stored (`born`: when its first
    /// row was handed over, for the latency histograms); `finish` takes its answer.
    pub fn send_insert(&self, insert: PreparedInsert, born: std::time::Instant) -> Result<SentInsert> {
        let PreparedInsert { source, prepared: Prepared { parts, max_event_ms, future_rows } } = insert;
        let name = source.clone();
        let rx = self.send(|reply| Command::Insert { source: name, parts, max_event_ms, born, reply })?;
        Ok(SentInsert { rx, source, future_rows })
    }

    /// The answer of a sent insert: the rows stored, once every shard has them and every
    /// stream has passed them on. `wait = false`: `None` while it is not answered yet.
    pub fn finish(&self, sent: SentInsert, wait: bool) -> Option<Result<u64>> {
        let received = if wait {
            recv_spinning(&sent.rx, self.caller_spin)
        } else {
            try_take(&sent.rx)?
        };
        let rows = self.answer(received);
        if rows.is_ok() {
            count_future_rows(&self.outputs, &sent.source, sent.future_rows, self.max_event_ahead_ms);
        }
        Some(rows)
    }

    /// Whether a sent insert has its answer (`finish` would not wait).
    pub fn is_answered(&self, sent: &SentInsert) -> bool {
        !sent.rx.is_empty() || sent.rx.is_disconnected()
    }

    /// Every source's and stream's output (for their counters).
    pub fn outputs(&self) -> Vec<Arc<Output>> {
        self.outputs.read().values().cloned().collect()
    }

    /// The output of a source or stream, to subscribe to.
    pub fn output(&self, name: &str) -> Result<Arc<Output>> {
        self.outputs.read().get(name).cloned().ok_or_else(|| Error::table_not_found(name))
    }

    /// Per-shard (rows, bytes) retained for a source.
    pub fn stats(&self, source: &str) -> Result<Vec<RowStats>> {
        self.call(|reply| Command::Stats { source: source.to_string(), reply })
    }

    /// Moves `source`'s watermark to `mark` if that is later (`None`: only asks); returns
    /// the source's watermark.
    pub fn watermark(&self, source: &str, mark: Option<laminardb_engine::dataflow::Watermark>) -> Result<Option<laminardb_engine::dataflow::Watermark>> {
        self.call(|reply| Command::Watermark { source: source.to_string(), mark, reply })
    }

    /// Returns once everything accepted so far has passed through every stream.
    pub fn drain(&self) -> Result<()> {
        self.call(|reply| Command::Drain { reply, stop: false })
    }

    /// Drains, then stops the pipeline: later inserts and watermark calls (and `start()`)
    /// fail with `Shutdown` (901) instead of feeding streams whose outputs are closed.
    pub fn stop_pipeline(&self) -> Result<()> {
        self.call(|reply| Command::Drain { reply, stop: true })?;
        self.stopped.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether rows would be taken: the error they would get once the connection is
    /// closed or `stop_pipeline` has run.
    pub fn check_accepting(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::closed());
        }
        if self.stopped.load(Ordering::Acquire) {
            return Err(coordinator::stopped_error());
        }
        Ok(())
    }

    /// Starts the pipeline: generator sources begin producing.
    /// Takes a checkpoint (see `Coordinator::checkpoint`); returns its id.
    pub fn checkpoint(&self) -> Result<u64> {
        self.call(|reply| Command::Checkpoint { reply })
    }

    pub fn start(&self) -> Result<()> {
        self.call(|reply| Command::Start { reply })
    }

    /// Test hook: make a thread panic while handling a command.
    pub fn inject_panic(&self, site: PanicSite) -> Result<()> {
        self.call(|reply| Command::InjectPanic { site, reply })
    }

    /// Stops every thread and joins them. Idempotent.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (reply, rx) = reply_channel();
        // Sending wakes the coordinator from this thread, and that wake can land after the
        // coordinator has already seen the command; a wake queued to an executor that has
        // exited would pin its resources. So the coordinator waits for this second signal,
        // sent only after `send` (and its wake) has completed, before it exits.
        let (sent_tx, sent_rx) = std::sync::mpsc::sync_channel(1);
        if self.commands.send(Command::Shutdown { reply, sent: Some(sent_rx) }).is_ok() {
            let _ = sent_tx.send(());
            let _ = rx.recv();
        }
        if let Some(thread) = self.coordinator.lock().take() {
            let _ = thread.join();
        }
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Polls `rx` for up to `spin` before blocking: a sleeping thread takes tens of
/// microseconds to wake.
fn recv_spinning<T>(rx: &flume::Receiver<T>, spin: std::time::Duration) -> Result<T, flume::RecvError> {
    poll_for(spin, || try_take(rx)).unwrap_or_else(|| rx.recv())
}

/// What is waiting in `rx`: an item, the end of the channel, or (`None`) nothing yet. The
/// attempt of every poll of a flume queue (`recv_spinning`, the coordinator's commands).
pub(crate) fn try_take<T>(rx: &flume::Receiver<T>) -> Option<Result<T, flume::RecvError>> {
    match rx.try_recv() {
        Ok(v) => Some(Ok(v)),
        Err(flume::TryRecvError::Disconnected) => Some(Err(flume::RecvError::Disconnected)),
        Err(flume::TryRecvError::Empty) => None,
    }
}

/// An insert's rows as the coordinator takes them (`Command::Insert`): each batch cast to
/// the source's schema and split per shard, and the latest event time among them (epoch
/// ms; `None` without a watermark). Callers, the query pool's `INSERT … SELECT` and WAL
/// replay all prepare inserts here.
/// An insert cast, split by shard, with the event time that may move its source's
/// watermark.
pub(crate) struct Prepared {
    pub parts: Vec<Vec<RecordBatch>>,
    /// The largest event time among the rows, leaving out those more than the configured
    /// bound ahead of the wall clock.
    pub max_event_ms: Option<i64>,
    /// Rows left out of `max_event_ms` for being that far ahead.
    pub future_rows: u64,
}

pub(crate) fn prepare_insert(def: &SourceDef, batches: &[RecordBatch], shards: usize, max_ahead_ms: Option<u64>) -> Result<Prepared> {
    if let Some(lookup) = &def.lookup {
        return Err(Error::unsupported(format!(
            "inserting into the lookup table '{}': its rows are read from its {} connector; write them there",
            def.name,
            lookup.name()
        )));
    }
    let event_time = def.watermark.as_ref().and_then(|spec| def.schema.index_of(&spec.column).ok());
    // Read the clock only for a source with event time (not on every insert).
    let limit = event_time
        .and(max_ahead_ms)
        .map(|ahead| now_ms().saturating_add(i64::try_from(ahead).unwrap_or(i64::MAX)));
    let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); shards];
    let (mut max, mut future_rows) = (None, 0);
    for batch in batches {
        let batch = cast_to_schema(batch, &def.schema)?;
        if def.is_changelog() {
            // Rows inserted into a source of changes carry their change type, as its
            // connector's rows do; a reader could not apply any other.
            let ops = batch.column(batch.num_columns() - 1);
            change_signs(ops).map_err(|e| Error::ingestion(format!("'{}' takes changes: {}", def.name, e.message)))?;
        }
        if let Some(index) = event_time {
            let column = batch.column(index);
            match (max_millis(column)?, limit) {
                (Some(m), Some(limit)) if m > limit => {
                    let (below, above) = max_millis_below(column, limit)?;
                    max = max.max(below);
                    future_rows += above;
                }
                (m, _) => max = max.max(m),
            }
        }
        for (shard, part) in partition_batch(&batch, &def.partition_key, shards)?.into_iter().enumerate() {
            parts[shard].extend(part);
        }
    }
    Ok(Prepared { parts, max_event_ms: max, future_rows })
}

/// Counts rows an insert stored whose event time was too far ahead to move the
/// watermark; the first time for a source, says so in the log.
pub(crate) fn count_future_rows(outputs: &Outputs, source: &str, rows: u64, max_ahead_ms: Option<u64>) {
    if rows == 0 {
        return;
    }
    if let Some(output) = outputs.read().get(source) {
        if output.counters.future_rows.fetch_add(rows, std::sync::atomic::Ordering::Relaxed) == 0 {
            log::warn!(
                "'{source}': {rows} row(s) with an event time more than {} ms ahead of the clock: stored, \
                 but they do not move the watermark (a timestamp in the wrong unit?)",
                max_ahead_ms.unwrap_or(0)
            );
        }
    }
}

/// The affected-row count a DML result batch carries.
pub(crate) fn count_of(batch: &RecordBatch) -> Result<u64> {
    if batch.num_rows() == 0 {
        return Ok(0);
    }
    let col = batch.column(0);
    let counts = col
        .as_any()
        .downcast_ref::<UInt64Array>()
        .ok_or_else(|| Error::internal(format!("DML result column is {}, not UInt64", col.data_type())))?;
    Ok(counts.iter().flatten().sum())
}
