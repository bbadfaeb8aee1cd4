//! Messages on the two hops: caller → coordinator ([`Command`]) and coordinator → shard
//! ([`ShardCommand`]). Replies travel on one-shot channels carried inside the message, so
//! a waiting caller is woken directly by whoever finishes the work.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
pub use datafusion::common::ScalarValue;
use parking_lot::Mutex;

use laminardb_engine::checkpoint::ShardFiles;
use laminardb_engine::dataflow::Watermark;
use laminardb_engine::frontend::Request;
use laminardb_engine::source::SourceConnector;
use laminardb_engine::stream::output::Output;
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::wal::{Claim, Frontier};
use laminardb_engine::{Error, Result};

use crate::handle::Outcome;
use crate::store::{RetainPolicy, RowStats};

pub type Reply<T> = flume::Sender<Result<T>>;

pub fn reply_channel<T>() -> (Reply<T>, flume::Receiver<Result<T>>) {
    flume::bounded(1)
}

/// Where a test wants a panic injected.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PanicSite {
    Coordinator,
    Shard,
}

pub enum Command {
    Execute { sql: String, params: Vec<ScalarValue>, reply: Reply<Vec<Outcome>> },
    /// A structured request of the binding (`frontend::Request`).
    Request { request: Request, reply: Reply<Outcome> },
    /// Rows already cast to the source's schema and split per shard by the caller.
    /// `born`: when the caller's insert call began (for the streams' latency histograms).
    Insert { source: String, parts: Vec<Vec<RecordBatch>>, max_event_ms: Option<i64>, born: Instant, reply: Reply<u64> },
    Scan { source: String, shard: usize, reply: Reply<Vec<RecordBatch>> },
    /// Per shard: the source's retained rows.
    Stats { source: String, reply: Reply<Vec<RowStats>> },
    /// Moves `source`'s watermark to `mark` if that is later (`None`: only asks); answered
    /// with the source's watermark once the move has passed through every stream.
    Watermark { source: String, mark: Option<Watermark>, reply: Reply<Option<Watermark>> },
    InjectPanic { site: PanicSite, reply: Reply<()> },
    /// Answers once every accepted insert and watermark has passed through every stream.
    /// Answered once everything accepted has passed through every stream; with `stop`,
    /// the pipeline then refuses rows and watermarks (`shutdown()`).
    Drain { reply: Reply<()>, stop: bool },
    /// The pipeline starts: connector sources begin reading.
    Start { reply: Reply<()> },
    /// Take a checkpoint now; answered with its id.
    Checkpoint { reply: Reply<u64> },
    /// `sent` fires once the caller's `send` of this command has returned: see
    /// `Handle::close`.
    Shutdown { reply: Reply<()>, sent: Option<std::sync::mpsc::Receiver<()>> },
}

pub enum ShardCommand {
    /// Rows for this shard (maybe none) and, when the insert moved the source's
    /// watermark, the new watermark, applied after the rows: one message per shard.
    /// `log`: the insert's (lsn, parts) when the rows go to this shard's WAL first (see
    /// `laminardb_engine::wal`); `None` without storage, and for rows replayed from the WAL.
    Append { source: Arc<str>, batches: Vec<RecordBatch>, watermark: Option<i64>, log: Option<(u64, u16, Claim)>, ack: AckToken },
    /// The source's watermark moved (epoch ms); follows the appends that moved it.
    Watermark { source: Arc<str>, watermark: i64, ack: AckToken },
    /// The coordinator declared the source idle (`idle: true`, see
    /// `ShardRuntime::set_idle`) or active again, between the same two inserts on every shard.
    Idle { source: Arc<str>, idle: bool, ack: AckToken },
    /// `marks`: every source's watermark, which shards may not have heard (see
    /// `Coordinator::bump_watermark`); applied before the stream is added. Answered once
    /// added: the coordinator sends nothing that could feed the stream until every shard
    /// has it, or a shard could receive its rows over the exchange before knowing it.
    /// With `plan.backfill`, the stream reads nothing and holds its watermarks until
    /// `Backfill`.
    AddStream { plan: Arc<StreamPlan>, output: Arc<Output>, marks: Vec<(Arc<str>, Watermark)>, reply: Reply<()> },
    /// Sent once every shard has added the stream: it reads the rows its inputs retain on
    /// this shard, then goes on with new ones, its watermarks released after those rows.
    Backfill { stream: Arc<str>, ack: AckToken },
    DropStream { name: Arc<str> },
    /// Processing-time tick of an `EMIT EVERY` stream.
    Tick { stream: Arc<str> },
    /// Start reading the splits of a connector source this shard owns, where the
    /// restored checkpoint left them; its watermark on this shard goes into the source's
    /// `Output::shard_watermark`. `time_column`: its event time (delay: the declared one).
    /// A split without rows for `idle_after` is idle: it holds no watermark back. The
    /// reply comes once the shard's readers are open (a server listening, a consumer
    /// assigned), or says why they could not open.
    StartSource {
        source: Arc<str>,
        connector: Arc<dyn SourceConnector>,
        delay_ms: i64,
        time_column: Option<usize>,
        idle_after: std::time::Duration,
        reply: Reply<()>,
    },
    Scan { source: Arc<str>, reply: Reply<Vec<RecordBatch>> },
    Stats { source: Arc<str>, reply: Reply<RowStats> },
    DropSource { source: Arc<str> },
    /// The source keeps only what `policy` retains (its `rows` is the whole source's
    /// `retention_rows`; each shard keeps its share).
    Retain { source: Arc<str>, policy: RetainPolicy },
    InjectPanic { reply: Reply<()> },
    /// The barrier of checkpoint `id`: sent to every shard at one point of the command
    /// stream (every insert is before it on all its shards or after it on all). The shard
    /// snapshots its rows and state, sends an [`Exchange::Marker`] to every peer, starts a
    /// new WAL segment, and answers once every peer's marker has arrived, with the
    /// exchange messages it received before them (see `ShardRuntime::begin_checkpoint`).
    Checkpoint { root: Arc<std::path::Path>, id: u64, reply: Reply<ShardFiles> },
    /// Load this shard's part of a checkpoint, after the catalog was rebuilt. Its recorded
    /// exchange messages wait for `ReplayChannel`.
    Restore { root: Arc<std::path::Path>, files: ShardFiles, reply: Reply<()> },
    /// Apply the exchange messages the restored checkpoint recorded; sent once every
    /// shard has restored its state, since they may route rows on to other shards.
    ReplayChannel { ack: AckToken },
    Stop,
}

/// Shard-to-shard messages of the exchange: rows for a keyed operator travelling to the
/// shard that owns their key, the watermarks that follow them on the same channel, and
/// checkpoint markers. Each sender's messages arrive in the order it sent them.
pub enum Exchange {
    /// `hashes`: the rows' key hashes (`partition::key_hashes`), for the owner's aggregate.
    /// Rows for port `port` of operator `node` of `stream`.
    Data { stream: Arc<str>, node: usize, port: usize, from: usize, batch: RecordBatch, hashes: Option<Vec<u64>>, ack: AckToken },
    Watermark { stream: Arc<str>, node: usize, port: usize, from: usize, watermark: Watermark, ack: AckToken },
    /// Every catalog input port `port` of operator `node` of `stream` depends on is idle on
    /// `from` (a connector source whose splits there have had no rows for the idle
    /// timeout), or active again: `from`'s slot of that port stops (or starts again)
    /// holding the merged watermark back.
    Idle { stream: Arc<str>, node: usize, port: usize, from: usize, idle: bool },
    /// `from` has snapshotted for the checkpoint in progress: what it sends after this is
    /// not in the checkpoint, what it sent before is in it (in its state or, if still in
    /// flight at the receiver's snapshot, in the receiver's recorded channel state).
    Marker { from: usize },
    /// The spill thread wrote `batches` (the oldest sealed ones) of `name` to `path`;
    /// `mapped`: the same rows read back from the memory-mapped file, or why not.
    Spilled { name: Arc<str>, epoch: u64, batches: usize, path: std::path::PathBuf, mapped: Result<Vec<RecordBatch>> },
    Stop,
}

impl Exchange {
    /// The shard that sent it (`None`: the spill thread's, or this shard's own `Stop`).
    pub fn sender(&self) -> Option<usize> {
        match self {
            Exchange::Data { from, .. } | Exchange::Watermark { from, .. } | Exchange::Idle { from, .. } | Exchange::Marker { from } => {
                Some(*from)
            }
            Exchange::Spilled { .. } | Exchange::Stop => None,
        }
    }
}

/// A spill for the spill thread, and where to report it done.
pub type SpillRequest = (crate::store::SpillJob, flume::Sender<Exchange>);

/// Tracks one piece of accepted work (an insert, a watermark) through every shard and
/// exchange hop it causes: each message carries a clone, and when the last clone is
/// dropped the work has passed through every stream and the caller is answered. This is
/// what makes an insert return only after its rows reached every subscriber.
pub struct Ack {
    /// When the work entered the engine (the caller's call), for latency histograms;
    /// `None` for work nobody waits on (ticks, generated rows).
    pub born: Option<Instant>,
    rows: AtomicU64,
    error: Mutex<Option<Error>>,
    answer: Mutex<Option<Answer>>,
    inflight: Arc<AtomicUsize>,
    /// The logged work's lsn, released from the acknowledged frontier when it succeeds.
    logged: Mutex<Option<(u64, Arc<Frontier>)>>,
}

/// Who hears when the work is done.
enum Answer {
    /// A caller waiting for the row count (an insert): its reply channel as is, without a
    /// boxed closure around it (one allocation fewer per insert).
    Rows(Reply<u64>),
    Call(Box<dyn FnOnce(Result<u64>) + Send>),
}

pub type AckToken = Arc<Ack>;

impl Ack {
    pub fn new(inflight: &Arc<AtomicUsize>, reply: impl FnOnce(Result<u64>) + Send + 'static) -> AckToken {
        Ack::born_at(Some(Instant::now()), inflight, reply)
    }

    /// Work that nobody waits on and whose latency is not measured.
    pub fn background() -> AckToken {
        Ack::born_at(None, &Arc::new(AtomicUsize::new(0)), |_| {})
    }

    pub fn born_at(born: Option<Instant>, inflight: &Arc<AtomicUsize>, reply: impl FnOnce(Result<u64>) + Send + 'static) -> AckToken {
        Ack::answering(born, inflight, Answer::Call(Box::new(reply)))
    }

    /// Work whose caller waits on `reply` for the number of rows it stored.
    pub fn replying(born: Option<Instant>, inflight: &Arc<AtomicUsize>, reply: Reply<u64>) -> AckToken {
        Ack::answering(born, inflight, Answer::Rows(reply))
    }

    fn answering(born: Option<Instant>, inflight: &Arc<AtomicUsize>, answer: Answer) -> AckToken {
        inflight.fetch_add(1, Ordering::AcqRel);
        Arc::new(Ack {
            born,
            rows: AtomicU64::new(0),
            error: Mutex::new(None),
            answer: Mutex::new(Some(answer)),
            inflight: inflight.clone(),
            logged: Mutex::new(None),
        })
    }

    pub fn add_rows(&self, n: u64) {
        self.rows.fetch_add(n, Ordering::Relaxed);
    }

    pub fn fail(&self, e: Error) {
        self.error.lock().get_or_insert(e);
    }

    /// The work was logged under `lsn`: once it succeeds everywhere, `frontier` hears it.
    pub fn logged(&self, lsn: u64, frontier: Arc<Frontier>) {
        *self.logged.lock() = Some((lsn, frontier));
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        // The last clone: nobody else can hold the locks.
        if let Some((lsn, frontier)) = self.logged.get_mut().take() {
            if self.error.get_mut().is_none() {
                frontier.done(lsn);
            }
        }
        if let Some(answer) = self.answer.get_mut().take() {
            let result = match self.error.get_mut().take() {
                Some(e) => Err(e),
                None => Ok(self.rows.load(Ordering::Relaxed)),
            };
            match answer {
                Answer::Rows(reply) => {
                    let _ = reply.send(result);
                }
                Answer::Call(call) => call(result),
            }
        }
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}
