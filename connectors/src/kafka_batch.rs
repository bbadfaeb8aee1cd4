//! Records a batch at a time, both ways. A consumer's through librdkafka's
//! `rd_kafka_consume_batch_queue`: the `rdkafka` crate's `BaseConsumer::poll` takes one
//! record per call, each with a lock and clock reads of its own, which cost a fifth of a
//! shard's time in a Kafka pipeline (perf/README.md, session 18). A producer's through
//! `rd_kafka_produce_batch` ([`ProduceTopic`]).

use std::ffi::{c_int, c_void, CString};
use std::ptr::null_mut;

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// A record as librdkafka hands it over; its payload borrowed until the next `take`.
pub(crate) struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<&'a [u8]>,
    /// An error event instead of a record (`offset` and `payload` then mean nothing).
    pub error: Option<(rd::rd_kafka_resp_err_t, String)>,
}

/// A consumer's queue, read in batches: its own (events and the records of partitions
/// not split off) or one partition's. Must be dropped before its consumer.
pub(crate) struct BatchQueue {
    queue: *mut rd::rd_kafka_queue_t,
    taken: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: librdkafka's queues may be used from any thread; the messages taken are owned
// here until `release`, whichever thread calls it.
unsafe impl Send for BatchQueue {}

impl BatchQueue {
    /// The consumer's own queue.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<BatchQueue> {
        // SAFETY: the client pointer is valid while `consumer` lives; the queue handle
        // returned is owned here and destroyed in `drop`, before the consumer.
        let queue = unsafe { rd::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        (!queue.is_null()).then(|| BatchQueue { queue, taken: Vec::new() })
    }

    /// The queue of `partition` of `topic`, split off the consumer's own: the records of
    /// that partition fetched from now on come here only. Split before the partition is
    /// assigned (librdkafka then leaves the split in place when it starts fetching).
    pub fn partition<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &CString, partition: i32) -> Option<BatchQueue> {
        // SAFETY: as in `new`; the topic name is a NUL-terminated string librdkafka only
        // reads. Forwarding to null detaches the partition's queue from the consumer's.
        let queue = unsafe { rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), topic.as_ptr(), partition) };
        if queue.is_null() {
            return None;
        }
        // SAFETY: `queue` is the valid handle just returned.
        unsafe { rd::rd_kafka_queue_forward(queue, null_mut()) };
        Some(BatchQueue { queue, taken: Vec::new() })
    }

    /// Calls `each` on up to `max` records (or error events) waiting now, without waiting.
    pub fn take(&mut self, max: usize, mut each: impl FnMut(Record<'_>)) -> usize {
        self.release();
        self.taken.resize(max.max(1), null_mut());
        // SAFETY: `taken` has room for `max` pointers; librdkafka fills `n` of them with
        // messages we own until `rd_kafka_message_destroy` (in `release`).
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue, 0, self.taken.as_mut_ptr(), self.taken.len()) };
        let n = usize::try_from(n).unwrap_or(0);
        self.taken.truncate(n);
        for &m in &self.taken {
            // SAFETY: `m` is a message librdkafka gave us and we have not destroyed yet;
            // its payload lives as long as it does.
            let record = unsafe {
                let m = &*m;
                let error = (m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| (m.err, error_text(m.err)));
                let payload =
                    (!m.payload.is_null()).then(|| std::slice::from_raw_parts(m.payload as *const u8, m.len));
                Record { partition: m.partition, offset: m.offset, payload, error }
            };
            each(record);
        }
        n
    }

    /// Gives the messages of the last `take` back to librdkafka.
    fn release(&mut self) {
        for m in self.taken.drain(..) {
            // SAFETY: each was handed to us by `rd_kafka_consume_batch_queue` and is
            // destroyed once.
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

impl Drop for BatchQueue {
    fn drop(&mut self) {
        self.release();
        // SAFETY: the handle from `rd_kafka_queue_get_consumer`, destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(self.queue) };
    }
}

/// One record for [`ProduceTopic::produce`]: its key and payload, copied by librdkafka.
pub(crate) struct Outgoing<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// A producer's handle on one topic, to enqueue records a partition's batch at a time
/// (librdkafka's `rd_kafka_produce_batch`): one topic lock, one partition lookup and one
/// clock read per batch, where the `rdkafka` crate's `send` takes them per record (and a
/// copy of the topic's name). Must be dropped before its producer (a field declared
/// before it).
pub(crate) struct ProduceTopic {
    topic: *mut rd::rd_kafka_topic_t,
    messages: Vec<rd::rd_kafka_message_t>,
}

// SAFETY: librdkafka's topic handles may be used from any thread; `messages` is only
// scratch space, its pointers valid during one `produce` call.
unsafe impl Send for ProduceTopic {}

/// librdkafka's "let the partitioner choose" partition.
pub(crate) const ANY_PARTITION: i32 = -1;

impl ProduceTopic {
    pub fn new<C: ClientContext>(client: &Client<C>, topic: &str) -> Result<ProduceTopic, String> {
        let name = CString::new(topic).map_err(|_| format!("the topic name '{topic}' holds a NUL byte"))?;
        // SAFETY: a valid client and name; a null configuration takes the client's
        // default topic configuration (which holds the partitioner). The handle is owned
        // here and destroyed in `drop`.
        let handle = unsafe { rd::rd_kafka_topic_new(client.native_ptr(), name.as_ptr(), null_mut()) };
        if handle.is_null() {
            // SAFETY: reads this thread's last librdkafka error.
            let code = unsafe { rd::rd_kafka_last_error() };
            return Err(error_text(code));
        }
        Ok(ProduceTopic { topic: handle, messages: Vec::new() })
    }

    /// The partition of `key` among `partitions` by librdkafka's `murmur2_random`
    /// partitioner: the Java client's hash, so a key lands where a Java producer puts it.
    pub fn murmur2(&self, key: &[u8], partitions: i32) -> i32 {
        // SAFETY: the partitioner only hashes `key` (valid for `key.len()` bytes); the
        // topic handle is valid and the opaques unused.
        unsafe {
            rd::rd_kafka_msg_partitioner_murmur2_random(
                self.topic,
                key.as_ptr().cast(),
                key.len(),
                partitions,
                null_mut(),
                null_mut(),
            )
        }
    }

    /// Enqueues `records` for `partition` (or [`ANY_PARTITION`]), in order. Returns how
    /// many were taken from the front: fewer than all when the producer's queue is full
    /// (the caller waits and offers the rest again). Any other refusal is an error.
    pub fn produce(&mut self, partition: i32, records: &[Outgoing<'_>]) -> Result<usize, String> {
        self.messages.clear();
        self.messages.extend(records.iter().map(|r| {
            let (key, key_len) = r.key.map_or((null_mut(), 0), |k| (k.as_ptr() as *mut c_void, k.len()));
            rd::rd_kafka_message_t {
                err: rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                rkt: null_mut(),
                partition,
                payload: r.payload.as_ptr() as *mut c_void,
                len: r.payload.len(),
                key,
                key_len,
                offset: 0,
                _private: null_mut(),
            }
        }));
        // SAFETY: `messages` holds `len` initialized entries whose key and payload
        // pointers borrow `records`, alive for this call; RD_KAFKA_MSG_F_COPY makes
        // librdkafka copy them, so nothing is borrowed after it returns. A null
        // `_private` is the `()` delivery opaque the producer's context expects.
        unsafe {
            rd::rd_kafka_produce_batch(
                self.topic,
                partition,
                rd::RD_KAFKA_MSG_F_COPY,
                self.messages.as_mut_ptr(),
                self.messages.len() as c_int,
            )
        };
        let full = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__QUEUE_FULL;
        let mut taken = self.messages.len();
        for (i, m) in self.messages.iter().enumerate() {
            match m.err {
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => {}
                err if err == full => {
                    // librdkafka refuses every record after the first that found the
                    // queue full.
                    taken = taken.min(i);
                }
                err => return Err(error_text(err)),
            }
        }
        Ok(taken)
    }
}

impl Drop for ProduceTopic {
    fn drop(&mut self) {
        // SAFETY: the handle from `rd_kafka_topic_new`, destroyed once.
        unsafe { rd::rd_kafka_topic_destroy(self.topic) };
    }
}

fn error_text(code: rd::rd_kafka_resp_err_t) -> String {
    // SAFETY: librdkafka's static description of an error code.
    unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_err2str(code)).to_string_lossy().into_owned() }
}
