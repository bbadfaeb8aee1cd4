//! A consumer's records a batch at a time (librdkafka's `rd_kafka_consume_batch_queue`):
//! the `rdkafka` crate's `BaseConsumer::poll` takes one record per call, each with a lock
//! and clock reads of its own, which cost a fifth of a shard's time in a Kafka pipeline
//! (perf/README.md, session 18).

use std::ptr::null_mut;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A record as librdkafka hands it over; its payload borrowed until the next `take`.
pub(crate) struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<&'a [u8]>,
    /// An error event instead of a record (`offset` and `payload` then mean nothing).
    pub error: Option<(rd::rd_kafka_resp_err_t, String)>,
}

/// The consumer's queue, read in batches. Must be dropped before its consumer (a field
/// declared before it).
pub(crate) struct BatchQueue {
    queue: *mut rd::rd_kafka_queue_t,
    taken: Vec<*mut rd::rd_kafka_message_t>,
}

impl BatchQueue {
    pub fn new(consumer: &BaseConsumer) -> Option<BatchQueue> {
        // SAFETY: the client pointer is valid while `consumer` lives; the queue handle
        // returned is owned here and destroyed in `drop`, before the consumer.
        let queue = unsafe { rd::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        (!queue.is_null()).then(|| BatchQueue { queue, taken: Vec::new() })
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
                let error = (m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| {
                    let text = std::ffi::CStr::from_ptr(rd::rd_kafka_err2str(m.err)).to_string_lossy().into_owned();
                    (m.err, text)
                });
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
