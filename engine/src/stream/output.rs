//! Where a source's or stream's batches go when they are emitted: every subscriber's
//! queue, bounded in batches and in bytes. Publishing never blocks the shard that emits: a
//! subscriber whose queue is full loses its oldest batches, which are counted
//! (`lagged_batches`) for it and for the stream, so a slow reader costs bounded memory and
//! shows up in the metrics.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use hdrhistogram::Histogram;
use parking_lot::RwLock;

use super::time::now_ms;
use crate::dataflow::Watermark;

/// Batches a subscriber may have waiting before its oldest is dropped.
pub const SUBSCRIBER_BATCHES_MAX: usize = 4096;
/// Bytes a subscriber may have waiting before its oldest batches are dropped (the
/// default of `LaminarConfig(subscriber_queue_bytes=…)`; sinks use it too). A batch larger
/// than this on its own is still delivered, alone.
pub const SUBSCRIBER_BYTES_MAX: u64 = 64 << 20;

/// A queued batch and the bytes it was counted as.
type Queued = (RecordBatch, u64);

/// The bytes of `batch`'s rows: a slice of a larger batch counts its part of the
/// buffers, not all of them (inserts reach the shards as zero-copy slices).
pub fn batch_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| {
            let data = c.to_data();
            data.get_slice_memory_size().unwrap_or_else(|_| c.get_array_memory_size()) as u64
        })
        .sum()
}

struct Subscriber {
    id: u64,
    tx: flume::Sender<Queued>,
    /// A receiver kept by the publisher to drop the oldest batch of a full queue.
    evict: flume::Receiver<Queued>,
    lag: Arc<Lag>,
    notify: Arc<Notify>,
    /// Bytes queued (shared with the reader, who takes off what it receives).
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
}

impl Subscriber {
    /// Drops the oldest queued batch, counting it as lost; false if the queue was empty.
    fn evict_oldest(&self, counters: &OutputCounters) -> bool {
        let Ok((old, bytes)) = self.evict.try_recv() else { return false };
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.lag.batches.fetch_add(1, Ordering::Relaxed);
        self.lag.rows.fetch_add(old.num_rows() as u64, Ordering::Relaxed);
        counters.lagged_batches.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// The reading end of a subscriber's queue (cloneable; every clone reads the one queue).
#[derive(Clone)]
pub struct Queue {
    rx: flume::Receiver<Queued>,
    bytes: Arc<AtomicU64>,
}

impl Queue {
    fn took(&self, (batch, bytes): Queued) -> RecordBatch {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        batch
    }

    pub fn try_recv(&self) -> Result<RecordBatch, flume::TryRecvError> {
        self.rx.try_recv().map(|q| self.took(q))
    }

    pub fn recv(&self) -> Result<RecordBatch, flume::RecvError> {
        self.rx.recv().map(|q| self.took(q))
    }

    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Result<RecordBatch, flume::RecvTimeoutError> {
        self.rx.recv_timeout(timeout).map(|q| self.took(q))
    }

    /// Every batch until the queue ends.
    pub fn iter(&self) -> impl Iterator<Item = RecordBatch> + '_ {
        std::iter::from_fn(|| self.recv().ok())
    }

    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub fn is_disconnected(&self) -> bool {
        self.rx.is_disconnected()
    }

    /// Bytes waiting in the queue.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Wakes a reader that waits without a thread blocked on its queue (asyncio): a one-shot
/// callback the reader arms, run by whoever makes the queue ready, i.e. the publisher
/// after queueing a batch (on a shard thread: the callback must be cheap and must not
/// block) or whoever ends the queue. Unarmed, it costs a publish one atomic load.
#[derive(Default)]
pub struct Notify {
    armed: AtomicBool,
    slot: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Notify {
    /// Runs the armed callback, if any, once.
    fn fire(&self) {
        // Pairs with the fence in `Subscription::notify_when_ready`: either the reader
        // sees the batch queued before this, or this sees the callback armed.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let callback = {
            let mut slot = self.slot.lock();
            self.armed.store(false, Ordering::SeqCst);
            slot.take()
        };
        if let Some(callback) = callback {
            callback();
        }
    }
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
    pub batches: Queue,
    pub lag: Arc<Lag>,
    pub output: Arc<Output>,
    id: u64,
    notify: Arc<Notify>,
}

impl Subscription {
    pub fn cancel(&self) {
        self.output.unsubscribe(self.id);
    }

    /// Runs `callback` once, as soon as the queue holds a batch or has ended (at once if
    /// it already does). Arming again replaces a callback that has not run yet.
    pub fn notify_when_ready(&self, callback: Box<dyn FnOnce() + Send>) {
        {
            let mut slot = self.notify.slot.lock();
            *slot = Some(callback);
            self.notify.armed.store(true, Ordering::SeqCst);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.batches.is_empty() || self.batches.is_disconnected() {
            self.notify.fire();
        }
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
    /// Rows a join of the stream holds, per side, summed over the shards.
    pub join_rows: [std::sync::atomic::AtomicI64; 2],
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
    /// A sink's: the bytes its instances have put out (records' payloads, committed files).
    pub bytes: AtomicU64,
    /// A sink's: the latest checkpoint whose barrier one of its instances passed (every
    /// row before it delivered or committed), and when (epoch ms).
    pub last_commit: parking_lot::Mutex<Option<(u64, i64)>>,
}

impl Default for OutputCounters {
    fn default() -> Self {
        OutputCounters {
            rows: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            lagged_batches: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            join_rows: Default::default(),
            watermark: std::sync::atomic::AtomicI64::new(Watermark::ENCODED_NONE),
            future_rows: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected_rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_commit: parking_lot::Mutex::new(None),
            last_error: parking_lot::Mutex::new(None),
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
    /// Each shard's watermark of this stream (made on first use, with the shard count);
    /// `counters.watermark` is their minimum. Atomics: shards never wait for each other.
    shard_marks: OnceLock<Box<[AtomicI64]>>,
    /// End-to-end latency of the stream's emissions per shard (each written by its shard
    /// alone, merged when read): from the insert (or watermark) call that caused each
    /// batch entering the engine to the batch being handed to the subscribers, in ns.
    shard_latency: OnceLock<Box<[parking_lot::Mutex<Histogram<u64>>]>>,
    /// A connector source's readers' queues on each shard: (pending, capacity), each
    /// written by its shard alone (see `backlog`).
    shard_backlog: OnceLock<Box<[(AtomicU64, AtomicU64)]>>,
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
            shard_marks: OnceLock::new(),
            shard_backlog: OnceLock::new(),
            shard_latency: OnceLock::new(),
            last_active_ms: std::sync::atomic::AtomicI64::new(now_ms()),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        })
    }

    /// A new subscriber queue holding at most `capacity` batches and `max_bytes` bytes
    /// (`batch_bytes`; beyond either its oldest batches are dropped and counted).
    pub fn subscribe(self: &Arc<Self>, capacity: usize, max_bytes: u64) -> Subscription {
        let (tx, rx) = flume::bounded(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lag = Arc::new(Lag::default());
        let notify = Arc::new(Notify::default());
        let bytes = Arc::new(AtomicU64::new(0));
        let mut subscribers = self.subscribers.write();
        if !self.closed.load(Ordering::Acquire) {
            subscribers.push(Subscriber {
                id,
                tx,
                evict: rx.clone(),
                lag: lag.clone(),
                notify: notify.clone(),
                bytes: bytes.clone(),
                max_bytes,
            });
        }
        Subscription { batches: Queue { rx, bytes }, lag, output: self.clone(), id, notify }
    }

    fn unsubscribe(&self, id: u64) {
        let mut subscribers = self.subscribers.write();
        let Some(at) = subscribers.iter().position(|s| s.id == id) else { return };
        let gone = subscribers.swap_remove(at);
        drop(subscribers);
        end_queues(vec![gone]);
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
        if subscribers.is_empty() {
            return;
        }
        let bytes = batch_bytes(batch);
        for s in subscribers.iter() {
            // Room in bytes first: the oldest batches go until this one fits (or the
            // queue is empty: a batch over the bound on its own is still delivered).
            while s.bytes.load(Ordering::Relaxed).saturating_add(bytes) > s.max_bytes && s.evict_oldest(&self.counters) {}
            // Counted before it is queued: the reader takes it off once received.
            s.bytes.fetch_add(bytes, Ordering::Relaxed);
            let mut item = (batch.clone(), bytes);
            loop {
                match s.tx.try_send(item) {
                    Ok(()) => {
                        s.notify.fire();
                        break;
                    }
                    Err(flume::TrySendError::Full(back)) => {
                        item = back;
                        s.evict_oldest(&self.counters);
                    }
                    Err(flume::TrySendError::Disconnected(_)) => {
                        s.bytes.fetch_sub(bytes, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }

    /// Ends every subscription (the stream was dropped or the database closed): readers
    /// drain what is queued, then see the end.
    pub fn close(&self) {
        let mut subscribers = self.subscribers.write();
        self.closed.store(true, Ordering::Release);
        let gone = std::mem::take(&mut *subscribers);
        drop(subscribers);
        end_queues(gone);
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
    /// stream's watermark is what every shard has passed (the atomics hold encoded
    /// watermarks, `Watermark::encode`).
    pub fn shard_watermark(&self, shard: usize, shards: usize, mark: i64) {
        let marks = self.shard_marks.get_or_init(|| (0..shards.max(1)).map(|_| AtomicI64::new(Watermark::ENCODED_NONE)).collect());
        let Some(slot) = marks.get(shard) else { return };
        slot.fetch_max(mark, Ordering::Relaxed);
        let min = marks.iter().map(|m| m.load(Ordering::Relaxed)).min().unwrap_or(Watermark::ENCODED_NONE);
        self.counters.watermark.fetch_max(min, Ordering::Relaxed);
    }

    /// Shard `shard` of `shards` has `pending` messages waiting in its readers' queues of
    /// this (connector) source, which hold `capacity`.
    pub fn shard_backlog(&self, shard: usize, shards: usize, pending: u64, capacity: u64) {
        let slots = self.shard_backlog.get_or_init(|| (0..shards.max(1)).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect());
        if let Some((p, c)) = slots.get(shard) {
            p.store(pending, Ordering::Relaxed);
            c.store(capacity, Ordering::Relaxed);
        }
    }

    /// The source's readers' queues over every shard, (pending, capacity); `None` when
    /// no reader has said (a source Python inserts into, a file source).
    pub fn backlog(&self) -> Option<(u64, u64)> {
        let slots = self.shard_backlog.get()?;
        Some(slots.iter().fold((0, 0), |(p, c), (sp, sc)| (p + sp.load(Ordering::Relaxed), c + sc.load(Ordering::Relaxed))))
    }

    /// Records on shard `shard` of `shards` that a batch this output published was caused
    /// by work that entered the engine at `since`.
    pub fn record_latency(&self, shard: usize, shards: usize, since: std::time::Instant) {
        self.record_latency_ns(shard, shards, since.elapsed().as_nanos() as u64);
    }

    fn record_latency_ns(&self, shard: usize, shards: usize, ns: u64) {
        let ns = ns.clamp(1, LATENCY_MAX_NS);
        let histograms = self.shard_latency.get_or_init(|| {
            let new = || Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds");
            (0..shards.max(1)).map(|_| parking_lot::Mutex::new(new())).collect()
        });
        if let Some(h) = histograms.get(shard) {
            h.lock().saturating_record(ns);
        }
    }

    pub fn latency(&self) -> LatencySummary {
        let Some(histograms) = self.shard_latency.get() else { return LatencySummary::default() };
        let mut h = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid histogram bounds");
        for shard in histograms.iter() {
            let _ = h.add(&*shard.lock());
        }
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

/// Drops the senders of removed subscribers (their queues end once drained), then wakes
/// their readers, who find the end.
fn end_queues(gone: Vec<Subscriber>) {
    for s in gone {
        let notify = s.notify.clone();
        drop(s);
        notify.fire();
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
        let a = out.subscribe(2, SUBSCRIBER_BYTES_MAX);
        let b = out.subscribe(8, SUBSCRIBER_BYTES_MAX);
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

    fn counter() -> (Arc<AtomicU64>, Box<dyn Fn() -> Box<dyn FnOnce() + Send>>) {
        let fired = Arc::new(AtomicU64::new(0));
        let f = fired.clone();
        (fired, Box::new(move || {
            let f = f.clone();
            Box::new(move || {
                f.fetch_add(1, Ordering::SeqCst);
            })
        }))
    }

    #[test]
    fn an_armed_notifier_fires_once_on_a_batch_or_the_end() {
        let out = Output::new("s", batch(0).schema());
        let sub = out.subscribe(4, SUBSCRIBER_BYTES_MAX);
        let (fired, callback) = counter();
        sub.notify_when_ready(callback());
        assert_eq!(fired.load(Ordering::SeqCst), 0, "an empty queue does not fire");
        out.publish(&batch(1));
        out.publish(&batch(2));
        assert_eq!(fired.load(Ordering::SeqCst), 1, "fires once per arming");
        sub.notify_when_ready(callback());
        assert_eq!(fired.load(Ordering::SeqCst), 2, "a queue already holding a batch fires at once");
        while sub.batches.try_recv().is_ok() {}
        sub.notify_when_ready(callback());
        sub.notify_when_ready(callback());
        sub.cancel();
        assert_eq!(fired.load(Ordering::SeqCst), 3, "cancelling fires the one armed callback (re-arming replaced the first)");
        assert!(sub.batches.is_disconnected());

        let other = out.subscribe(4, SUBSCRIBER_BYTES_MAX);
        other.notify_when_ready(callback());
        out.close();
        assert_eq!(fired.load(Ordering::SeqCst), 4, "closing the output fires");
        let late = out.subscribe(4, SUBSCRIBER_BYTES_MAX);
        late.notify_when_ready(callback());
        assert_eq!(fired.load(Ordering::SeqCst), 5, "a subscription to a closed output is ready at once");
    }

    fn rows(n: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n as i64))]).unwrap()
    }

    #[test]
    fn a_queue_over_its_byte_bound_drops_its_oldest_batches() {
        let big = rows(1000); // 8,000 bytes
        assert_eq!(batch_bytes(&big), 8000);
        assert_eq!(batch_bytes(&big.slice(100, 10)), 80, "a slice counts its own rows");
        let out = Output::new("s", big.schema());
        let sub = out.subscribe(SUBSCRIBER_BATCHES_MAX, 20_000);
        let roomy = out.subscribe(SUBSCRIBER_BATCHES_MAX, SUBSCRIBER_BYTES_MAX);
        for _ in 0..5 {
            out.publish(&big);
        }
        assert_eq!(sub.batches.len(), 2, "two 8,000-byte batches fit in 20,000 bytes");
        assert_eq!(sub.batches.bytes(), 16_000);
        assert_eq!(sub.lag.batches.load(Ordering::Relaxed), 3);
        assert_eq!(sub.lag.rows.load(Ordering::Relaxed), 3000);
        assert_eq!(out.counters.lagged_batches.load(Ordering::Relaxed), 3);
        assert_eq!(roomy.batches.len(), 5);
        assert_eq!(roomy.lag.batches.load(Ordering::Relaxed), 0);
        sub.batches.recv().unwrap();
        assert_eq!(sub.batches.bytes(), 8000, "what the reader takes is taken off");
        out.publish(&big.slice(0, 100));
        assert_eq!((sub.batches.len(), sub.batches.bytes()), (2, 8800), "a small batch fits beside");

        let huge = rows(10_000);
        out.publish(&huge);
        assert_eq!(sub.batches.len(), 1, "a batch over the bound alone is delivered alone");
        assert_eq!(sub.batches.recv().unwrap().num_rows(), 10_000);
        assert_eq!(sub.lag.batches.load(Ordering::Relaxed), 5);
        assert_eq!(sub.batches.bytes(), 0);
    }

    #[test]
    fn latency_percentiles_come_from_the_recorded_samples() {
        let out = Output::new("s", batch(0).schema());
        assert_eq!(out.latency(), LatencySummary::default());
        // Two shards' samples, merged when read.
        for (shard, us) in [(0, 10u64), (1, 20), (0, 30), (1, 40), (0, 1000)] {
            out.record_latency_ns(shard, 2, us * 1000);
        }
        let l = out.latency();
        assert_eq!(l.count, 5);
        assert!((29.9..=30.1).contains(&l.p50_us), "{l:?}");
        assert!((999.0..=1001.0).contains(&l.max_us), "{l:?}");
        out.record_latency(1, 2, std::time::Instant::now());
        assert_eq!(out.latency().count, 6);
    }
}
