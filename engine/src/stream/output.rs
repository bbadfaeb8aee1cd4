//! Where a source's or stream's batches go when they are emitted: every subscriber's
//! bounded queue. Publishing never blocks the shard that emits: a subscriber whose queue
//! is full loses its oldest batch, which is counted (`lagged_batches`) for it and for the
//! stream, so a slow reader costs bounded memory and shows up in the metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use hdrhistogram::Histogram;
use parking_lot::RwLock;

use super::time::now_ms;

/// Batches a subscriber may have waiting before its oldest is dropped.
pub const SUBSCRIBER_BATCHES_MAX: usize = 4096;

struct Subscriber {
    id: u64,
    tx: flume::Sender<RecordBatch>,
    /// A receiver kept by the publisher to drop the oldest batch of a full queue.
    evict: flume::Receiver<RecordBatch>,
    lag: Arc<Lag>,
}

/// What a slow subscriber lost.
#[derive(Default)]
pub struct Lag {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
}

/// The receiving end of one subscription. The queue ends (after what it holds) when the
/// subscription is cancelled or its output closed.
pub struct Subscription {
    pub batches: flume::Receiver<RecordBatch>,
    pub lag: Arc<Lag>,
    pub output: Arc<Output>,
    id: u64,
}

impl Subscription {
    pub fn cancel(&self) {
        self.output.unsubscribe(self.id);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel();
    }
}

pub struct OutputCounters {
    pub rows: AtomicU64,
    pub batches: AtomicU64,
    pub lagged_batches: AtomicU64,
    /// Input rows a windowed operator dropped because they arrived too late.
    pub late_rows: AtomicU64,
    /// The stream's watermark (epoch ms), as its operators last reported it.
    pub watermark: std::sync::atomic::AtomicI64,
    /// A source's rows whose event time was too far ahead of the clock to move its
    /// watermark (`EngineConfig::max_event_ahead_ms`); stored all the same.
    pub future_rows: AtomicU64,
    /// Errors the stream met (each counted once, however many rows it concerned).
    pub errors: AtomicU64,
    /// Input rows the stream's expressions failed on (a division by zero, a failed cast):
    /// rejected, while the batch's other rows went on.
    pub rejected_rows: AtomicU64,
    pub last_error: parking_lot::Mutex<Option<String>>,
    /// End-to-end latency of the stream's emissions: from the insert (or watermark) call
    /// that caused each batch entering the engine to the batch being handed to the
    /// subscribers, in nanoseconds.
    pub latency: parking_lot::Mutex<Histogram<u64>>,
}

impl Default for OutputCounters {
    fn default() -> Self {
        OutputCounters {
            rows: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            lagged_batches: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            watermark: std::sync::atomic::AtomicI64::new(i64::MIN),
            future_rows: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected_rows: AtomicU64::new(0),
            last_error: parking_lot::Mutex::new(None),
            latency: parking_lot::Mutex::new(
                Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

/// Latencies above this (a minute) are recorded as this.
const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// The fan-out point of one named source or stream.
pub struct Output {
    pub name: String,
    pub schema: SchemaRef,
    subscribers: RwLock<Vec<Subscriber>>,
    pub counters: OutputCounters,
    /// Each shard's watermark of this stream; `counters.watermark` is their minimum.
    shard_marks: parking_lot::Mutex<Vec<i64>>,
    /// When rows or a watermark last arrived (ms since the Unix epoch), for idleness.
    last_active_ms: std::sync::atomic::AtomicI64,
    closed: AtomicBool,
    next_id: AtomicU64,
}

impl Output {
    pub fn new(name: impl Into<String>, schema: SchemaRef) -> Arc<Output> {
        Arc::new(Output {
            name: name.into(),
            schema,
            subscribers: RwLock::new(Vec::new()),
            counters: OutputCounters::default(),
            shard_marks: parking_lot::Mutex::new(Vec::new()),
            last_active_ms: std::sync::atomic::AtomicI64::new(now_ms()),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        })
    }

    pub fn subscribe(self: &Arc<Self>, capacity: usize) -> Subscription {
        let (tx, rx) = flume::bounded(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lag = Arc::new(Lag::default());
        let mut subscribers = self.subscribers.write();
        if !self.closed.load(Ordering::Acquire) {
            subscribers.push(Subscriber { id, tx, evict: rx.clone(), lag: lag.clone() });
        }
        Subscription { batches: rx, lag, output: self.clone(), id }
    }

    fn unsubscribe(&self, id: u64) {
        self.subscribers.write().retain(|s| s.id != id);
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.read().len()
    }

    /// Batches waiting in subscriber queues.
    pub fn pending_batches(&self) -> usize {
        self.subscribers.read().iter().map(|s| s.tx.len()).sum()
    }

    pub fn has_subscribers(&self) -> bool {
        !self.subscribers.read().is_empty()
    }

    /// Hands `batch` to every subscriber; never blocks.
    pub fn publish(&self, batch: &RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        self.counters.rows.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        let subscribers = self.subscribers.read();
        for s in subscribers.iter() {
            let mut item = batch.clone();
            loop {
                match s.tx.try_send(item) {
                    Ok(()) => break,
                    Err(flume::TrySendError::Full(back)) => {
                        item = back;
                        if let Ok(old) = s.evict.try_recv() {
                            s.lag.batches.fetch_add(1, Ordering::Relaxed);
                            s.lag.rows.fetch_add(old.num_rows() as u64, Ordering::Relaxed);
                            self.counters.lagged_batches.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(flume::TrySendError::Disconnected(_)) => break,
                }
            }
        }
    }

    /// Ends every subscription (the stream was dropped or the database closed): readers
    /// drain what is queued, then see the end.
    pub fn close(&self) {
        let mut subscribers = self.subscribers.write();
        self.closed.store(true, Ordering::Release);
        subscribers.clear();
    }

    /// Input rows this stream dropped: too late for their windows, or rejected by its
    /// expressions (`total_events_dropped` sums this over streams).
    pub fn dropped_rows(&self) -> u64 {
        self.counters.late_rows.load(Ordering::Relaxed) + self.counters.rejected_rows.load(Ordering::Relaxed)
    }

    pub fn record_error(&self, message: &str) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        *self.counters.last_error.lock() = Some(message.to_string());
        log::warn!("stream '{}': {message}", self.name);
    }

    /// Rows or a watermark arrived now (sources only: idleness is a source's property).
    pub fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since rows or a watermark last arrived (since creation if never).
    pub fn idle_ms(&self) -> i64 {
        now_ms().saturating_sub(self.last_active_ms.load(Ordering::Relaxed)).max(0)
    }

    /// Shard `shard` of `shards` has moved this stream's watermark to `mark`: the
    /// stream's watermark is what every shard has passed.
    pub fn shard_watermark(&self, shard: usize, shards: usize, mark: i64) {
        let mut marks = self.shard_marks.lock();
        if marks.len() < shards {
            marks.resize(shards, i64::MIN);
        }
        marks[shard] = marks[shard].max(mark);
        let min = marks.iter().copied().min().unwrap_or(i64::MIN);
        self.counters.watermark.fetch_max(min, Ordering::Relaxed);
    }

    /// Records that a batch this output published was caused by work that entered the
    /// engine at `since`.
    pub fn record_latency(&self, since: std::time::Instant) {
        let ns = (since.elapsed().as_nanos() as u64).clamp(1, LATENCY_MAX_NS);
        self.counters.latency.lock().saturating_record(ns);
    }

    pub fn latency(&self) -> LatencySummary {
        let h = self.counters.latency.lock();
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(v: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
    }

    #[test]
    fn every_subscriber_gets_every_batch_and_a_full_queue_drops_its_oldest() {
        let out = Output::new("s", batch(0).schema());
        let a = out.subscribe(2);
        let b = out.subscribe(8);
        for v in 0..3 {
            out.publish(&batch(v));
        }
        assert_eq!(b.batches.len(), 3);
        assert_eq!(a.batches.len(), 2);
        assert_eq!(a.lag.batches.load(Ordering::Relaxed), 1);
        let first = a.batches.recv().unwrap();
        assert_eq!(first.column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0), 1);
        drop(b);
        assert_eq!(out.subscriber_count(), 1);
        out.close();
        assert!(a.batches.recv().is_ok());
        assert!(a.batches.recv().is_err(), "closed output ends the subscription after its queue");
    }

    #[test]
    fn latency_percentiles_come_from_the_recorded_samples() {
        let out = Output::new("s", batch(0).schema());
        assert_eq!(out.latency(), LatencySummary::default());
        for us in [10u64, 20, 30, 40, 1000] {
            out.counters.latency.lock().record(us * 1000).unwrap();
        }
        let l = out.latency();
        assert_eq!(l.count, 5);
        assert!((29.9..=30.1).contains(&l.p50_us), "{l:?}");
        assert!((999.0..=1001.0).contains(&l.max_us), "{l:?}");
        out.record_latency(std::time::Instant::now());
        assert_eq!(out.latency().count, 6);
    }
}
