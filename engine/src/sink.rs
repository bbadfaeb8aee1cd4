//! Sinks: where a stream's rows leave the database. A sink reads one source or stream
//! (for `CREATE SINK … AS SELECT`, a hidden stream of that query) as the one node of its
//! own dataflow ([`SinkPlan`]): every shard writes its rows through its own [`Sink`], in
//! order, never dropping one, and the checkpoint barrier reaches it in line with them.
//!
//! Connectors built in: `blackhole` (the default when `WITH` names none): it accepts and
//! counts rows, for pipelines whose results are read by subscription and for benchmarks.
//! Others register themselves ([`register`]; `laminardb-connectors`: `files`, `kafka`,
//! `websocket`). The spec's connectors not built yet (Postgres, Delta, Iceberg, …) are
//! rejected with a ConnectorError, never accepted and silently dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo};
use crate::stream::output::Output;

use crate::error::{Error, Result};
use crate::source::ConnectorOptions;

/// Connectors the spec names that this build does not have yet.
const PLANNED: &[&str] = &[
    "kafka", "websocket", "postgres", "postgres-cdc", "postgres_cdc", "postgres-sink", "mysql", "mysql-cdc",
    "mysql_cdc", "rabbitmq", "delta", "delta-lake", "delta_lake", "iceberg", "redis", "nats",
];

pub const DEFAULT_CONNECTOR: &str = "blackhole";

/// Where a sink's rows go: one instance per shard, fed that shard's rows of the input in
/// order, on the shard's thread (a connector that waits on I/O hands the rows to its own
/// thread; a full hand-over queue holds the shard back: backpressure, never a lost row).
pub trait Sink: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<()>;

    /// The barrier of checkpoint `id`: every row written before it is delivered (or part
    /// of the transaction this commits) when this returns; an error fails the checkpoint.
    fn checkpoint(&mut self, _id: u64) -> Result<()> {
        self.flush()
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// The sink is dropped or the database closes: deliver what is pending.
    fn close(&mut self) -> Result<()> {
        self.flush()
    }

    /// The bytes this instance has put out so far: encoded records sent, files committed
    /// (`sink_metrics().total_bytes`). A sink that writes nothing out says 0.
    fn bytes_out(&self) -> u64 {
        0
    }
}

struct Blackhole;

impl Sink for Blackhole {
    fn write(&mut self, _batch: &RecordBatch) -> Result<()> {
        Ok(())
    }
}

/// What a factory returns for the check at `CREATE` (`SinkContext::task` is `None`) when
/// its instances would open something outside: the options are checked, nothing opens,
/// and it is closed without a write.
pub struct OptionsChecked;

impl Sink for OptionsChecked {
    fn write(&mut self, _batch: &RecordBatch) -> Result<()> {
        Err(Error::internal("the check at CREATE does not write"))
    }
}

/// Which sink instance is being opened.
#[derive(Clone, Copy, Debug)]
pub struct SinkContext<'a> {
    /// The sink's name.
    pub name: &'a str,
    /// The shard it writes for; `None` at `CREATE`, where the instance only checks the
    /// options and is closed without a write.
    pub task: Option<TaskInfo>,
}

/// Builds one shard's instance of a sink from its `CREATE SINK` options, and once more at
/// `CREATE` to check them (`task` is `None`: the instance must not touch the outside).
pub type SinkFactory = fn(&ConnectorOptions, &SinkContext) -> Result<Box<dyn Sink>>;

/// Sinks other crates add (`laminardb-connectors`, when the Python module loads).
static REGISTERED: parking_lot::RwLock<BTreeMap<&'static str, SinkFactory>> = parking_lot::const_rwlock(BTreeMap::new());

/// Makes `name` available to `CREATE SINK … WITH (connector = name)`.
pub fn register(name: &'static str, factory: SinkFactory) {
    REGISTERED.write().insert(name, factory);
}

/// Connectors whose sinks exist only in this process (Python callbacks): a database with
/// storage refuses them, since it could not open them again when it reopens.
static TRANSIENT: parking_lot::RwLock<Vec<&'static str>> = parking_lot::const_rwlock(Vec::new());

/// [`register`]s `name` as a connector of this process only.
pub fn register_transient(name: &'static str, factory: SinkFactory) {
    register(name, factory);
    TRANSIENT.write().push(name);
}

pub fn is_transient(connector: &str) -> bool {
    TRANSIENT.read().iter().any(|c| c.eq_ignore_ascii_case(connector))
}

fn available() -> String {
    let mut names: Vec<&str> = REGISTERED.read().keys().copied().collect();
    names.push(DEFAULT_CONNECTOR);
    names.sort_unstable();
    names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
}

/// Checks that `connector` exists here and the options of sink `name` make sense.
pub fn validate(name: &str, connector: &str, options: &BTreeMap<String, String>) -> Result<()> {
    open(connector, options, &SinkContext { name, task: None }).and_then(|mut probe| probe.close())
}

pub fn open(connector: &str, options: &BTreeMap<String, String>, context: &SinkContext) -> Result<Box<dyn Sink>> {
    let connector = connector.to_ascii_lowercase();
    if connector == DEFAULT_CONNECTOR {
        return Ok(Box::new(Blackhole));
    }
    let factory = REGISTERED.read().get(connector.as_str()).copied();
    match factory {
        Some(factory) => factory(&ConnectorOptions::for_sink(&connector, options)?, context),
        None if PLANNED.contains(&connector.as_str()) => Err(Error::connector(format!(
            "connector '{connector}' is not available in this build yet (available: {})",
            available()
        ))),
        None => Err(Error::connector(format!("unknown connector '{connector}' (available: {})", available()))),
    }
}

/// A sink as the last node of a dataflow (`CREATE SINK`): it reads its input on every
/// shard, writes through one `Sink` per shard and counts what it wrote on the sink's own
/// `Output` (rows, batches; errors and the last one).
pub struct SinkPlan {
    pub connector: String,
    pub options: BTreeMap<String, String>,
    pub schema: SchemaRef,
    pub counters: Arc<Output>,
}

impl std::fmt::Debug for SinkPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkPlan").field("connector", &self.connector).field("output", &self.counters.name).finish()
    }
}

struct SinkOperator {
    sink: Box<dyn Sink>,
    counters: Arc<Output>,
    /// `sink.bytes_out()` when last counted.
    bytes: u64,
}

impl OperatorSpec for SinkPlan {
    fn name(&self) -> &'static str {
        "sink"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn build(self: Arc<Self>, task: TaskInfo) -> Result<Box<dyn Operator>> {
        let context = SinkContext { name: &self.counters.name, task: Some(task) };
        let sink = open(&self.connector, &self.options, &context)?;
        Ok(Box::new(SinkOperator { sink, counters: self.counters.clone(), bytes: 0 }))
    }
}

impl SinkOperator {
    /// Adds what the sink put out since the last look to the sink's counters.
    fn count_bytes(&mut self) {
        let now = self.sink.bytes_out();
        self.counters.counters.bytes.fetch_add(now.saturating_sub(self.bytes), std::sync::atomic::Ordering::Relaxed);
        self.bytes = now;
    }
}

impl Operator for SinkOperator {
    fn process(&mut self, _port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, _out: &mut Collector) -> Result<()> {
        self.sink.write(batch)?;
        // Counted as written (the sink's output has no subscribers).
        self.counters.publish(batch);
        self.count_bytes();
        Ok(())
    }

    fn on_checkpoint(&mut self, id: u64) -> Result<()> {
        self.sink.checkpoint(id)?;
        self.count_bytes();
        let mut last = self.counters.counters.last_commit.lock();
        if last.is_none_or(|(done, _)| done < id) {
            *last = Some((id, crate::stream::time::now_ms()));
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let closed = self.sink.close();
        self.count_bytes();
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_planned_connectors_are_connector_errors() {
        let none = BTreeMap::new();
        assert!(validate("s", "blackhole", &none).is_ok());
        for c in ["kafka", "no_such_connector"] {
            let e = validate("s", c, &none).unwrap_err();
            assert_eq!(e.class, crate::error::ErrorClass::Connector);
            assert!(e.message.contains(c), "{}", e.message);
        }
    }

    /// Records what reaches it, to check the operator's hooks; puts out 10 bytes a row.
    struct Recording(Arc<parking_lot::Mutex<Vec<String>>>, u64);

    impl Sink for Recording {
        fn write(&mut self, batch: &RecordBatch) -> Result<()> {
            self.0.lock().push(format!("write {}", batch.num_rows()));
            self.1 += 10 * batch.num_rows() as u64;
            Ok(())
        }
        fn bytes_out(&self) -> u64 {
            self.1
        }
        fn checkpoint(&mut self, id: u64) -> Result<()> {
            self.0.lock().push(format!("checkpoint {id}"));
            Ok(())
        }
        fn close(&mut self) -> Result<()> {
            self.0.lock().push("close".into());
            Ok(())
        }
    }

    /// The sink operator writes every batch in order, counts it on the sink's output,
    /// and passes the checkpoint barrier and the close on to its sink; its bytes and the
    /// last checkpoint it passed are the sink's metrics.
    #[test]
    fn the_sink_operator_writes_counts_and_passes_barriers_on() {
        let batch = |n: i64| {
            RecordBatch::try_from_iter([("v", Arc::new(arrow::array::Int64Array::from_iter_values(0..n)) as _)]).unwrap()
        };
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let counters = Output::new("out", batch(1).schema());
        let mut op = SinkOperator { sink: Box::new(Recording(seen.clone(), 0)), counters: counters.clone(), bytes: 0 };
        let mut out = Collector::default();
        op.process(0, &batch(3), None, &mut out).unwrap();
        assert_eq!(*counters.counters.last_commit.lock(), None);
        op.on_checkpoint(7).unwrap();
        assert_eq!(counters.counters.last_commit.lock().map(|(id, _)| id), Some(7));
        op.process(0, &batch(2), None, &mut out).unwrap();
        op.close().unwrap();
        assert!(out.rows.is_empty(), "a sink emits nothing downstream");
        assert_eq!(*seen.lock(), ["write 3", "checkpoint 7", "write 2", "close"]);
        assert_eq!(counters.counters.rows.load(std::sync::atomic::Ordering::Relaxed), 5);
        assert_eq!(counters.counters.bytes.load(std::sync::atomic::Ordering::Relaxed), 50);
    }
}
