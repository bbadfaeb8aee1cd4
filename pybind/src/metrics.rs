//! Metrics and topology: read-only snapshots built from the catalog and the counters every
//! source's and stream's output keeps. All counts are rows, not calls.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use pyo3::prelude::*;
use pyo3_arrow::PySchema;

use laminardb_engine::catalog::{Catalog, SinkDef};
use laminardb_engine::stream::output::{Output, SUBSCRIBER_BATCHES_MAX};

#[pyclass(name = "PipelineMetrics", module = "laminardb", frozen, get_all)]
pub struct PyPipelineMetrics {
    pub total_events_ingested: u64,
    pub total_events_emitted: u64,
    pub total_events_dropped: u64,
    pub total_cycles: u64,
    pub total_batches: u64,
    pub uptime_secs: f64,
    pub state: String,
    pub source_count: usize,
    pub stream_count: usize,
    pub sink_count: usize,
    pub pipeline_watermark: i64,
    /// Rows replayed from the WAL when this connection opened.
    pub recovered_rows: u64,
    /// Torn or corrupt WAL tails found (and cut off) when this connection opened.
    pub wal_torn_tails: u64,
    /// Damaged places cut when this connection opened with `recovery='truncate'`, and
    /// rows of intact records dropped with them (each also logged).
    pub wal_damage_cut: u64,
    pub wal_rows_dropped: u64,
    /// How long opening spent loading the checkpoint and replaying the WAL, in ms.
    pub recovery_ms: f64,
    /// Checkpoints this connection took, the last one's id, duration, the part of it
    /// during which inserts waited, and bytes written.
    pub checkpoints: u64,
    pub last_checkpoint_id: u64,
    pub last_checkpoint_ms: f64,
    pub last_checkpoint_pause_ms: f64,
    pub last_checkpoint_bytes: u64,
}

#[pymethods]
impl PyPipelineMetrics {
    fn __repr__(&self) -> String {
        format!(
            "PipelineMetrics(state={}, ingested={}, emitted={}, dropped={}, sources={}, streams={}, sinks={})",
            self.state,
            self.total_events_ingested,
            self.total_events_emitted,
            self.total_events_dropped,
            self.source_count,
            self.stream_count,
            self.sink_count
        )
    }
}

#[pyclass(name = "SourceMetrics", module = "laminardb", frozen, get_all)]
pub struct PySourceMetrics {
    pub name: String,
    pub total_events: u64,
    pub pending: u64,
    pub capacity: usize,
    pub is_backpressured: bool,
    pub watermark: i64,
    pub utilization: f64,
    /// Rows of this source that the windowed streams reading it dropped as too late.
    pub late_events: u64,
    /// Rows stored with an event time too far ahead of the clock to move the watermark
    /// (`LaminarConfig.max_event_ahead_ms`).
    pub future_events: u64,
    /// Input a connector source left out (a record or file that did not decode) or could
    /// not reach, each counted and logged; the source read on.
    pub errors: u64,
    pub last_error: Option<String>,
}

#[pymethods]
impl PySourceMetrics {
    fn __repr__(&self) -> String {
        format!("SourceMetrics(name={:?}, total_events={}, watermark={})", self.name, self.total_events, self.watermark)
    }
}

#[pyclass(name = "StreamMetrics", module = "laminardb", frozen, get_all)]
pub struct PyStreamMetrics {
    pub name: String,
    /// Rows the stream has emitted.
    pub total_events: u64,
    /// Batches waiting in subscriber queues.
    pub pending: u64,
    /// Batches each subscriber may have waiting.
    pub capacity: usize,
    /// A subscriber fell behind and lost batches (see `lagged_batches`).
    pub is_backpressured: bool,
    pub watermark: i64,
    pub sql: Option<String>,
    pub late_events: u64,
    pub lagged_batches: u64,
    pub subscribers: usize,
    pub errors: u64,
    /// Input rows the stream's expressions failed on (rejected; the rest went on).
    pub rejected_rows: u64,
    pub last_error: Option<String>,
    /// End-to-end engine latency of the stream's output (from the insert call entering
    /// the engine to the batch reaching the subscriber queues), in microseconds; `None`
    /// before the first emission.
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    pub latency_p999_us: Option<f64>,
    pub latency_max_us: Option<f64>,
    /// Emitted batches the latency percentiles are over.
    pub latency_count: u64,
    /// Rows a join of the stream holds of its left and right inputs, over every shard (0
    /// without a join): what bounds its memory.
    pub join_left_rows: u64,
    pub join_right_rows: u64,
}

#[pymethods]
impl PyStreamMetrics {
    fn __repr__(&self) -> String {
        format!("StreamMetrics(name={:?}, total_events={}, watermark={})", self.name, self.total_events, self.watermark)
    }
}

/// `queue`: the requests waiting for the coordinator and its capacity (what an inserted
/// source's rows wait in); a connector source's readers' queues take its place.
pub fn source_metrics(output: &Output, watermark: i64, queue: (usize, usize), catalog: &Catalog, outputs: &[Arc<Output>]) -> PySourceMetrics {
    let readers = catalog.readers_of(&output.name);
    let late = outputs
        .iter()
        .filter(|o| readers.contains(&o.name))
        .map(|o| o.counters.late_rows.load(Ordering::Relaxed))
        .sum();
    let (pending, capacity) = output.backlog().unwrap_or((queue.0 as u64, queue.1 as u64));
    PySourceMetrics {
        name: output.name.clone(),
        total_events: output.counters.rows.load(Ordering::Relaxed),
        pending,
        capacity: capacity as usize,
        is_backpressured: capacity > 0 && pending >= capacity,
        watermark,
        utilization: if capacity == 0 { 0.0 } else { (pending as f64 / capacity as f64).min(1.0) },
        late_events: late,
        future_events: output.counters.future_rows.load(Ordering::Relaxed),
        errors: output.counters.errors.load(Ordering::Relaxed),
        last_error: output.counters.last_error.lock().clone(),
    }
}

/// What a sink has written (a laminardb addition; the upstream wheel has none).
#[pyclass(name = "SinkMetrics", module = "laminardb", frozen, get_all)]
pub struct PySinkMetrics {
    pub name: String,
    pub connector: String,
    /// Rows handed to the connector (delivered or committed by the next checkpoint).
    pub total_events: u64,
    pub batches: u64,
    /// Writes, deliveries or commits that failed.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Bytes put out: encoded records sent, files committed (0 for `blackhole`).
    pub total_bytes: u64,
    /// The latest checkpoint whose barrier the sink passed (its rows before it delivered or
    /// committed), and when (epoch ms); `None` before the first.
    pub last_commit_id: Option<u64>,
    pub last_commit_ms: Option<i64>,
}

#[pymethods]
impl PySinkMetrics {
    fn __repr__(&self) -> String {
        format!("SinkMetrics(name={:?}, connector={:?}, total_events={}, errors={})", self.name, self.connector, self.total_events, self.errors)
    }
}

pub fn sink_metrics(output: &Output, def: &SinkDef) -> PySinkMetrics {
    let c = &output.counters;
    let last_commit = *c.last_commit.lock();
    PySinkMetrics {
        name: def.name.clone(),
        connector: def.connector.clone(),
        total_events: c.rows.load(Ordering::Relaxed),
        batches: c.batches.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
        last_error: c.last_error.lock().clone(),
        total_bytes: c.bytes.load(Ordering::Relaxed),
        last_commit_id: last_commit.map(|(id, _)| id),
        last_commit_ms: last_commit.map(|(_, ms)| ms),
    }
}

pub fn stream_metrics(output: &Output, sql: Option<String>) -> PyStreamMetrics {
    let c = &output.counters;
    let lagged = c.lagged_batches.load(Ordering::Relaxed);
    let latency = output.latency();
    let timed = |v: f64| (latency.count > 0).then_some(v);
    PyStreamMetrics {
        name: output.name.clone(),
        total_events: c.rows.load(Ordering::Relaxed),
        pending: output.pending_batches() as u64,
        capacity: SUBSCRIBER_BATCHES_MAX,
        is_backpressured: lagged > 0,
        watermark: c.watermark.load(Ordering::Relaxed),
        sql,
        late_events: c.late_rows.load(Ordering::Relaxed),
        lagged_batches: lagged,
        subscribers: output.subscriber_count(),
        errors: c.errors.load(Ordering::Relaxed),
        rejected_rows: c.rejected_rows.load(Ordering::Relaxed),
        last_error: c.last_error.lock().clone(),
        latency_p50_us: timed(latency.p50_us),
        latency_p99_us: timed(latency.p99_us),
        latency_p999_us: timed(latency.p999_us),
        latency_max_us: timed(latency.max_us),
        latency_count: latency.count,
        join_left_rows: c.join_rows[0].load(Ordering::Relaxed).max(0) as u64,
        join_right_rows: c.join_rows[1].load(Ordering::Relaxed).max(0) as u64,
    }
}

#[pyclass(name = "PipelineNode", module = "laminardb", frozen)]
pub struct PyPipelineNode {
    #[pyo3(get)]
    pub name: String,
    #[pyo3(get)]
    pub node_type: String,
    pub schema: Option<SchemaRef>,
    #[pyo3(get)]
    pub sql: Option<String>,
}

#[pymethods]
impl PyPipelineNode {
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.schema.clone().map(|s| PySchema::new(s).into_pyarrow(py)).transpose()
    }

    fn __repr__(&self) -> String {
        format!("PipelineNode(name='{}', type='{}')", self.name, self.node_type)
    }
}

#[pyclass(name = "PipelineEdge", module = "laminardb", frozen, get_all)]
pub struct PyPipelineEdge {
    pub from_node: String,
    pub to_node: String,
}

#[pymethods]
impl PyPipelineEdge {
    fn __repr__(&self) -> String {
        format!("PipelineEdge({:?} -> {:?})", self.from_node, self.to_node)
    }
}

#[pyclass(name = "PipelineTopology", module = "laminardb", frozen)]
pub struct PyPipelineTopology {
    nodes: Vec<Py<PyPipelineNode>>,
    edges: Vec<Py<PyPipelineEdge>>,
}

#[pymethods]
impl PyPipelineTopology {
    #[getter]
    fn nodes(&self, py: Python<'_>) -> Vec<Py<PyPipelineNode>> {
        self.nodes.iter().map(|n| n.clone_ref(py)).collect()
    }

    #[getter]
    fn edges(&self, py: Python<'_>) -> Vec<Py<PyPipelineEdge>> {
        self.edges.iter().map(|e| e.clone_ref(py)).collect()
    }

    fn __repr__(&self) -> String {
        format!("PipelineTopology(nodes={}, edges={})", self.nodes.len(), self.edges.len())
    }
}

/// The dataflow graph: sources and streams as nodes, an edge from every input a stream's
/// plan reads to the stream.
pub fn topology(py: Python<'_>, catalog: &Catalog, hidden: impl Fn(&str) -> bool) -> PyResult<PyPipelineTopology> {
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    for def in catalog.sources.values() {
        let node = PyPipelineNode { name: def.name.clone(), node_type: "source".into(), schema: Some(def.schema.clone()), sql: None };
        nodes.push(Py::new(py, node)?);
    }
    for def in catalog.streams.values().filter(|s| !hidden(&s.name)) {
        let node = PyPipelineNode {
            name: def.name.clone(),
            node_type: "stream".into(),
            schema: Some(def.plan.schema.clone()),
            sql: Some(def.sql.clone()),
        };
        nodes.push(Py::new(py, node)?);
        let mut inputs: Vec<&str> = def.plan.inputs().collect();
        inputs.dedup();
        for input in inputs {
            edges.push(Py::new(py, PyPipelineEdge { from_node: input.to_string(), to_node: def.name.clone() })?);
        }
    }
    for def in catalog.sinks.values() {
        let node = PyPipelineNode { name: def.name.clone(), node_type: "sink".into(), schema: None, sql: Some(def.sql.clone()) };
        nodes.push(Py::new(py, node)?);
        // A sink over its own hidden stream is drawn from that stream's inputs.
        let inputs: Vec<String> = match catalog.streams.get(&def.input) {
            Some(stream) if def.owns_input => {
                let mut v: Vec<String> = stream.plan.inputs().map(str::to_string).collect();
                v.dedup();
                v
            }
            _ => vec![def.input.clone()],
        };
        for input in inputs {
            edges.push(Py::new(py, PyPipelineEdge { from_node: input, to_node: def.name.clone() })?);
        }
    }
    Ok(PyPipelineTopology { nodes, edges })
}
