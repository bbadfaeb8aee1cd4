//! The `kafka` source: a topic's records, one per row, decoded by `format`
//! ([`crate::decode`]: json, csv, raw, debezium; avro with `schema.registry.url`, [`crate::avro`]).
//!
//! ```sql
//! CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, ts TIMESTAMP) WITH (
//!     connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:9092', topic = 'trades',
//!     'group.id' = 'bars', format = 'json', 'auto.offset.reset' = 'earliest',
//!     watermark_column = 'ts', watermark_delay_ms = '1000')
//! ```
//!
//! Each partition is a split, so partition `p` is read by shard `p % shards` and its
//! watermark is its own (the engine merges them and leaves idle ones out). The source's
//! open splits share one librdkafka consumer ([`Reader`]), which fetches every partition
//! in one request per broker on its own threads; each partition's records come on a queue
//! of their own, and the shard owning it only takes what has arrived (a shard that does
//! not keep up stops taking, and the consumer stops fetching that partition once its
//! queue is full: backpressure).
//!
//! Partitions added to the topic while it is read are found within
//! `partition.discovery.interval.ms` (10 s; 0: never): a thread of the source counts them
//! while any of its partitions is open, and each new partition is read from its first
//! record by the shard that owns it.
//!
//! A split's position is the offset of the next record, recorded in the engine's
//! checkpoints: a reopened database reads on from there, so a record a checkpoint covered
//! is neither lost nor read twice. Without a position (a new database), a split starts at
//! the group's committed offset, else at `auto.offset.reset` (`earliest`, or `latest`,
//! the default). The start is resolved to a number when the split opens, so a checkpoint
//! never records "latest". The group's offsets are committed at each checkpoint and at
//! close, for lag monitoring and for the next database without a checkpoint; the engine's
//! positions always win over them.
//!
//! A record that does not decode (or has no payload) is left out, counted in the source's
//! errors and logged with its partition and offset; reading goes on. With `format =
//! 'debezium'` the source is a changelog (its rows end with `_op`, see `crate::decode`),
//! and a record without a payload is a tombstone, which holds no change.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use laminardb_engine::source::{offset_position, read_offset_position, Backlog, ConnectorOptions, SourceConnector, SplitPoll, SplitReader};
use laminardb_engine::{Error, Result};

use crate::dead_letter::{DeadLetterConfig, DeadLetters};
use crate::avro::Registry;
use crate::kafka_batch::BatchQueue;
use crate::decode::{PayloadDecoder, PayloadFormat};

/// Options of the source besides the client ones ([`CLIENT_PREFIXES`]).
const OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "topic",
    "group.id",
    "format",
    "schema.registry.url",
    "schema.registry.ssl.ca.location",
    "schema.registry.basic.auth.user.info",
    "auto.offset.reset",
    "max.poll.records",
    "dead_letter.path",
    "dead_letter.topic",
    "partition.discovery.interval.ms",
];

/// Options handed to librdkafka as they are (`kafka.` is stripped first: any librdkafka
/// property, e.g. `kafka.fetch.wait.max.ms`).
pub(crate) const CLIENT_PREFIXES: &[&str] = &["security.", "sasl.", "ssl.", "client.id", "isolation.level", "kafka."];

/// How long a metadata or offset request may take before the call fails.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a split without records waits before it is polled again.
const IDLE_POLL: Duration = Duration::from_millis(1);

/// How often the partition-counting thread looks whether any split is still open.
const READERS_CHECK: Duration = Duration::from_millis(100);

/// A split serves the consumer's own queue at least every this many polls (and whenever
/// its partition had nothing).
const EVENTS_EVERY: u32 = 16;

/// The client settings every Kafka client of a statement shares: the brokers and the
/// options passed through.
pub(crate) fn client_config(options: &ConnectorOptions) -> Result<ClientConfig> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", options.required("bootstrap.servers")?);
    for (key, value) in options.iter() {
        if let Some(rest) = key.strip_prefix("kafka.") {
            config.set(rest, value);
        } else if CLIENT_PREFIXES.iter().any(|p| key.starts_with(p)) {
            config.set(key, value);
        }
    }
    // librdkafka connects to a broker the first metadata named (after dropping the
    // bootstrap connection) no sooner than half of `reconnect.backoff.ms` after its
    // first connection: 50 ms of every client's start with its 100 ms, 11 ms with 20
    // (perf/README.md, session 24). The backoff after a failed connection still doubles
    // up to `reconnect.backoff.max.ms` (10 s).
    if config.get("reconnect.backoff.ms").is_none() {
        config.set("reconnect.backoff.ms", "20");
    }
    Ok(config)
}

/// A Kafka error as the engine's, saying what was being done.
pub(crate) fn kafka_error(doing: &str, e: KafkaError) -> Error {
    Error::connector(format!("kafka: {doing}: {e}"))
}

/// The errors librdkafka reported on a client's own threads (a refused TLS handshake, a
/// broker out of reach), to say with a request that then fails: librdkafka's answer to the
/// request itself is only "broker transport failure". The first few distinct ones are kept
/// (the first is the cause; "1/1 brokers are down" comes after it).
#[derive(Debug, Default)]
pub(crate) struct LastError(parking_lot::Mutex<Vec<String>>);

/// How many distinct reasons [`LastError`] keeps.
const REASONS: usize = 3;

impl LastError {
    fn keep(&self, reason: &str) {
        // The same failure again ends "(after 3ms in state …, 1 identical error(s)
        // suppressed)": compared without that.
        let reason = reason.split(" (after ").next().unwrap_or(reason);
        let mut reasons = self.0.lock();
        if reasons.len() < REASONS && !reasons.iter().any(|r| r == reason) {
            reasons.push(reason.to_string());
        }
    }

    /// An error event (served when the client is polled).
    pub(crate) fn heard(&self, error: &KafkaError, reason: &str) {
        log::error!("librdkafka: {error}: {reason}");
        self.keep(reason);
    }

    /// A log line (told on librdkafka's own threads, e.g. a failed TLS handshake, even
    /// while a request waits): logged, and kept if it is an error.
    pub(crate) fn logged(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => {
                log::error!(target: "librdkafka", "librdkafka: {facility} {message}");
                self.keep(message);
            }
            Warning => log::warn!(target: "librdkafka", "librdkafka: {facility} {message}"),
            Notice | Info => log::info!(target: "librdkafka", "librdkafka: {facility} {message}"),
            Debug => log::debug!(target: "librdkafka", "librdkafka: {facility} {message}"),
        }
    }

    /// `e`, with the reasons librdkafka gave.
    pub(crate) fn explain(&self, e: Error) -> Error {
        let reasons = self.0.lock();
        if reasons.is_empty() {
            return e;
        }
        Error::connector(format!("{} (librdkafka said: {})", e.message, reasons.join("; ")))
    }
}

/// A client context that keeps its [`LastError`].
pub(crate) trait Heard: ClientContext {
    fn last_error(&self) -> &LastError;
}

/// Makes a context whose field `$field` is its [`LastError`] a [`ClientContext`] that
/// tells it librdkafka's log lines and errors, and [`Heard`].
macro_rules! heard_client_context {
    ($context:ty, $field:tt) => {
        impl rdkafka::client::ClientContext for $context {
            fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
                self.$field.logged(level, facility, message);
            }

            fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
                self.$field.heard(&error, reason);
            }
        }

        impl $crate::kafka::Heard for $context {
            fn last_error(&self) -> &$crate::kafka::LastError {
                &self.$field
            }
        }
    };
}
pub(crate) use heard_client_context;

/// The source's consumers' context.
#[derive(Debug, Default)]
pub(crate) struct SourceContext(LastError);

heard_client_context!(SourceContext, 0);

impl ConsumerContext for SourceContext {}

/// A consumer of the source, closed when dropped by librdkafka's own close on a thread of
/// its own. The `rdkafka` crate's drop of a consumer with a group closes it by polling in
/// 100 ms steps that the close's end does not wake (100 ms per consumer dropped); and a
/// close waits for the consumer's outstanding commit, up to `session.timeout.ms` while the
/// brokers are out of reach. Neither holds the shard or `close()` up now; the crate's
/// drop then finds the consumer closed.
pub(crate) struct SourceConsumer(Option<BaseConsumer<SourceContext>>);

impl std::ops::Deref for SourceConsumer {
    type Target = BaseConsumer<SourceContext>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a consumer is taken only by its drop")
    }
}

impl Drop for SourceConsumer {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else { return };
        let close = move || {
            // SAFETY: the client is alive until `consumer` drops, after this.
            let err = unsafe { rdkafka::bindings::rd_kafka_consumer_close(consumer.client().native_ptr()) };
            if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                log::warn!("kafka: closing a consumer: {}", rdkafka::error::RDKafkaErrorCode::from(err));
            }
        };
        if let Err(e) = std::thread::Builder::new().name("laminardb-kafka-close".into()).spawn(close) {
            // The consumer went with the closure: dropped here by the crate.
            log::warn!("kafka: no thread to close a consumer on ({e})");
        }
    }
}

/// How many partitions `topic` has (an error if it has none or does not exist).
pub(crate) fn partition_count<C: Heard>(client: &Client<C>, topic: &str) -> Result<usize> {
    let metadata = client
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| client.context().last_error().explain(kafka_error(&format!("reading the metadata of topic '{topic}'"), e)))?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        Some(t) if t.error().is_some() => Err(Error::connector(format!(
            "kafka: topic '{topic}': {:?} (create the topic first)",
            rdkafka::error::RDKafkaErrorCode::from(t.error().unwrap())
        ))),
        _ => Err(Error::connector(format!("kafka: topic '{topic}' does not exist (create the topic first)"))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reset {
    Earliest,
    Latest,
}

#[derive(Debug)]
pub struct KafkaSource {
    schema: SchemaRef,
    topic: String,
    format: PayloadFormat,
    /// Where `avro` messages' writer schemas are.
    registry: Option<Arc<Registry>>,
    reset: Reset,
    max_poll: usize,
    /// The consumer settings (brokers, group, passed-through options).
    config: ClientConfig,
    dead_letters: DeadLetterConfig,
    /// How many messages each partition's consumer fetches ahead (`queued.min.messages`):
    /// the capacity `source_metrics()` reports against the lag.
    prefetch: u64,
    /// How often the topic's partitions are counted again while it is read (`None`: never).
    discovery_interval: Option<Duration>,
    discovery: Arc<Discovery>,
    /// The thread counting partitions, and its stop (dropped with the source).
    discovery_thread: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// The consumer the open splits share: it closes with the last of them, and the
    /// counting thread ends then (the database closed or the source stopped); the next
    /// split opened starts both again.
    reader: Mutex<Weak<Reader>>,
    /// Where each partition without a recorded position starts, as `splits()` found them
    /// with one client for all (taken by the partition's `open()` right after; a
    /// partition's own client would otherwise have to reach the group's coordinator
    /// first, one after another on the shard).
    starts: Mutex<HashMap<i32, (i64, std::time::Instant)>>,
}

/// How long a start found by `splits()` stays good for the `open()` that follows.
const STARTS_KEPT: Duration = Duration::from_secs(10);

/// The topic's partitions as counted: at the first `splits()` (the ones the source began
/// with) and then every `partition.discovery.interval.ms` on a thread of its own.
#[derive(Debug, Default)]
struct Discovery {
    /// The count the source began reading with (0: not counted yet).
    initial: AtomicUsize,
    /// The latest count.
    now: AtomicUsize,
}

impl KafkaSource {
    /// The connector of a `CREATE SOURCE … WITH (connector = 'kafka', …)`: the options are
    /// checked here; nothing connects before `start()`.
    pub fn create(options: &ConnectorOptions, declared: Option<&SchemaRef>) -> Result<Arc<dyn SourceConnector>> {
        Ok(Arc::new(KafkaSource::new(options, declared)?))
    }

    fn new(options: &ConnectorOptions, declared: Option<&SchemaRef>) -> Result<KafkaSource> {
        options.check_known_or_prefixed(OPTIONS, CLIENT_PREFIXES)?;
        let schema = declared
            .cloned()
            .ok_or_else(|| Error::connector("kafka: declare the source's columns (CREATE SOURCE name (col TYPE, …) WITH (…))"))?;
        let topic = options.required("topic")?.to_string();
        let group = options.required("group.id")?;
        let format = PayloadFormat::parse(options.get("format").unwrap_or("json"))?;
        let schema = format.source_schema(&schema)?;
        let registry = match format {
            PayloadFormat::Avro => Some(Registry::from_options(options)?),
            _ if options.get("schema.registry.url").is_some() => {
                return Err(Error::connector("kafka: 'schema.registry.url' is for format = 'avro'"))
            }
            _ => None,
        };
        // Checked now, so a source that could never decode is refused at CREATE.
        decoder(format, &schema, &registry)?;
        let reset = match options.get("auto.offset.reset").unwrap_or("latest").to_ascii_lowercase().as_str() {
            "earliest" | "smallest" | "beginning" => Reset::Earliest,
            "latest" | "largest" | "end" => Reset::Latest,
            other => return Err(Error::connector(format!("kafka: auto.offset.reset '{other}' is not one of earliest, latest"))),
        };
        let max_poll = options.parse::<usize>("max.poll.records", 8192)?.max(1);
        let mut config = client_config(options)?;
        let dead_letters = DeadLetterConfig::from_options(options, Some(&config))?;
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        // Defaults unless the statement sets them (`kafka.<property>`):
        // - librdkafka's 500 ms fetch wait holds a quiet partition's records back;
        // - each partition's consumer prefetches up to 1 M messages or 16 MiB (librdkafka:
        //   100 k or 64 MiB): a shard that drains in bursts keeps the fetcher busy between
        //   them (2.2× the messages per second from a backlog here, see perf/README.md),
        //   with less memory per partition at most.
        // - a partition whose prefetch is full is fetched again 10 ms later (librdkafka:
        //   1 s, which stalled a pipeline whose shard drained a full queue in a few
        //   milliseconds for the rest of that second: see perf/README.md, session 24);
        // - the consumers join no group (partitions are assigned), so the session timeout
        //   only bounds how long a close waits for a commit the brokers cannot take
        //   (librdkafka: 45 s; 6 s is the brokers' least for a group member).
        for (key, value) in [
            ("fetch.wait.max.ms", "10"),
            ("queued.min.messages", "1000000"),
            ("queued.max.messages.kbytes", "16384"),
            ("fetch.queue.backoff.ms", "10"),
            ("session.timeout.ms", "6000"),
        ] {
            if config.get(key).is_none() {
                config.set(key, value);
            }
        }
        let prefetch = config.get("queued.min.messages").and_then(|v| v.trim().parse().ok()).unwrap_or(1_000_000);
        let discovery_interval = match options.parse::<u64>("partition.discovery.interval.ms", 10_000)? {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        Ok(KafkaSource {
            schema,
            topic,
            format,
            registry,
            reset,
            max_poll,
            config,
            dead_letters,
            prefetch,
            discovery_interval,
            discovery: Arc::default(),
            discovery_thread: Mutex::new(None),
            reader: Mutex::new(Weak::new()),
            starts: Mutex::default(),
        })
    }

    /// The consumer the open splits share ([`KafkaSource::reader`]), made if none is open.
    fn reader(&self) -> Result<Arc<Reader>> {
        let mut shared = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reader) = shared.upgrade() {
            return Ok(reader);
        }
        let consumer = self.consumer()?;
        let events = BatchQueue::new(&consumer).ok_or_else(|| Error::connector("kafka: the consumer has no queue to read"))?;
        let reader = Arc::new(Reader { events: parking_lot::Mutex::new(events), consumer });
        *shared = Arc::downgrade(&reader);
        Ok(reader)
    }

    /// Counts the topic's partitions every `interval` on a thread of its own, with the
    /// splits' consumer, while any split holds it (started at a split's opening, unless
    /// running).
    fn discover(&self, interval: Duration, reader: Weak<Reader>) -> Result<()> {
        let mut running = self.discovery_thread.lock().unwrap_or_else(|e| e.into_inner());
        if running.as_ref().is_some_and(|(_, thread)| !thread.is_finished()) {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<()>();
        let (topic, discovery) = (self.topic.clone(), self.discovery.clone());
        let thread = std::thread::Builder::new()
            .name("laminardb-kafka-discovery".into())
            .spawn(move || {
                let mut counted = std::time::Instant::now();
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(READERS_CHECK.min(interval)) {
                    let Some(reader) = reader.upgrade() else { break };
                    if counted.elapsed() < interval {
                        continue;
                    }
                    counted = std::time::Instant::now();
                    match partition_count(reader.consumer.client(), &topic) {
                        Ok(n) => {
                            let before = discovery.now.fetch_max(n, Ordering::Relaxed);
                            if n > before {
                                log::info!("kafka: topic '{topic}' has {n} partitions now ({before} before): reading the new ones from their start");
                            }
                        }
                        Err(e) => log::warn!("kafka: counting the partitions of '{topic}': {}", e.message),
                    }
                }
            })
            .map_err(|e| Error::connector(format!("kafka: starting the partition discovery thread: {e}")))?;
        *running = Some((tx, thread));
        Ok(())
    }

    fn consumer(&self) -> Result<SourceConsumer> {
        self.config.create_with_context(SourceContext::default()).map(|c| SourceConsumer(Some(c))).map_err(|e| kafka_error("creating a consumer", e))
    }

    /// Where partition `partition` starts without a recorded position: the group's
    /// committed offset, else its first or next offset as `auto.offset.reset` says; a
    /// partition the topic gained while the source was reading it, at its first (every
    /// record in it came after the source began).
    fn start_offset(&self, consumer: &SourceConsumer, partition: i32) -> Result<i64> {
        let found = self.starts.lock().unwrap_or_else(|e| e.into_inner()).remove(&partition);
        if let Some((at, _)) = found.filter(|(_, when)| when.elapsed() < STARTS_KEPT) {
            return Ok(at);
        }
        Ok(self.start_offsets(consumer, &[partition])?[0])
    }

    /// [`KafkaSource::start_offset`] of each of `partitions`, the group's offsets in one
    /// request.
    fn start_offsets(&self, consumer: &SourceConsumer, partitions: &[i32]) -> Result<Vec<i64>> {
        let mut tpl = TopicPartitionList::new();
        for &partition in partitions {
            tpl.add_partition(&self.topic, partition);
        }
        let committed = consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| consumer.context().0.explain(kafka_error(&format!("reading the group's offsets of partitions {partitions:?}"), e)))?;
        let initial = self.discovery.initial.load(Ordering::Relaxed);
        let mut starts = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            if let Some(Offset::Offset(at)) = committed.find_partition(&self.topic, partition).map(|e| e.offset()) {
                starts.push(at);
                continue;
            }
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, partition, REQUEST_TIMEOUT)
                .map_err(|e| consumer.context().0.explain(kafka_error(&format!("reading the offsets of partition {partition}"), e)))?;
            let gained = initial > 0 && partition as usize >= initial;
            starts.push(if self.reset == Reset::Earliest || gained { low } else { high });
        }
        Ok(starts)
    }
}

/// A decoder of the source's messages.
fn decoder(format: PayloadFormat, schema: &SchemaRef, registry: &Option<Arc<Registry>>) -> Result<PayloadDecoder> {
    match registry {
        Some(registry) => PayloadDecoder::avro(schema.clone(), registry.clone()),
        None => PayloadDecoder::new(format, schema.clone()),
    }
}

impl SourceConnector for KafkaSource {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn changelog(&self) -> bool {
        self.format.changelog()
    }

    fn splits(&self, _shards: usize) -> Result<usize> {
        // The open splits' consumer, or one for this call (closed at its end if no split
        // opened meanwhile).
        let reader = self.reader()?;
        let consumer = &reader.consumer;
        let n = partition_count(consumer.client(), &self.topic).map_err(|e| {
            // Why the brokers could not be reached (a refused TLS handshake, …) waits on
            // the client's queue as a log line: served now, it is said with the error.
            for _ in 0..100 {
                if consumer.poll(Duration::from_millis(1)).is_none() {
                    break;
                }
            }
            consumer.context().0.explain(e)
        })?;
        let _ = self.discovery.initial.compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed);
        self.discovery.now.fetch_max(n, Ordering::Relaxed);
        // Where the partitions start if no checkpoint says, found now with this client.
        let partitions: Vec<i32> = (0..n).filter_map(|p| i32::try_from(p).ok()).collect();
        let starts = self.start_offsets(consumer, &partitions)?;
        let now = std::time::Instant::now();
        self.starts.lock().unwrap_or_else(|e| e.into_inner()).extend(partitions.into_iter().zip(starts.into_iter().map(|at| (at, now))));
        Ok(n)
    }

    fn splits_now(&self) -> Option<usize> {
        self.discovery_interval.map(|_| self.discovery.now.load(Ordering::Relaxed))
    }

    fn open(&self, split: usize, _splits: usize, position: Option<&[u8]>) -> Result<Box<dyn SplitReader>> {
        let partition = i32::try_from(split).map_err(|_| Error::connector(format!("kafka: no partition {split}")))?;
        if let Some(registry) = &self.registry {
            registry.check()?;
        }
        let reader = self.reader()?;
        if let Some(interval) = self.discovery_interval {
            self.discover(interval, Arc::downgrade(&reader))?;
        }
        let next = match position {
            Some(bytes) => {
                let at = read_offset_position(bytes, &format!("partition {partition} of topic '{}'", self.topic))?;
                i64::try_from(at).map_err(|_| Error::checkpoint(format!("kafka: a recorded offset {at} out of range")))?
            }
            None => self.start_offset(&reader.consumer, partition)?,
        };
        let topic_c = std::ffi::CString::new(self.topic.as_str()).map_err(|_| Error::connector("kafka: a topic name with a NUL"))?;
        // The partition's queue is split off before it is assigned, so none of its
        // records goes to the consumer's own queue.
        let batches = BatchQueue::partition(&reader.consumer, &topic_c, partition)
            .ok_or_else(|| Error::connector(format!("kafka: no queue for partition {partition}")))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next))
            .map_err(|e| kafka_error("assigning the partition", e))?;
        reader.consumer.incremental_assign(&tpl).map_err(|e| kafka_error(&format!("assigning partition {partition}"), e))?;
        Ok(Box::new(KafkaSplit {
            batches,
            reader,
            assigned: true,
            polls: 0,
            topic: self.topic.clone(),
            partition,
            next,
            decoder: decoder(self.format, &self.schema, &self.registry)?,
            offsets: Vec::new(),
            rejected: VecDeque::new(),
            max_poll: self.max_poll,
            dead: self.dead_letters.open(&format!("kafka topic '{}'", self.topic))?,
            prefetch: self.prefetch,
            topic_c,
            dead_failed: Default::default(),
        }))
    }
}

/// The consumer a source's open splits share. Each split reads its partition's own
/// queue; the consumer's own queue holds what is the source's, not a partition's (errors,
/// the results of offset commits), and is served by whichever split finds it free.
struct Reader {
    /// Declared first, so dropped before the consumer.
    events: parking_lot::Mutex<BatchQueue>,
    consumer: SourceConsumer,
}

struct KafkaSplit {
    /// The partition's records in batches; declared first, so dropped before the consumer.
    batches: BatchQueue,
    reader: Arc<Reader>,
    /// The partition is in the consumer's assignment (until `close`).
    assigned: bool,
    /// Polls so far (the consumer's own queue is served every [`EVENTS_EVERY`]th).
    polls: u32,
    topic: String,
    partition: i32,
    /// The offset of the next record: every record before it is in a batch handed over
    /// (or was rejected).
    next: i64,
    decoder: PayloadDecoder,
    /// The offsets of the records pushed into the decoder.
    offsets: Vec<i64>,
    /// Records that did not decode, told one per poll (each is one error of the source).
    rejected: VecDeque<String>,
    max_poll: usize,
    dead: DeadLetters,
    prefetch: u64,
    /// The topic's name for librdkafka's C calls.
    topic_c: std::ffi::CString,
    /// Why the dead letters could not be kept at a checkpoint (told at the next poll).
    dead_failed: std::cell::RefCell<Option<String>>,
}

impl KafkaSplit {
    /// Commits `next` as the group's offset (asynchronously: the group's offsets are for
    /// monitoring; the engine's checkpoints hold the positions it reads on from).
    fn commit(&self) {
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(self.next)).is_ok() {
            if let Err(e) = self.reader.consumer.commit(&tpl, CommitMode::Async) {
                log::warn!("kafka: committing offset {} of partition {} of '{}': {e}", self.next, self.partition, self.topic);
            }
        }
    }

    /// Takes the partition out of the shared consumer's assignment: it stops fetching it.
    fn unassign(&mut self) {
        if !std::mem::take(&mut self.assigned) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        if let Err(e) = self.reader.consumer.incremental_unassign(&tpl) {
            log::warn!("kafka: unassigning partition {} of '{}': {e}", self.partition, self.topic);
        }
    }

    /// Serves the consumer's own queue, unless another split is: an error event there is
    /// the source's, told by this split.
    fn serve_events(&self, failure: &mut Option<String>) {
        let Some(mut events) = self.reader.events.try_lock() else { return };
        // No partition's records come here: each is split off before it is assigned.
        events.take(64, |event| *failure = not_a_record_of(None, event).or(failure.take()));
    }
}

/// What to tell of an event on partition `queue`'s queue (`None`: the consumer's own)
/// that is not one of its records: an error (the end of a partition is none; librdkafka
/// retries the others on its own, so reading goes on), or a record of another partition,
/// which cannot come (each partition's has its own queue) and is said, not dropped unsaid.
fn not_a_record_of(queue: Option<i32>, event: crate::kafka_batch::Record<'_>) -> Option<String> {
    match event.error {
        Some((rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF, _)) => None,
        Some((_, text)) => Some(format!("kafka: {text}")),
        None => {
            let queue = queue.map_or_else(|| "the consumer's own queue".to_string(), |p| format!("partition {p}'s queue"));
            Some(format!("kafka: record {} of partition {} came on {queue} and was left out", event.offset, event.partition))
        }
    }
}

impl Drop for KafkaSplit {
    fn drop(&mut self) {
        self.unassign();
    }
}

/// A record left out: told (one error of the source each) and sent to the dead letters.
fn reject(told: &mut VecDeque<String>, dead: &mut DeadLetters, origin: &str, why: &str, payload: &[u8]) {
    told.push_back(format!("{origin}: {why}"));
    if let Err(e) = dead.send(origin, why, payload) {
        told.push_back(format!("{origin}: {}", e.message));
    }
}

impl SplitReader for KafkaSplit {
    fn poll(&mut self) -> Result<SplitPoll> {
        if let Some(what) = self.dead_failed.take() {
            self.rejected.push_back(what);
        }
        if let Some(what) = self.rejected.pop_front() {
            return Ok(SplitPoll::Skipped(what));
        }
        let mut failure = None;
        let (partition, changelog) = (self.partition, self.decoder.changelog());
        let (decoder, offsets, next, rejected, dead) =
            (&mut self.decoder, &mut self.offsets, &mut self.next, &mut self.rejected, &mut self.dead);
        let taken = self.batches.take(self.max_poll, |record| {
            if record.error.is_some() || record.partition != partition {
                failure = not_a_record_of(Some(partition), record).or(failure.take());
                return;
            }
            match record.payload {
                Some(payload) => {
                    decoder.push(payload);
                    offsets.push(record.offset);
                }
                // A change feed's tombstone (after a delete, for compaction).
                None if changelog => {}
                None => {
                    let origin = format!("partition {partition} offset {}", record.offset);
                    reject(rejected, dead, &origin, "a record without a payload", &[]);
                }
            }
            *next = record.offset + 1;
        });
        self.polls = self.polls.wrapping_add(1);
        if taken == 0 || self.polls.is_multiple_of(EVENTS_EVERY) {
            self.serve_events(&mut failure);
        }
        let offsets = std::mem::take(&mut self.offsets);
        let (batch, rejected) = self.decoder.finish()?;
        for r in rejected {
            let at = offsets.get(r.index).copied().unwrap_or(-1);
            let origin = format!("partition {} offset {at}", self.partition);
            reject(&mut self.rejected, &mut self.dead, &origin, &format!("did not decode: {}", r.error), &r.payload);
        }
        if let Some(what) = failure {
            self.rejected.push_back(what);
        }
        match batch {
            Some(batch) => Ok(SplitPoll::Rows(batch)),
            None => match self.rejected.pop_front() {
                Some(what) => Ok(SplitPoll::Skipped(what)),
                None => Ok(SplitPoll::Pending(IDLE_POLL)),
            },
        }
    }

    fn position(&self) -> Vec<u8> {
        // Asked at each checkpoint barrier: the dead letters of the records before the
        // position are kept first, and the group's offset follows the checkpoints.
        if let Err(e) = self.dead.flush() {
            log::error!("kafka: partition {} of '{}': {}", self.partition, self.topic, e.message);
            *self.dead_failed.borrow_mut() = Some(e.message);
        }
        self.commit();
        offset_position(self.next.max(0) as u64)
    }

    /// The partition's consumer lag: records the broker holds that the source has not
    /// handed over yet (librdkafka's last known high watermark, no request), against the
    /// consumer's prefetch.
    fn backlog(&self) -> Option<Backlog> {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the consumer's client outlives the call; librdkafka reads the topic name
        // (a NUL-terminated copy this split owns) and writes the two offsets, nothing else.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.reader.consumer.client().native_ptr(),
                self.topic_c.as_ptr(),
                self.partition,
                &mut low,
                &mut high,
            )
        };
        let known = err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0;
        known.then(|| Backlog { pending: (high - self.next.max(0)).max(0) as u64, capacity: self.prefetch })
    }

    fn close(&mut self) -> Result<()> {
        self.commit();
        self.unassign();
        self.dead.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]))
    }

    /// The options of a source of topic `t` from its first record, and `extra`.
    fn options(servers: &str, extra: &[(&str, &str)]) -> Result<ConnectorOptions> {
        let mut raw: BTreeMap<String, String> =
            [("bootstrap.servers", servers), ("topic", "t"), ("group.id", "g"), ("auto.offset.reset", "earliest")]
                .iter()
                .chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        raw.insert("connector".into(), "kafka".into());
        ConnectorOptions::new("kafka", &raw)
    }

    fn source(servers: &str, extra: &[(&str, &str)]) -> Result<Arc<dyn SourceConnector>> {
        KafkaSource::create(&options(servers, extra)?, Some(&schema()))
    }

    fn produce(servers: &str, records: &[(i32, &str)]) {
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", servers).create().unwrap();
        for (partition, payload) in records {
            producer.send(BaseRecord::<(), str>::to("t").partition(*partition).payload(*payload)).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// Polls until `n` values and `skipped` skips came (or ten seconds pass).
    fn read(reader: &mut dyn SplitReader, n: usize, skipped: usize) -> (Vec<i64>, Vec<String>) {
        let (mut values, mut skips) = (Vec::new(), Vec::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (values.len() < n || skips.len() < skipped) && std::time::Instant::now() < deadline {
            match reader.poll().unwrap() {
                SplitPoll::Rows(b) => values.extend(b.column(0).as_primitive::<Int64Type>().values().iter().copied()),
                SplitPoll::Skipped(what) => skips.push(what),
                SplitPoll::Pending(_) => std::thread::sleep(Duration::from_millis(5)),
                SplitPoll::End => panic!("a Kafka partition does not end"),
            }
        }
        (values, skips)
    }

    #[test]
    fn options_are_checked_at_create() {
        let e = |extra: &[(&str, &str)]| source("127.0.0.1:1", extra).unwrap_err().message;
        assert!(e(&[("colour", "red")]).contains("no option 'colour'"));
        assert!(e(&[("format", "avro")]).contains("needs the option 'schema.registry.url'"));
        assert!(e(&[("format", "avro"), ("schema.registry.url", "ftp://r")]).contains("http:// or https://"));
        assert!(e(&[("schema.registry.url", "http://r")]).contains("is for format = 'avro'"));
        assert!(e(&[("auto.offset.reset", "middle")]).contains("'middle'"));
        let none: BTreeMap<String, String> = [("topic", "t"), ("group.id", "g")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let missing = KafkaSource::create(&ConnectorOptions::new("kafka", &none).unwrap(), Some(&schema())).unwrap_err();
        assert!(missing.message.contains("'bootstrap.servers'"), "{}", missing.message);
        assert!(source("127.0.0.1:1", &[("kafka.fetch.min.bytes", "1"), ("sasl.username", "u")]).is_ok());
    }

    /// Partitions are splits; each reads its records in order, skips (and tells) the ones
    /// that do not decode, and a reader opened at a position reads on from exactly there.
    #[test]
    fn partitions_are_read_from_positions_and_bad_records_are_told() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        produce(&servers, &[(0, r#"{"v": 1}"#), (1, r#"{"v": 100}"#), (0, "not json"), (0, r#"{"v": 2}"#)]);
        let source = source(&servers, &[]).unwrap();
        assert_eq!(source.splits(4).unwrap(), 2);
        let mut p0 = source.open(0, 2, None).unwrap();
        let (values, skipped) = read(p0.as_mut(), 2, 1);
        assert_eq!(values, [1, 2]);
        assert!(skipped[0].contains("partition 0 offset 1: did not decode"), "{skipped:?}");
        let at = p0.position();
        assert_eq!(read_offset_position(&at, "t").unwrap(), 3);
        let mut p1 = source.open(1, 2, None).unwrap();
        assert_eq!(read(p1.as_mut(), 1, 0).0, [100]);
        produce(&servers, &[(0, r#"{"v": 3}"#)]);
        p0.close().unwrap();
        let mut again = source.open(0, 2, Some(&at)).unwrap();
        assert_eq!(read(again.as_mut(), 1, 0).0, [3]);
        let missing = KafkaSource::create(&options(&servers, &[("topic", "absent")]).unwrap(), Some(&schema())).unwrap();
        let e = missing.splits(2).unwrap_err();
        assert!(e.message.contains("'absent'"), "{}", e.message);
    }

    /// The open splits of a source share one consumer, each reading only its own
    /// partition: one split closed and opened again at its position reads on from there
    /// while the others go on; the consumer goes with the last split.
    #[test]
    fn the_splits_share_one_consumer_and_each_reads_its_own_partition() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 3, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let records: Vec<(i32, String)> = (0..30).map(|i| (i % 3, format!(r#"{{"v": {i}}}"#))).collect();
        let records: Vec<(i32, &str)> = records.iter().map(|(p, r)| (*p, r.as_str())).collect();
        produce(&servers, &records);
        let source = KafkaSource::new(&options(&servers, &[]).unwrap(), Some(&schema())).unwrap();
        assert_eq!(source.splits(2).unwrap(), 3);
        assert!(source.reader.lock().unwrap().upgrade().is_none(), "no split open: no consumer kept");
        let mut splits: Vec<Box<dyn SplitReader>> = (0..3).map(|p| source.open(p, 3, None).unwrap()).collect();
        let consumer = source.reader.lock().unwrap().upgrade().unwrap();
        assert_eq!(Arc::strong_count(&consumer), 4, "the three splits hold the one consumer");
        drop(consumer);
        let own = |p: i64, from: i64| (from..10).map(|k| 3 * k + p).collect::<Vec<i64>>();
        let (first, _) = read(splits[1].as_mut(), 4, 0);
        assert_eq!(first, own(1, 0)[..first.len()], "partition 1's records, in order");
        let at = splits[1].position();
        let read_so_far = read_offset_position(&at, "t").unwrap() as i64;
        splits[1].close().unwrap();
        splits.remove(1);
        splits.insert(1, source.open(1, 3, Some(&at)).unwrap());
        for (p, split) in splits.iter_mut().enumerate() {
            let from = if p == 1 { read_so_far } else { 0 };
            let want = own(p as i64, from);
            let (values, skipped) = read(split.as_mut(), want.len(), 0);
            assert_eq!((values, skipped), (want, vec![]), "partition {p}");
        }
        drop(splits);
        assert!(source.reader.lock().unwrap().upgrade().is_none(), "the consumer goes with the last split");
    }

    /// A partition whose prefetch queue is full is fetched again as soon as the split
    /// has taken from it (librdkafka's own default waits a second: with each record
    /// filling the queue here, 10 of the 100 came in the ten seconds).
    #[test]
    fn a_full_prefetch_queue_does_not_pause_reading() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &servers).create().unwrap();
        for i in 0..100 {
            // A batch per record, so each fetch brings one.
            producer.send(BaseRecord::<(), str>::to("t").partition(0).payload(&format!(r#"{{"v": {i}}}"#))).unwrap();
            producer.flush(Duration::from_secs(10)).unwrap();
        }
        let source = source(&servers, &[("kafka.queued.min.messages", "1"), ("kafka.max.partition.fetch.bytes", "1")]).unwrap();
        assert_eq!(source.splits(1).unwrap(), 1);
        let mut split = source.open(0, 1, None).unwrap();
        let (values, _) = read(split.as_mut(), 100, 0);
        assert_eq!(values, (0..100).collect::<Vec<i64>>(), "all read within the ten seconds `read` waits");
    }

    /// Closing a split whose brokers went out of reach takes no time: its last commit
    /// cannot be answered, and the consumer waits for it on a thread of its own.
    #[test]
    fn a_split_closes_at_once_while_the_brokers_are_out_of_reach() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        produce(&servers, &[(0, r#"{"v": 1}"#)]);
        let source = source(&servers, &[]).unwrap();
        assert_eq!(source.splits(1).unwrap(), 1);
        let mut split = source.open(0, 1, None).unwrap();
        assert_eq!(read(split.as_mut(), 1, 0).0, [1]);
        cluster.broker_down(1).unwrap();
        let started = std::time::Instant::now();
        split.close().unwrap();
        drop(split);
        drop(source);
        assert!(started.elapsed() < Duration::from_secs(1), "closing took {:?}", started.elapsed());
    }

    /// A partition the topic gained after the source began reading starts at its first
    /// record, whatever `auto.offset.reset` says; the ones it began with start as that
    /// says. (Neither librdkafka's mock cluster nor tansu can add partitions to a topic, so
    /// the gain is told to the source as its discovery thread would.)
    #[test]
    fn a_partition_gained_while_reading_starts_at_its_first_record() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 3, 1).unwrap();
        let servers = cluster.bootstrap_servers();
        produce(&servers, &[(0, r#"{"v": 1}"#), (2, r#"{"v": 7}"#), (2, r#"{"v": 8}"#)]);
        let options = |extra: &[(&str, &str)]| {
            let raw: BTreeMap<String, String> =
                [("bootstrap.servers", servers.as_str()), ("topic", "t"), ("group.id", "g"), ("connector", "kafka")]
                    .iter()
                    .chain(extra)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            ConnectorOptions::new("kafka", &raw).unwrap()
        };
        let discovering = KafkaSource::new(&options(&[("partition.discovery.interval.ms", "50")]), Some(&schema())).unwrap();
        assert_eq!(discovering.splits(2).unwrap(), 3);
        assert_eq!((discovering.discovery.initial.load(Ordering::Relaxed), discovering.splits_now()), (3, Some(3)));
        let thread_ended = |source: &KafkaSource| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let ended = || source.discovery_thread.lock().unwrap().as_ref().is_none_or(|(_, t)| t.is_finished());
            while !ended() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            ended()
        };
        assert!(thread_ended(&discovering), "no split open: nothing counts");
        for round in 0..2 {
            // While a split is open the thread counts again: a count it had not seen comes
            // back within its interval. Once none is, the thread ends; the next opening
            // starts it again.
            let reader = discovering.open(0, 3, None).unwrap();
            discovering.discovery.now.store(0, Ordering::Relaxed);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while discovering.splits_now() != Some(3) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(discovering.splits_now(), Some(3), "the counting thread runs (round {round})");
            drop(reader);
            assert!(thread_ended(&discovering), "the counting thread ends with the last split (round {round})");
        }

        let fixed = KafkaSource::new(&options(&[("partition.discovery.interval.ms", "0")]), Some(&schema())).unwrap();
        assert_eq!(fixed.splits_now(), None);
        // As if it had begun with one partition and the thread had found two more.
        fixed.discovery.initial.store(1, Ordering::Relaxed);
        let mut gained = fixed.open(2, 3, None).unwrap();
        assert_eq!(read(gained.as_mut(), 2, 0).0, [7, 8], "a gained partition from its first record");
        let mut first = fixed.open(0, 3, None).unwrap();
        produce(&servers, &[(0, r#"{"v": 2}"#)]);
        assert_eq!(read(first.as_mut(), 1, 0).0, [2], "a partition it began with: from the end (latest)");
    }
}
