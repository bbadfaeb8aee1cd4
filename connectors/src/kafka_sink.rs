//! The `kafka` sink: each row of a stream as one record of a topic.
//!
//! ```sql
//! CREATE SINK bars_out FROM bars WITH (connector = 'kafka',
//!     'bootstrap.servers' = '127.0.0.1:9092', topic = 'bars', format = 'json',
//!     partitioner = 'key-hash', key = 'symbol', 'delivery.guarantee' = 'exactly-once')
//! ```
//!
//! `format`: `json` (an object per row, the default), `csv` (a line per row, in the
//! stream's column order) or `avro` (the Confluent Schema Registry's framing: the rows'
//! schema is registered at `schema.registry.url` under `schema.registry.subject`, by
//! default `<topic>-value`, when the first rows come; [`crate::avro`]). `partitioner`: `round-robin` (the default: partition after
//! partition), `key-hash` (by the `key` column's value as text, the first column without
//! one; the same hash as the Java client's, so a key lands where a Java producer would
//! put it) or `sticky` (librdkafka fills one partition for a while, then the next).
//!
//! `delivery.guarantee`:
//! - `at-least-once` (the default): records are sent as rows come; at each checkpoint
//!   barrier the sink waits until the broker has every one, and a failed delivery fails the
//!   checkpoint. After a crash the rows since the last checkpoint are sent again.
//! - `exactly-once`: each shard's records go into a Kafka transaction, committed at each
//!   checkpoint barrier (and at close), under the transactional id
//!   `<transactional.id.prefix>-<shard>` (prefix default `laminardb-<sink>`). A reopened
//!   sink's shard takes the same id, which aborts the transaction the dead process left
//!   open: a `read_committed` consumer sees each row once. The transaction is committed at
//!   the barrier, before the engine's checkpoint is on disk; a crash between the two (a few
//!   milliseconds) sends those rows again. Without checkpoints, records become visible at
//!   close.
//!
//! A full producer queue holds the shard back until the broker takes records (never a
//! dropped row).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use laminardb_engine::sink::{OptionsChecked, Sink, SinkContext};
use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

use crate::avro::{AvroEncoder, Registry};
use crate::encode::RowEncoding;
use crate::kafka_batch::{Outgoing, ProduceTopic, ANY_PARTITION};
use crate::kafka::{client_config, heard_client_context, kafka_error, partition_count, LastError, CLIENT_PREFIXES, REQUEST_TIMEOUT};

const OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "topic",
    "format",
    "schema.registry.url",
    "schema.registry.subject",
    "partitioner",
    "key",
    "delivery.guarantee",
    "transactional.id.prefix",
    "schema.registry.ssl.ca.location",
    "schema.registry.basic.auth.user.info",
];

/// How long a checkpoint waits for the broker to take every record sent before it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long librdkafka waits for its queue to empty before failures are served again.
const FLUSH_SLICE_MS: i32 = 10;

/// How many events one serving of the producer's queue takes at most.
const SERVED: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Partitioner {
    RoundRobin,
    KeyHash,
    Sticky,
}

/// Counts failed deliveries (reported by librdkafka's thread) and keeps the first, and
/// the client's last error.
#[derive(Default)]
pub(crate) struct Deliveries {
    failed: AtomicU64,
    first: Mutex<Option<String>>,
    errors: LastError,
}

heard_client_context!(Deliveries, errors);

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.first.lock().get_or_insert_with(|| e.to_string());
        }
    }
}

/// A producer whose failed deliveries are reported (and delivered ones not: their count
/// is the queue's), polled by its owner: at each send and while waiting for deliveries.
pub(crate) struct ReportingProducer(BaseProducer<Deliveries>);

impl ReportingProducer {
    /// A producer with `config` (`delivery.report.only.error` unless the config says).
    pub fn new(config: &mut ClientConfig) -> Result<ReportingProducer> {
        if config.get("delivery.report.only.error").is_none() {
            config.set("delivery.report.only.error", "true");
        }
        config.create_with_context(Deliveries::default()).map(ReportingProducer).map_err(|e| kafka_error("creating a producer", e))
    }

    pub fn producer(&self) -> &BaseProducer<Deliveries> {
        &self.0
    }

    /// Serves the producer's queue: failed deliveries and client errors, a few at a time
    /// (each event may report many records).
    pub fn serve(&self) {
        for _ in 0..SERVED {
            self.0.poll(Duration::ZERO);
        }
    }

    /// A delivery to `topic` failed since the last check: the error, said once.
    pub fn check(&self, topic: &str) -> Result<()> {
        let deliveries = self.0.context();
        let failed = deliveries.failed.swap(0, Ordering::Relaxed);
        if failed == 0 {
            return Ok(());
        }
        let first = deliveries.first.lock().take().unwrap_or_default();
        Err(Error::connector(format!("kafka: {failed} record(s) to '{topic}' were not delivered: {first}")))
    }

    /// Waits until the broker has every record sent so far to `topic` (or failed it;
    /// then the error). The crate's `flush` sleeps in 100 ms polls whenever a record is
    /// still in flight; librdkafka's own wait wakes when the last record is done, and
    /// failures are served between short waits.
    pub fn flush(&self, topic: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + FLUSH_TIMEOUT;
        let rk = self.0.client().native_ptr();
        loop {
            // SAFETY: a valid producer; librdkafka waits up to the slice for its queue to
            // empty.
            let err = unsafe { rdkafka::bindings::rd_kafka_flush(rk, FLUSH_SLICE_MS) };
            self.serve();
            match err {
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => return self.check(topic),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT if std::time::Instant::now() < deadline => {}
                err => {
                    self.check(topic)?;
                    let e = KafkaError::Flush(err.into());
                    return Err(self.0.context().errors.explain(kafka_error(&format!("waiting for the broker to take the records to '{topic}'"), e)));
                }
            }
        }
    }
}

struct Connected {
    /// Declared before `producer`, so dropped first.
    topic: ProduceTopic,
    producer: ReportingProducer,
    partitions: i32,
    /// Inside a transaction (exactly-once).
    transactional: bool,
}

/// How rows become records.
enum Payloads {
    Rows(RowEncoding),
    Avro(AvroEncoder),
}

pub struct KafkaSink {
    topic: String,
    payloads: Payloads,
    partitioner: Partitioner,
    key: Option<String>,
    next_partition: i32,
    client: Connected,
    /// Payload bytes sent.
    bytes: u64,
}

impl KafkaSink {
    /// One shard's instance of a `CREATE SINK … WITH (connector = 'kafka', …)`; at
    /// `CREATE` (no shard) only the options are checked.
    pub fn create(options: &ConnectorOptions, context: &SinkContext) -> Result<Box<dyn Sink>> {
        options.check_known_or_prefixed(OPTIONS, CLIENT_PREFIXES)?;
        let topic = options.required("topic")?.to_string();
        let mut config = client_config(options)?;
        let avro = options.get("format").is_some_and(|f| f.eq_ignore_ascii_case("avro"));
        let registry = if avro { Some(Registry::from_options(options)?) } else { None };
        if !avro {
            if options.get("schema.registry.url").is_some() {
                return Err(Error::connector("kafka sink: 'schema.registry.url' is for format = 'avro'"));
            }
            RowEncoding::parse(options.get("format"), "kafka")?;
        }
        let partitioner = match options.get("partitioner").unwrap_or("round-robin").to_ascii_lowercase().as_str() {
            "round-robin" | "round_robin" | "roundrobin" => Partitioner::RoundRobin,
            "key-hash" | "key_hash" | "hash" => Partitioner::KeyHash,
            "sticky" => Partitioner::Sticky,
            other => return Err(Error::connector(format!("kafka sink: partitioner '{other}' is not one of round-robin, key-hash, sticky"))),
        };
        let key = options.get("key").map(str::to_string);
        if key.is_some() && partitioner != Partitioner::KeyHash {
            return Err(Error::connector("kafka sink: option 'key' needs partitioner = 'key-hash'"));
        }
        let exactly_once = match options.get("delivery.guarantee").unwrap_or("at-least-once").to_ascii_lowercase().as_str() {
            "at-least-once" | "at_least_once" => false,
            "exactly-once" | "exactly_once" => true,
            other => {
                return Err(Error::connector(format!("kafka sink: delivery.guarantee '{other}' is not one of at-least-once, exactly-once")))
            }
        };
        if options.get("transactional.id.prefix").is_some() && !exactly_once {
            return Err(Error::connector("kafka sink: option 'transactional.id.prefix' needs delivery.guarantee = 'exactly-once'"));
        }
        let Some(task) = context.task else {
            // The check at CREATE: nothing is opened.
            return Ok(Box::new(OptionsChecked));
        };
        // The Java client's hash, so keys land where Java producers put them.
        config.set("partitioner", "murmur2_random");
        if exactly_once {
            let prefix = options.get("transactional.id.prefix").map_or_else(|| format!("laminardb-{}", context.name), str::to_string);
            config.set("transactional.id", format!("{prefix}-{}", task.shard));
        } else {
            config.set("enable.idempotence", config.get("enable.idempotence").unwrap_or("true").to_string());
        }
        if config.get("linger.ms").is_none() {
            config.set("linger.ms", "1");
        }
        let payloads = match registry {
            Some(registry) => {
                registry.check()?;
                let subject = options.get("schema.registry.subject").map_or_else(|| format!("{topic}-value"), str::to_string);
                Payloads::Avro(AvroEncoder::new(registry, subject))
            }
            None => Payloads::Rows(RowEncoding::parse(options.get("format"), "kafka")?),
        };
        let producer = ReportingProducer::new(&mut config)?;
        let partitions = partition_count(producer.producer().client(), &topic)? as i32;
        if !exactly_once && config.get("enable.idempotence") == Some("true") {
            // An idempotent producer asks for its producer id when a metadata response
            // comes, from a broker that is up. The first one's broker, the bootstrap
            // address, is dropped right after it for the broker it named; asked then,
            // none is up, and librdkafka asks again 500 ms later, holding back every
            // record until then (in about half the opens measured: perf/README.md,
            // session 24). This second request is answered
            // by the named broker, once up, and the id is asked for at once.
            partition_count(producer.producer().client(), &topic)?;
        }
        let handle = ProduceTopic::new(producer.producer().client(), &topic).map_err(|e| Error::connector(format!("kafka sink: topic '{topic}': {e}")))?;
        if exactly_once {
            // Takes over the id: a transaction left open by a dead process is aborted.
            producer.producer().init_transactions(REQUEST_TIMEOUT).map_err(|e| kafka_error("starting transactions", e))?;
            producer.producer().begin_transaction().map_err(|e| kafka_error("beginning a transaction", e))?;
        }
        Ok(Box::new(KafkaSink {
            topic,
            payloads,
            partitioner,
            key,
            next_partition: task.shard as i32 % partitions.max(1),
            client: Connected { topic: handle, producer, partitions, transactional: exactly_once },
            bytes: 0,
        }))
    }

    /// The keys of `batch`'s rows (`key-hash`): the key column's values as text.
    fn keys(&self, batch: &RecordBatch) -> Result<Option<StringArray>> {
        if self.partitioner != Partitioner::KeyHash {
            return Ok(None);
        }
        let column = match &self.key {
            Some(name) => batch
                .column_by_name(name)
                .ok_or_else(|| Error::connector(format!("kafka sink: the key column '{name}' is not one of the rows' columns")))?,
            None => batch.column(0),
        };
        let text = cast(column, &DataType::Utf8)?;
        Ok(Some(text.as_any().downcast_ref::<StringArray>().cloned().ok_or_else(|| Error::internal("a cast to text"))?))
    }

    /// Everything sent so far is with the broker (at-least-once) or committed
    /// (exactly-once; a new transaction begins).
    fn deliver(&mut self) -> Result<()> {
        let reporting = &self.client.producer;
        reporting.flush(&self.topic)?;
        if self.client.transactional {
            let producer = reporting.producer();
            producer.commit_transaction(FLUSH_TIMEOUT).map_err(|e| kafka_error("committing the transaction", e))?;
            reporting.check(&self.topic)?;
            producer.begin_transaction().map_err(|e| kafka_error("beginning a transaction", e))?;
        }
        Ok(())
    }
}

impl Sink for KafkaSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.client.producer.serve();
        self.client.producer.check(&self.topic)?;
        let payloads = match &mut self.payloads {
            Payloads::Rows(encoding) => encoding.encode(batch)?,
            Payloads::Avro(encoder) => encoder.encode(batch)?,
        };
        let keys = self.keys(batch)?;
        // The rows by partition, in order within each; the last bucket is left to
        // librdkafka's partitioner (sticky, or key-hash with a NULL key).
        let partitions = self.client.partitions.max(1);
        let any = partitions as usize;
        let first = self.next_partition as usize;
        let mut buckets: Vec<Vec<Outgoing<'_>>> = (0..=any).map(|_| Vec::new()).collect();
        for (i, payload) in payloads.iter().enumerate() {
            self.bytes += payload.len() as u64;
            let key = keys.as_ref().filter(|k| k.is_valid(i)).map(|k| k.value(i).as_bytes());
            let bucket = match (key, self.partitioner) {
                (Some(key), _) => self.client.topic.murmur2(key, partitions) as usize,
                (None, Partitioner::RoundRobin) => (first + i) % any,
                (None, _) => any,
            };
            buckets[bucket].push(Outgoing { key, payload });
        }
        if self.partitioner == Partitioner::RoundRobin {
            self.next_partition = ((first + payloads.len()) % any) as i32;
        }
        for (bucket, records) in buckets.iter().enumerate() {
            let partition = if bucket == any { ANY_PARTITION } else { bucket as i32 };
            let mut rest = &records[..];
            while !rest.is_empty() {
                let taken = self
                    .client
                    .topic
                    .produce(partition, rest)
                    .map_err(|e| Error::connector(format!("kafka sink: sending records to '{}': {e}", self.topic)))?;
                rest = &rest[taken..];
                if !rest.is_empty() {
                    // Backpressure: the producer's queue is full; wait for the broker
                    // to take some.
                    std::thread::sleep(Duration::from_millis(1));
                    self.client.producer.serve();
                    self.client.producer.check(&self.topic)?;
                }
            }
        }
        Ok(())
    }

    fn bytes_out(&self) -> u64 {
        self.bytes
    }

    fn checkpoint(&mut self, _id: u64) -> Result<()> {
        self.deliver()
    }

    fn flush(&mut self) -> Result<()> {
        if self.client.transactional {
            // Records become visible only at a commit (a checkpoint, or close).
            return Ok(());
        }
        self.deliver()
    }

    fn close(&mut self) -> Result<()> {
        self.deliver()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use laminardb_engine::dataflow::TaskInfo;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Offset, TopicPartitionList};

    fn sink(servers: &str, shard: Option<usize>, extra: &[(&str, &str)]) -> Result<Box<dyn Sink>> {
        let raw: BTreeMap<String, String> =
            [("bootstrap.servers", servers), ("topic", "out")].iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let task = shard.map(|shard| TaskInfo { shard, shards: 2 });
        KafkaSink::create(&ConnectorOptions::for_sink("kafka", &raw)?, &SinkContext { name: "s", task })
    }

    fn batch(symbols: &[&str], values: &[i64]) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("symbol", Arc::new(StringArray::from(symbols.to_vec())) as _),
            ("v", Arc::new(Int64Array::from(values.to_vec())) as _),
        ])
        .unwrap()
    }

    /// Every record of `partitions` partitions of `out` as (partition, key, payload).
    fn records(servers: &str, partitions: i32, committed_only: bool) -> Vec<(i32, Option<String>, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("group.id", "check")
            .set("isolation.level", if committed_only { "read_committed" } else { "read_uncommitted" })
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset("out", p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
                out.push((m.partition(), text(m.key()), text(m.payload()).unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn options_are_checked_and_create_opens_nothing() {
        let e = |extra: &[(&str, &str)]| sink("127.0.0.1:1", None, extra).err().unwrap().message;
        assert!(e(&[("partitioner", "lunar")]).contains("'lunar'"));
        assert!(e(&[("delivery.guarantee", "maybe")]).contains("'maybe'"));
        assert!(e(&[("key", "symbol")]).contains("needs partitioner = 'key-hash'"));
        assert!(e(&[("format", "avro")]).contains("needs the option 'schema.registry.url'"));
        assert!(e(&[("schema.registry.url", "http://r")]).contains("is for format = 'avro'"));
        assert!(e(&[("linger", "5")]).contains("no option 'linger'"));
        // No broker at that address: the check at CREATE does not connect.
        sink("127.0.0.1:1", None, &[("delivery.guarantee", "exactly-once")]).unwrap().close().unwrap();
    }

    #[test]
    fn rows_go_round_robin_or_by_key_and_are_delivered_at_the_checkpoint() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 2, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let mut s = sink(&servers, Some(0), &[]).unwrap();
        s.write(&batch(&["A", "B", "C"], &[1, 2, 3])).unwrap();
        s.checkpoint(1).unwrap();
        let got = records(&servers, 2, false);
        let expected = [(0, r#"{"symbol":"A","v":1}"#), (0, r#"{"symbol":"C","v":3}"#), (1, r#"{"symbol":"B","v":2}"#)];
        assert_eq!(got, expected.iter().map(|(p, j)| (*p, None, j.to_string())).collect::<Vec<_>>());
        s.close().unwrap();

        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 2, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let mut s = sink(&servers, Some(1), &[("partitioner", "key-hash"), ("key", "symbol"), ("format", "csv")]).unwrap();
        s.write(&batch(&["A", "B", "A", "B"], &[1, 2, 3, 4])).unwrap();
        s.close().unwrap();
        let got = records(&servers, 2, false);
        assert_eq!(got.len(), 4);
        for key in ["A", "B"] {
            let of: Vec<_> = got.iter().filter(|r| r.1.as_deref() == Some(key)).collect();
            assert_eq!(of.len(), 2);
            assert_eq!(of[0].0, of[1].0, "one key, one partition");
        }
        assert!(got.iter().any(|r| r.2 == "A,3"), "{got:?}");
    }

    /// Delivery reports come for failed records only; a failure is still counted, said
    /// at the checkpoint with the broker's reason, and the sink goes on afterwards.
    #[test]
    fn a_failed_delivery_fails_the_checkpoint_naming_why() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("out", 1, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let mut s = sink(&servers, Some(0), &[]).unwrap();
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
        s.write(&batch(&["A", "B"], &[1, 2])).unwrap();
        let e = s.checkpoint(1).unwrap_err().message;
        assert!(e.contains("2 record(s) to 'out' were not delivered") && e.contains("too large"), "{e}");
        s.write(&batch(&["C"], &[3])).unwrap();
        s.checkpoint(2).unwrap();
        s.close().unwrap();
        let got: Vec<String> = records(&servers, 1, false).into_iter().map(|r| r.2).collect();
        assert_eq!(got, [r#"{"symbol":"C","v":3}"#]);
    }

    /// Exactly-once: a shard's records go out through its transactional producer across
    /// checkpoints, and a successor opens under the same transactional id. librdkafka's
    /// mock cluster shows uncommitted records too and does not fence, so whether commits
    /// and aborts happen is checked against tansu, through the transaction markers
    /// (`test_kafka.py::test_exactly_once_…`), not here.
    #[test]
    fn exactly_once_sends_through_the_shards_transactional_producer_and_a_successor_takes_its_id() {
        let cluster = MockCluster::new(3).unwrap();
        cluster.create_topic("out", 1, 3).unwrap();
        let servers = cluster.bootstrap_servers();
        let eo = [("delivery.guarantee", "exactly-once")];
        let mut first = sink(&servers, Some(0), &eo).unwrap();
        first.write(&batch(&["A", "B"], &[1, 2])).unwrap();
        first.checkpoint(1).unwrap();
        first.close().unwrap();
        let mut second = sink(&servers, Some(0), &eo).unwrap();
        second.write(&batch(&["D"], &[4])).unwrap();
        second.checkpoint(2).unwrap();
        let seen: Vec<String> = records(&servers, 1, true).into_iter().map(|r| r.2).collect();
        assert_eq!(seen, [r#"{"symbol":"A","v":1}"#, r#"{"symbol":"B","v":2}"#, r#"{"symbol":"D","v":4}"#]);
        second.close().unwrap();
    }
}
