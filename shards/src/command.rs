//! Messages on the two hops: caller → coordinator ([`Command`]) and coordinator → shard
//! ([`ShardCommand`]). Replies travel on one-shot channels carried inside the message, so
//! a waiting caller is woken directly by whoever finishes the work.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
pub use datafusion::common::ScalarValue;
use parking_lot::Mutex;

use laminardb_engine::{Error, Result};

use crate::handle::Outcome;

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
    /// Rows already cast to the source's schema and split per shard by the caller.
    /// Rows already cast to the source's schema and split per shard by the caller.
    Insert { source: String, parts: Vec<Vec<RecordBatch>>, reply: Reply<u64> },
    Scan { source: String, shard: usize, reply: Reply<Vec<RecordBatch>> },
    /// Per-shard (rows, bytes) of a source.
    Stats { source: String, reply: Reply<Vec<(u64, u64)>> },
    Watermark { source: String, watermark_ms: i64, reply: Reply<i64> },
    InjectPanic { site: PanicSite, reply: Reply<()> },
    /// `sent` fires once the caller's `send` of this command has returned: see
    /// `Handle::close`.
    Shutdown { reply: Reply<()>, sent: Option<std::sync::mpsc::Receiver<()>> },
}

pub enum ShardCommand {
    Append { source: Arc<str>, batches: Vec<RecordBatch>, ack: Arc<AckLatch> },
    Scan { source: Arc<str>, reply: Reply<Vec<RecordBatch>> },
    Stats { source: Arc<str>, reply: Reply<(u64, u64)> },
    DropSource { source: Arc<str> },
    InjectPanic { reply: Reply<()> },
    Stop,
}

/// Counts down the shards taking part in one insert; the last one answers the caller.
pub struct AckLatch {
    remaining: AtomicUsize,
    rows: AtomicU64,
    error: Mutex<Option<Error>>,
    reply: Reply<u64>,
}

impl AckLatch {
    pub fn new(parts: usize, reply: Reply<u64>) -> Arc<Self> {
        Arc::new(AckLatch {
            remaining: AtomicUsize::new(parts),
            rows: AtomicU64::new(0),
            error: Mutex::new(None),
            reply,
        })
    }

    pub fn done(&self, result: Result<u64>) {
        match result {
            Ok(n) => {
                self.rows.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.error.lock().get_or_insert(e);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let outcome = match self.error.lock().take() {
                Some(e) => Err(e),
                None => Ok(self.rows.load(Ordering::Relaxed)),
            };
            let _ = self.reply.send(outcome);
        }
    }
}
