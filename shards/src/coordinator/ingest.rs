//! The coordinator's ingest part: inserts and watermark calls sent into the shards in one
//! order (under the dispatch lock, which a checkpoint barrier also takes), sources'
//! watermarks (sent on only where a window or retention needs them) and idleness, and
//! connector sources started on `start()`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;

use laminardb_engine::dataflow::Watermark;
use laminardb_engine::wal::Record;
use laminardb_engine::{Error, ErrorCode, Result};

use super::Coordinator;
use crate::command::{Ack, AckToken, Reply, ShardCommand};

/// What enters the shards and in what order: inserts and watermark calls, sources'
/// watermarks and idleness, connector sources started.
pub(super) struct Ingest {
    pub(super) watermarks: RefCell<HashMap<String, Watermark>>,
    /// Inserts and watermarks still travelling through the shards.
    pub(super) inflight: Arc<AtomicUsize>,
    /// `start()` was called: connector sources read from creation on.
    pub(super) running: Cell<bool>,
    /// `shutdown()` stopped the pipeline: rows, watermarks and `start()` are refused.
    pub(super) stopped: Cell<bool>,
    /// Connector sources, and whether the shards have been told to read them.
    pub(super) connected: RefCell<HashMap<String, bool>>,
    /// Sources declared idle (`update_idleness`), until their next rows or watermark.
    pub(super) idle: RefCell<HashSet<String>>,
    pub(super) idle_timeout: std::time::Duration,
    /// `EngineConfig::max_event_ahead_ms`, for the inserts the coordinator prepares itself.
    pub(super) max_event_ahead_ms: Option<u64>,
    /// When `update_idleness` next looks for idle sources.
    pub(super) next_idle_check: Cell<Instant>,
    /// Each source's name and where its watermark goes, worked out from the catalog on the
    /// first insert after a catalog change (`flow`).
    pub(super) flows: RefCell<HashMap<String, Rc<Flow>>>,
    /// Held while an insert or a watermark call is sent to the shards (taken before its
    /// Ack exists), and by a checkpoint from its drain until every shard has written its
    /// part: nothing new enters the shards meanwhile.
    pub(super) dispatch_lock: futures::lock::Mutex<()>,
}

impl Ingest {
    pub(super) fn new(idle_timeout_ms: u64, max_event_ahead_ms: Option<u64>) -> Ingest {
        Ingest {
            watermarks: RefCell::new(HashMap::new()),
            inflight: Arc::new(AtomicUsize::new(0)),
            running: Cell::new(false),
            stopped: Cell::new(false),
            connected: RefCell::new(HashMap::new()),
            idle: RefCell::new(HashSet::new()),
            idle_timeout: std::time::Duration::from_millis(idle_timeout_ms),
            max_event_ahead_ms,
            next_idle_check: Cell::new(Instant::now()),
            flows: RefCell::default(),
            dispatch_lock: futures::lock::Mutex::new(()),
        }
    }
}

/// A source as inserts reach it, and where its watermark goes (`Coordinator::flow`).
pub(super) struct Flow {
    /// The source's name, shared by every command its inserts send to the shards.
    name: Arc<str>,
    /// A window downstream can close on it: the shards must hear it.
    matters: bool,
    /// The source drops rows by event time (`retention`): the shards must hear it too.
    retains: bool,
    /// Every stream downstream, whose watermark metric follows it otherwise.
    streams: Vec<String>,
}

pub(crate) fn stopped_error() -> Error {
    Error::new(
        ErrorCode::Shutdown,
        "the pipeline was shut down: it takes no more rows or watermarks (open the database again to go on)",
    )
}

impl Coordinator {
    /// `watermark(source, mark)` from a caller: logged, sent to every shard after the
    /// rows before it, answered with the source's watermark once it has passed through
    /// every stream. `None` only asks.
    pub(super) async fn watermark_call(&self, source: &str, asked: Option<Watermark>, reply: Reply<Option<Watermark>>) {
        let name = match self.ddl.catalog.borrow().source(source) {
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
        let _dispatching = self.ingest.dispatch_lock.lock().await;
        let moving = asked.filter(|m| self.ingest.watermarks.borrow().get(&name).is_none_or(|now| m > now));
        if let Some(moving) = moving {
            let record = |lsn| Record::Watermark { lsn, source: name.clone(), watermark: moving.ms() };
            if let Err(e) = self.log_control(record).await {
                let _ = reply.send(Err(e));
                return;
            }
        }
        // Answered once the watermark has passed through every stream.
        let mark = Arc::new(std::sync::atomic::AtomicI64::new(Watermark::ENCODED_NONE));
        let ack = Ack::new(&self.ingest.inflight, {
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

    /// `born`: when the work entered the engine, for the latency histograms (`None` for
    /// rows replayed from the WAL).
    pub(super) async fn insert(&self, source: &str, parts: Vec<Vec<RecordBatch>>, max_event_ms: Option<i64>, born: Option<Instant>, reply: Reply<u64>) {
        let (flow, watermark) = {
            let catalog = self.ddl.catalog.borrow();
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
        let _dispatching = self.ingest.dispatch_lock.lock().await;
        let ack = Ack::replying(born, &self.ingest.inflight, reply);
        self.update_idleness(&flow.name, &ack).await;
        let watermark = watermark.and_then(|mark| self.bump_watermark(&flow, mark));
        // While logging, each shard writes its rows to its WAL under one new lsn first.
        let with_rows = parts.iter().filter(|p| !p.is_empty()).count();
        let lsn = (self.durable.logging.get() && with_rows > 0).then(|| self.take_lsn());
        let claim = lsn.map(|lsn| {
            ack.logged(lsn, self.durable.frontier.clone());
            self.durable.frontier.claim()
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

    /// Starts the shards reading connector source `name`, once; returns when every shard
    /// has opened its readers, or with the first shard's reason it could not (the source
    /// may then be started again).
    pub(super) async fn start_source(&self, name: &str) -> Result<()> {
        match self.ingest.connected.borrow_mut().get_mut(name) {
            Some(started) if !*started => *started = true,
            _ => return Ok(()),
        }
        let catalog = self.ddl.catalog();
        let def = catalog.source(name)?;
        let Some(connector) = def.connector.clone() else { return Ok(()) };
        let delay_ms = def.watermark.as_ref().map_or(0, |w| w.delay_ms);
        let time_column = def.watermark.as_ref().and_then(|w| def.schema.index_of(&w.column).ok());
        let (source, idle_after): (Arc<str>, _) = (name.into(), self.ingest.idle_timeout);
        let opened = self
            .ask_shards(|_, reply| ShardCommand::StartSource {
                source: source.clone(),
                connector: connector.clone(),
                delay_ms,
                time_column,
                idle_after,
                reply,
            })
            .await;
        let opened = match opened {
            Ok(waits) => super::answers(waits).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = opened {
            self.ingest.connected.borrow_mut().insert(name.to_string(), false);
            return Err(Error::connector(format!("source '{name}' could not start: {}", e.message)));
        }
        Ok(())
    }

    /// Waits (bounded) until every accepted insert and watermark has passed through every
    /// stream, so a shutdown delivers everything it accepted.
    pub(super) async fn drain(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.ingest.inflight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            glommio::timer::sleep(std::time::Duration::from_micros(200)).await;
        }
    }

    /// Moves `source`'s watermark to `mark` if that is later, telling every shard (after the
    /// rows already sent to it). Returns the source's watermark.
    pub(super) async fn advance_watermark(&self, source: &Flow, mark: i64, ack: &AckToken) -> i64 {
        let Some(current) = self.bump_watermark(source, mark) else {
            return Watermark::encode(self.ingest.watermarks.borrow().get(&*source.name).copied());
        };
        self.tell_shards(ack, || ShardCommand::Watermark { source: source.name.clone(), watermark: current, ack: ack.clone() }).await;
        current
    }

    /// Moves the watermark of `flow`'s source forward to `mark`. Returns `Some(mark)` if it moved and a
    /// window downstream may care, so the shards must hear it; otherwise (no windowed
    /// stream downstream) only the metrics of the streams it feeds move, and the shards
    /// catch up when a stream is added (`AddStream::marks`).
    pub(super) fn bump_watermark(&self, flow: &Flow, mark: i64) -> Option<i64> {
        let source = &*flow.name;
        let moved = Watermark::decode(mark)?;
        {
            let mut marks = self.ingest.watermarks.borrow_mut();
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
    pub(super) fn flow(&self, source: &str) -> Rc<Flow> {
        if let Some(flow) = self.ingest.flows.borrow().get(source) {
            return flow.clone();
        }
        let catalog = self.ddl.catalog();
        let flow = Rc::new(Flow {
            name: source.into(),
            matters: catalog.watermark_matters(source),
            retains: catalog.sources.get(source).is_some_and(|s| s.retention().is_ok_and(|r| r.time_ms.is_some())),
            streams: catalog.downstream(source).iter().map(|s| s.name.clone()).collect(),
        });
        self.ingest.flows.borrow_mut().insert(source.to_string(), flow.clone());
        flow
    }

    /// `source` has rows or a watermark (called under the dispatch lock, before they are
    /// sent). Every other caller-fed source feeding a watermark-driven stream that has had
    /// neither for `idle_timeout_ms` is declared idle (looked for at most every half
    /// timeout), and `source` active again if it was idle: every shard hears it at this
    /// point of its command stream (`ShardRuntime::set_idle`). Idleness matters only while
    /// another source is active, which is exactly when this runs, so no timer is needed.
    pub(super) async fn update_idleness(&self, source: &Arc<str>, ack: &AckToken) {
        let now = Instant::now();
        if now >= self.ingest.next_idle_check.get() {
            self.ingest.next_idle_check.set(now + self.ingest.idle_timeout / 2);
            let timeout = i64::try_from(self.ingest.idle_timeout.as_millis()).unwrap_or(i64::MAX);
            let quiet: Vec<Arc<str>> = {
                let catalog = self.ddl.catalog();
                let outputs = self.outputs.read();
                let (idle, connected) = (self.ingest.idle.borrow(), self.ingest.connected.borrow());
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
                self.ingest.idle.borrow_mut().insert(name.to_string());
                log::debug!("source '{name}' is idle: streams reading it no longer wait for its watermark");
                self.send_idle(&name, true, ack).await;
            }
        }
        if self.ingest.idle.borrow().is_empty() || !self.ingest.idle.borrow_mut().remove(&**source) {
            return;
        }
        if let Some(output) = self.outputs.read().get(&**source) {
            output.touch();
        }
        self.send_idle(source, false, ack).await;
    }

    pub(super) async fn send_idle(&self, source: &Arc<str>, idle: bool, ack: &AckToken) {
        self.tell_shards(ack, || ShardCommand::Idle { source: source.clone(), idle, ack: ack.clone() }).await;
    }
}
