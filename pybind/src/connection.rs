//! `Connection`: one embedded database. Every method checks the connection is open,
//! converts its Python arguments, and calls the coordinator with the GIL released.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{Array, StringArray};
use arrow::datatypes::DataType;
use parking_lot::Mutex;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use pyo3_arrow::{PyDataType, PySchema};

use laminardb_engine::catalog::SourceKind;
use laminardb_engine::frontend::{CancelFlag, QueryKind, Request};
use laminardb_engine::types::sql_type_name;
use laminardb_engine::Error;
use laminardb_shards::command::PanicSite;
use laminardb_shards::{Handle, Outcome};

use crate::catalog::{PyQueryInfo, PySinkInfo, PySourceInfo, PyStreamInfo};
use crate::convert::{to_batches, to_scalar};
use crate::errors::{to_pyerr, IntoPyResult};
use crate::gil::blocking;
use crate::result::{collect, PyExecuteResult, PyQueryResult, PyQueryStream};
use crate::metrics::{self, PyPipelineMetrics, PySourceMetrics, PyStreamMetrics};
use crate::subscription::{PyStreamSubscription, PySubscription, SubCore};
use crate::functions::{declared_arg_types, declared_type, function_name};
use crate::writer::{PyWriter, NO_WATERMARK};

use laminardb_engine::stream::output::SUBSCRIBER_BATCHES_MAX;

/// Streams the binding creates for itself (for `subscribe(sql)`) start with this.
const HIDDEN_PREFIX: &str = "__";

#[derive(Copy, Clone, PartialEq, Eq)]
enum PipelineState {
    Created,
    Running,
    Stopped,
}

struct QueryRecord {
    id: u64,
    sql: String,
    active: Arc<std::sync::atomic::AtomicBool>,
    cancel: Option<CancelFlag>,
}

/// Per-connection bookkeeping the Python layer keeps: queries and counters.
#[derive(Default)]
pub struct ConnState {
    queries: Mutex<Vec<QueryRecord>>,
    next_query_id: AtomicU64,
    events: AtomicU64,
    writers: crate::writer::Writers,
}

/// How many finished queries `queries()` remembers.
const FINISHED_QUERIES_MAX: usize = 256;

impl ConnState {
    pub fn count_events(&self, rows: u64) {
        self.events.fetch_add(rows, Ordering::Relaxed);
    }

    pub fn add_writer(&self, writer: std::sync::Weak<crate::writer::Shared>) {
        self.writers.add(writer);
    }

    /// Waits until the rows this connection's writers accepted are stored, so the
    /// connection's next call sees them.
    fn settle_writers(&self) {
        let writers = self.writers.unsettled();
        if !writers.is_empty() {
            Python::attach(|py| py.detach(|| writers.iter().for_each(|w| w.settle())));
        }
    }

    fn record(&self, sql: &str, active: bool, cancel: Option<CancelFlag>) -> (u64, Arc<std::sync::atomic::AtomicBool>) {
        let id = self.next_query_id.fetch_add(1, Ordering::Relaxed) + 1;
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(active));
        let mut queries = self.queries.lock();
        queries.push(QueryRecord { id, sql: sql.to_string(), active: flag.clone(), cancel });
        if queries.len() > FINISHED_QUERIES_MAX {
            if let Some(i) = queries.iter().position(|q| !q.active.load(Ordering::Acquire)) {
                queries.remove(i);
            }
        }
        (id, flag)
    }
}

#[pyclass(name = "Connection", module = "laminardb", frozen, weakref)]
pub struct PyConnection {
    handle: Arc<Handle>,
    state: Arc<ConnState>,
    pipeline: Mutex<PipelineState>,
    opened: std::time::Instant,
    /// The storage directory of a database that reopens (where its functions are kept).
    storage: Option<String>,
}

impl PyConnection {
    pub fn new(handle: Handle, storage: Option<String>) -> Self {
        PyConnection {
            handle: Arc::new(handle),
            state: Arc::default(),
            pipeline: Mutex::new(PipelineState::Created),
            opened: std::time::Instant::now(),
            storage,
        }
    }

    /// The engine, once the rows this connection's writers accepted are stored.
    fn open(&self) -> PyResult<&Arc<Handle>> {
        if self.handle.is_closed() {
            return Err(to_pyerr(Error::closed()));
        }
        self.state.settle_writers();
        Ok(&self.handle)
    }

    fn run_sql(&self, py: Python<'_>, sql: &str, params: Vec<laminardb_shards::command::ScalarValue>) -> PyResult<Vec<Outcome>> {
        let handle = self.open()?;
        let outcomes = blocking(py, || handle.execute(sql, params))?;
        for outcome in &outcomes {
            if let Outcome::RowsAffected(n) = outcome {
                self.state.count_events(*n);
            }
        }
        Ok(outcomes)
    }

    /// Runs `sql` and materializes the last statement's rows.
    fn query_impl(&self, py: Python<'_>, sql: &str, params: Option<&Bound<'_, PyAny>>) -> PyResult<PyQueryResult> {
        let params = convert_params(params)?;
        let outcome = self.run_sql(py, sql, params)?.pop().ok_or_else(|| to_pyerr(Error::parse("empty SQL")))?;
        self.collect_outcome(py, sql, outcome)
    }

    /// A subscription to SQL that reads no table: its rows, then the end.
    fn subscribe_once(&self, py: Python<'_>, sql: &str) -> PyResult<PySubscription> {
        let outcome = self.run_sql(py, sql, vec![])?.pop().ok_or_else(|| to_pyerr(Error::parse("empty SQL")))?;
        let Outcome::Query { handle: query, .. } = outcome else {
            return Err(to_pyerr(Error::query("subscribe() takes a SELECT query")));
        };
        let receiver = query.batches;
        let batches = blocking(py, move || receiver.iter().collect::<laminardb_engine::Result<Vec<_>>>())?;
        let output = laminardb_engine::stream::output::Output::new(sql, query.schema.clone());
        let sub = output.subscribe(SUBSCRIBER_BATCHES_MAX, self.open()?.subscriber_queue_bytes());
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            output.publish(batch);
        }
        output.close();
        let cancel = CancelFlag::default();
        let (_, active) = self.state.record(sql, false, Some(cancel.clone()));
        Ok(PySubscription::new(SubCore::new(sub, None).listed(cancel, active)))
    }

    /// `CREATE SOURCE name (…)` from a pyarrow schema or `{name: SQL type}`, then `with`
    /// (a `WITH (…)` clause, or nothing).
    fn create_source(&self, py: Python<'_>, name: &str, schema: &Bound<'_, PyAny>, with: &str) -> PyResult<()> {
        let columns = schema_from_python(py, schema)?;
        let list: Vec<String> = columns.iter().map(|(n, t)| format!("{} {t}", quote_ident(n))).collect();
        let sql = format!("CREATE SOURCE {} ({}){with}", quote_ident(name), list.join(", "));
        self.run_sql(py, &sql, vec![])?;
        Ok(())
    }

    /// A statement's rows, materialized (`sql`: how `queries()` lists it while it runs).
    fn collect_outcome(&self, py: Python<'_>, sql: &str, outcome: Outcome) -> PyResult<PyQueryResult> {
        match outcome {
            Outcome::Query { handle, .. } => {
                let (_, active) = self.state.record(sql, true, Some(handle.cancel.clone()));
                let result = collect(py, handle.schema, handle.batches);
                active.store(false, Ordering::Release);
                result
            }
            Outcome::RowsAffected(n) => Ok(count_result(n)),
            Outcome::Ddl { .. } => Ok(PyQueryResult::new(vec![], Arc::new(arrow::datatypes::Schema::empty()))),
        }
    }

    fn source_names(&self, kinds: &[SourceKind]) -> PyResult<Vec<String>> {
        let catalog = self.open()?.catalog();
        Ok(catalog.sources.values().filter(|d| kinds.contains(&d.kind)).map(|d| d.name.clone()).collect())
    }

    fn watermark_of(&self, py: Python<'_>, source: &str) -> PyResult<i64> {
        let handle = self.open()?;
        blocking(py, || handle.watermark(source, None)).map(laminardb_engine::dataflow::Watermark::encode)
    }
}

fn count_result(n: u64) -> PyQueryResult {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "count",
        arrow::datatypes::DataType::UInt64,
        false,
    )]));
    let batch = arrow::array::RecordBatch::try_new(schema.clone(), vec![Arc::new(arrow::array::UInt64Array::from(vec![n]))])
        .expect("count batch matches its schema");
    PyQueryResult::new(vec![batch], schema)
}

fn convert_params(params: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<laminardb_shards::command::ScalarValue>> {
    let Some(params) = params else { return Ok(vec![]) };
    if params.is_none() {
        return Ok(vec![]);
    }
    if !(params.is_instance_of::<PyList>() || params.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err("params must be a list or tuple of values for $1, $2, …"));
    }
    params.try_iter()?.map(|v| to_scalar(&v?)).collect()
}

fn schema_from_python(py: Python<'_>, schema: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    if let Ok(dict) = schema.cast::<PyDict>() {
        if dict.is_empty() {
            return Err(to_pyerr(Error::invalid_schema("a schema needs at least one column")));
        }
        let mut columns = Vec::new();
        for (name, ty) in dict.iter() {
            let name: String = name.extract().map_err(|_| PyTypeError::new_err("column names must be strings"))?;
            let ty: String = ty.extract().map_err(|_| PyTypeError::new_err("column types must be type-name strings"))?;
            let parsed = laminardb_engine::types::parse_type_string(&ty).py()?;
            columns.push((name, sql_type_name(&parsed).py()?));
        }
        return Ok(columns);
    }
    if schema.hasattr("__arrow_c_schema__")? {
        let schema: PySchema = schema.extract()?;
        let schema = schema.into_inner();
        if schema.fields().is_empty() {
            return Err(to_pyerr(Error::invalid_schema("a schema needs at least one column")));
        }
        let _ = py;
        return schema
            .fields()
            .iter()
            .map(|f| {
                let mut ty = sql_type_name(f.data_type()).py()?;
                if !f.is_nullable() {
                    ty.push_str(" NOT NULL");
                }
                Ok((f.name().clone(), ty))
            })
            .collect();
    }
    Err(PyTypeError::new_err("schema must be a pyarrow.Schema or a dict of column name to type string"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[pymethods]
impl PyConnection {
    // ---- lifecycle -------------------------------------------------------------------

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if !self.handle.is_closed() {
            self.state.settle_writers();
        }
        let handle = self.handle.clone();
        blocking(py, move || handle.close())
    }

    #[getter]
    fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Makes `function` callable from SQL as `name` (see `laminardb.udf`): in queries,
    /// subscriptions and streams (in a database with storage, only if it can be imported
    /// again when the database reopens: `functions`).
    #[pyo3(signature = (name, function, return_type=None, *, arg_types=None, vectorized=None))]
    fn register_udf(
        &self,
        py: Python<'_>,
        name: &str,
        function: Bound<'_, PyAny>,
        return_type: Option<PyDataType>,
        arg_types: Option<Vec<PyDataType>>,
        vectorized: Option<bool>,
    ) -> PyResult<()> {
        let handle = self.open()?;
        if !function.is_callable() {
            return Err(to_pyerr(Error::query(format!("register_udf('{name}', …): the function is not callable"))));
        }
        let spec = py.import("laminardb._udf")?.call_method1("_spec", (&function,))?;
        let return_type = declared_type(return_type, &spec, "return_type", &format!("register_udf('{name}', …)"), "a function decorated with @laminardb.udf")?;
        let vectorized = match vectorized {
            Some(v) => v,
            None => spec.get_item("vectorized").ok().map(|v| v.extract::<bool>()).transpose()?.unwrap_or(true),
        };
        let sql_name = function_name("register_udf", name)?;
        let arg_types = declared_arg_types(arg_types, &spec)?;
        let spec = crate::functions::Spec::Scalar { return_type, arg_types, vectorized };
        crate::functions::register(py, &handle.catalog().functions, self.storage.as_deref(), &sql_name, function, spec)
    }

    /// Makes `cls` callable from SQL as the aggregate `name` (see `laminardb.udaf`): in
    /// GROUP BY queries and streams (with storage, as for `register_udf`).
    #[pyo3(signature = (name, cls, return_type=None, accumulator_type=None, *, arg_types=None))]
    fn register_udaf(
        &self,
        py: Python<'_>,
        name: &str,
        cls: Bound<'_, PyAny>,
        return_type: Option<PyDataType>,
        accumulator_type: Option<PyDataType>,
        arg_types: Option<Vec<PyDataType>>,
    ) -> PyResult<()> {
        let handle = self.open()?;
        let spec = py.import("laminardb._udf")?.call_method1("_udaf_spec", (&cls,))?;
        let call = format!("register_udaf('{name}', …)");
        let decorated = "a class decorated with @laminardb.udaf";
        let return_type = declared_type(return_type, &spec, "return_type", &call, decorated)?;
        let DataType::Struct(state) = declared_type(accumulator_type, &spec, "accumulator_type", &call, decorated)? else {
            return Err(to_pyerr(Error::query(format!(
                "register_udaf('{name}', …): accumulator_type must be a pyarrow struct naming the state's attributes"
            ))));
        };
        let sql_name = function_name("register_udaf", name)?;
        let arg_types = declared_arg_types(arg_types, &spec)?;
        let spec = crate::functions::Spec::Aggregate { return_type, state, arg_types };
        crate::functions::register(py, &handle.catalog().functions, self.storage.as_deref(), &sql_name, cls, spec)
    }

    /// Makes `target` the Python sink `name` for `CREATE SINK … WITH (connector =
    /// 'python', name = '…')`: a function called with each batch, or an object (or a
    /// class, made once per shard) with `write(batch)` and optionally `open(shard)`,
    /// `checkpoint(id)`, `close()`. `format`: `arrow` (a RecordBatch), `pandas`, `polars`.
    #[pyo3(signature = (name, target, *, format="arrow", on_error=None))]
    fn register_sink(&self, name: &str, target: Bound<'_, PyAny>, format: &str, on_error: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        self.open()?;
        crate::py_sink::register_sink(name, target, format, on_error)
    }

    /// Makes a Python generator (or async generator) function the feed of source `name`
    /// (created from `schema` if it does not exist; see `laminardb.source`): pulled on a
    /// daemon thread from `start()` on, each item inserted.
    #[pyo3(signature = (name, source, schema=None, *, watermark=None, delay_ms=None, on_error=None))]
    #[allow(clippy::too_many_arguments)]
    fn register_source(
        slf: &Bound<'_, Self>,
        name: &str,
        source: Bound<'_, PyAny>,
        schema: Option<Bound<'_, PyAny>>,
        watermark: Option<String>,
        delay_ms: Option<i64>,
        on_error: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (py, this) = (slf.py(), slf.get());
        let handle = this.open()?;
        if !source.is_callable() {
            return Err(to_pyerr(Error::connector(format!("register_source('{name}', …): the source is not callable"))));
        }
        let sources = py.import("laminardb._sources")?;
        // What `@laminardb.source` said, unless the call says otherwise.
        let spec = sources.call_method1("_spec", (&source,))?;
        let declared = |key: &str| spec.get_item(key).ok().filter(|v| !v.is_none());
        if !handle.catalog().sources.contains_key(name) {
            let schema = schema.or_else(|| declared("schema")).ok_or_else(|| {
                to_pyerr(Error::connector(format!(
                    "register_source('{name}', …) needs a schema (or a function decorated with @laminardb.source)"
                )))
            })?;
            let watermark = match watermark {
                Some(w) => Some(w),
                None => declared("watermark").map(|w| w.extract::<String>()).transpose()?,
            };
            let delay_ms = match delay_ms {
                Some(d) => d,
                None => declared("delay_ms").map(|d| d.extract::<i64>()).transpose()?.unwrap_or(0),
            };
            let with = watermark.map_or(String::new(), |w| {
                format!(" WITH (watermark_column = '{}', watermark_delay_ms = '{delay_ms}')", w.replace('\'', "''"))
            });
            this.create_source(py, name, &schema, &with)?;
        }
        sources.call_method1("_Feed", (slf, name, source, on_error))?;
        Ok(())
    }

    /// Counts `message` as an error of source `name` (a Python source's feed failed).
    fn _source_error(&self, name: &str, message: &str) -> PyResult<()> {
        self.open()?.output(name).py()?.record_error(message);
        Ok(())
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self.open()?;
        blocking(py, || handle.start())?;
        *self.pipeline.lock() = PipelineState::Running;
        Ok(())
    }

    /// Stops the pipeline once every accepted event (from any thread) has passed through
    /// every stream and reached its subscribers.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self.open()?;
        blocking(py, || handle.stop_pipeline())?;
        // Subscribers read what is queued, then see the end.
        for output in handle.outputs() {
            output.close();
        }
        *self.pipeline.lock() = PipelineState::Stopped;
        Ok(())
    }

    // ---- metrics and topology --------------------------------------------------------

    fn metrics(&self) -> PyResult<PyPipelineMetrics> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let outputs = handle.outputs();
        // Sources (streams = false) or streams (true); sinks count apart.
        let sum = |streams: bool, f: &dyn Fn(&laminardb_engine::stream::output::Output) -> u64| -> u64 {
            outputs
                .iter()
                .filter(|o| !catalog.sinks.contains_key(&o.name))
                .filter(|o| catalog.streams.contains_key(&o.name) == streams)
                .map(|o| f(o))
                .sum()
        };
        let checkpoints = handle.checkpoint_stats();
        Ok(PyPipelineMetrics {
            total_events_ingested: sum(false, &|o| o.counters.rows.load(Ordering::Relaxed)),
            total_events_emitted: sum(true, &|o| o.counters.rows.load(Ordering::Relaxed))
                + outputs.iter().filter(|o| catalog.sinks.contains_key(&o.name)).map(|o| o.counters.rows.load(Ordering::Relaxed)).sum::<u64>(),
            total_events_dropped: sum(true, &|o| o.dropped_rows()),
            total_cycles: sum(false, &|o| o.counters.batches.load(Ordering::Relaxed)),
            total_batches: sum(true, &|o| o.counters.batches.load(Ordering::Relaxed))
                + sum(false, &|o| o.counters.batches.load(Ordering::Relaxed)),
            uptime_secs: self.opened.elapsed().as_secs_f64(),
            state: self.pipeline_state()?.to_string(),
            source_count: catalog.sources.len(),
            stream_count: catalog.streams.keys().filter(|n| !n.starts_with(HIDDEN_PREFIX)).count(),
            sink_count: catalog.sinks.len(),
            pipeline_watermark: self.pipeline_watermark()?,
            recovered_rows: handle.recovery().rows,
            wal_torn_tails: handle.recovery().torn_tails.len() as u64,
            wal_damage_cut: handle.recovery().damage.len() as u64,
            wal_rows_dropped: handle.recovery().dropped_rows,
            recovery_ms: handle.recovery().millis,
            checkpoints: checkpoints.count,
            last_checkpoint_id: checkpoints.last_id,
            last_checkpoint_ms: checkpoints.last_ms,
            last_checkpoint_pause_ms: checkpoints.last_pause_ms,
            last_checkpoint_bytes: checkpoints.last_bytes,
        })
    }

    /// Every metric in the Prometheus text exposition format (what
    /// `LaminarConfig(metrics_port=…)` serves at /metrics).
    fn metrics_text(slf: &Bound<'_, Self>) -> PyResult<String> {
        slf.get().open()?;
        slf.py().import("laminardb._metrics")?.call_method1("render", (slf,))?.extract()
    }

    fn source_metrics(&self, name: &str) -> PyResult<Option<PySourceMetrics>> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let Ok(def) = catalog.source(name) else { return Ok(None) };
        let outputs = handle.outputs();
        let Some(output) = outputs.iter().find(|o| o.name == def.name) else { return Ok(None) };
        let mark = output.counters.watermark.load(Ordering::Relaxed);
        let queue = (handle.queue_len(), handle.queue_capacity());
        Ok(Some(metrics::source_metrics(output, mark, queue, &catalog, &outputs)))
    }

    fn all_source_metrics(&self) -> PyResult<Vec<PySourceMetrics>> {
        let names: Vec<String> = self.open()?.catalog().sources.keys().cloned().collect();
        Ok(names.iter().filter_map(|n| self.source_metrics(n).ok().flatten()).collect())
    }

    fn stream_metrics(&self, name: &str) -> PyResult<Option<PyStreamMetrics>> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let Ok(def) = catalog.stream(name) else { return Ok(None) };
        let Ok(output) = handle.output(&def.name) else { return Ok(None) };
        Ok(Some(metrics::stream_metrics(&output, Some(def.sql.clone()))))
    }

    fn all_stream_metrics(&self) -> PyResult<Vec<PyStreamMetrics>> {
        let names = self.list_streams()?;
        Ok(names.iter().filter_map(|n| self.stream_metrics(n).ok().flatten()).collect())
    }

    /// A sink's counters: rows and batches written to its connector, errors; `None` for
    /// a name that is not a sink.
    fn sink_metrics(&self, name: &str) -> PyResult<Option<metrics::PySinkMetrics>> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let Some(def) = catalog.sinks.get(name) else { return Ok(None) };
        let Ok(output) = handle.output(&def.name) else { return Ok(None) };
        Ok(Some(metrics::sink_metrics(&output, def)))
    }

    fn all_sink_metrics(&self) -> PyResult<Vec<metrics::PySinkMetrics>> {
        let names: Vec<String> = self.open()?.catalog().sinks.keys().cloned().collect();
        Ok(names.iter().filter_map(|n| self.sink_metrics(n).ok().flatten()).collect())
    }

    fn topology(&self, py: Python<'_>) -> PyResult<metrics::PyPipelineTopology> {
        let catalog = self.open()?.catalog();
        metrics::topology(py, &catalog, |n| n.starts_with(HIDDEN_PREFIX))
    }

    #[getter]
    fn pipeline_state(&self) -> PyResult<&'static str> {
        self.open()?;
        Ok(match *self.pipeline.lock() {
            PipelineState::Created => "Created",
            PipelineState::Running => "Running",
            PipelineState::Stopped => "Stopped",
        })
    }

    /// The minimum watermark over sources that have one (epoch ms), leaving out sources
    /// idle for longer than `idle_timeout_ms` while another is active; i64::MIN if none has.
    #[getter]
    fn pipeline_watermark(&self) -> PyResult<i64> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let timeout = i64::try_from(handle.idle_timeout_ms()).unwrap_or(i64::MAX);
        // The coordinator moves each source's watermark in its output before it answers the
        // call that moved it, so the outputs are read directly, without a round trip each.
        let mut marks = Vec::new();
        for output in catalog.sources.keys().filter_map(|name| handle.output(name).ok()) {
            let mark = output.counters.watermark.load(Ordering::Relaxed);
            if mark != NO_WATERMARK {
                marks.push((output.idle_ms() > timeout, mark));
            }
        }
        let active = marks.iter().filter(|(idle, _)| !idle).map(|&(_, m)| m).min();
        Ok(active.or_else(|| marks.iter().map(|&(_, m)| m).min()).unwrap_or(NO_WATERMARK))
    }

    #[getter]
    fn total_events_processed(&self) -> PyResult<u64> {
        self.open()?;
        Ok(self.state.events.load(Ordering::Relaxed))
    }

    /// Rows dropped by streams (late for their windows, or rejected by a failing
    /// expression), summed over every stream.
    #[getter]
    fn total_events_dropped(&self) -> PyResult<u64> {
        let handle = self.open()?;
        Ok(handle.outputs().iter().map(|o| o.dropped_rows()).sum())
    }

    #[getter]
    fn source_count(&self) -> PyResult<usize> {
        Ok(self.open()?.catalog().sources.len())
    }

    #[getter]
    fn sink_count(&self) -> PyResult<usize> {
        Ok(self.open()?.catalog().sinks.len())
    }

    #[getter]
    fn active_query_count(&self) -> PyResult<usize> {
        self.open()?;
        Ok(self.state.queries.lock().iter().filter(|q| q.active.load(Ordering::Acquire)).count())
    }

    /// `checkpoint_interval_ms` was configured: checkpoints are taken automatically and
    /// `checkpoint()` takes one now.
    #[getter]
    fn is_checkpoint_enabled(&self) -> PyResult<bool> {
        Ok(self.open()?.checkpoint_enabled())
    }

    /// Takes a checkpoint now and returns its id (a `CheckpointResult`, an `int`).
    fn checkpoint<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.open()?;
        if !handle.checkpoint_enabled() {
            return Err(to_pyerr(Error::checkpoint(
                "checkpointing is disabled: configure LaminarConfig(checkpoint_interval_ms=…) (with storage_dir or a path to keep them)",
            )));
        }
        let id = blocking(py, || handle.checkpoint())?;
        py.import("laminardb.types")?.getattr("CheckpointResult")?.call1((id,))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __aenter__<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        ready_future(py, slf.into_any())
    }

    #[pyo3(signature = (*_args))]
    fn __aexit__<'py>(&self, py: Python<'py>, _args: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyAny>> {
        self.close(py)?;
        ready_future(py, pyo3::types::PyBool::new(py, false).to_owned().into_any())
    }

    fn __repr__(&self) -> &'static str {
        if self.handle.is_closed() { "Connection(closed)" } else { "Connection(open)" }
    }

    /// Number of shard reactors serving this connection.
    #[getter]
    fn shard_count(&self) -> usize {
        self.handle.shards()
    }

    // ---- schema ----------------------------------------------------------------------

    fn create_table(&self, py: Python<'_>, name: &str, schema: &Bound<'_, PyAny>) -> PyResult<()> {
        self.create_source(py, name, schema, "")
    }

    fn schema<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let catalog = self.open()?.catalog();
        // A changelog stream reports its change column only if its SQL asked for changes.
        let schema = match catalog.stream(name) {
            Ok(stream) if stream.plan.changes_asked => stream.plan.schema.clone(),
            Ok(stream) => stream.table_schema.clone(),
            Err(_) => catalog.source(name).py()?.schema.clone(),
        };
        PySchema::new(schema).into_pyarrow(py)
    }

    fn list_tables(&self) -> PyResult<Vec<String>> {
        self.source_names(&[SourceKind::Source, SourceKind::Table, SourceKind::Lookup])
    }

    fn tables(&self) -> PyResult<Vec<String>> {
        self.list_tables()
    }

    /// Streams and materialized views, by name (hidden subscription streams excluded).
    fn list_streams(&self) -> PyResult<Vec<String>> {
        let catalog = self.open()?.catalog();
        Ok(catalog.streams.keys().filter(|n| !n.starts_with(HIDDEN_PREFIX)).cloned().collect())
    }

    /// DuckDB-style alias of `list_streams()`.
    fn materialized_views(&self) -> PyResult<Vec<String>> {
        self.list_streams()
    }

    fn list_sinks(&self) -> PyResult<Vec<String>> {
        Ok(self.open()?.catalog().sinks.keys().cloned().collect())
    }

    fn sources(&self) -> PyResult<Vec<PySourceInfo>> {
        let catalog = self.open()?.catalog();
        Ok(catalog
            .sources
            .values()
            .map(|d| PySourceInfo {
                name: d.name.clone(),
                schema: d.schema.clone(),
                watermark_column: d.watermark.as_ref().map(|w| w.column.clone()),
            })
            .collect())
    }

    fn sinks(&self) -> PyResult<Vec<PySinkInfo>> {
        Ok(self.open()?.catalog().sinks.values().map(|s| PySinkInfo { name: s.name.clone() }).collect())
    }

    fn streams(&self) -> PyResult<Vec<PyStreamInfo>> {
        let catalog = self.open()?.catalog();
        Ok(catalog
            .streams
            .values()
            .filter(|s| !s.name.starts_with(HIDDEN_PREFIX))
            .map(|s| PyStreamInfo { name: s.name.clone(), sql: Some(s.sql.clone()) })
            .collect())
    }

    // ---- subscriptions ---------------------------------------------------------------

    /// `await conn.subscribe_async(sql)` → `AsyncSubscription`.
    fn subscribe_async<'py>(slf: &Bound<'py, Self>, sql: &str) -> PyResult<Bound<'py, PyAny>> {
        let helpers = slf.py().import("laminardb._subscriptions")?;
        helpers.call_method1("subscribe_async", (slf, sql))
    }

    /// `await conn.subscribe_stream_async(name)` → `AsyncStreamSubscription`.
    fn subscribe_stream_async<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let helpers = slf.py().import("laminardb._subscriptions")?;
        helpers.call_method1("subscribe_stream_async", (slf, name))
    }

    /// Calls `on_data(batch)` from a background thread for every batch of `sql`.
    #[pyo3(signature = (sql, on_data, on_error=None))]
    fn subscribe_callback<'py>(
        slf: &Bound<'py, Self>,
        sql: &str,
        on_data: Bound<'py, PyAny>,
        on_error: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let sub = slf.get().subscribe(slf.py(), sql)?;
        let helpers = slf.py().import("laminardb._subscriptions")?;
        let target = format!("query='{}'", sql.replace('\'', "\\'"));
        helpers.call_method1("CallbackSubscription", (Py::new(slf.py(), sub)?, on_data, on_error, target))
    }

    /// Calls `on_data(batch)` from a background thread for every batch of stream `name`.
    #[pyo3(signature = (name, on_data, on_error=None))]
    fn subscribe_stream_callback<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        on_data: Bound<'py, PyAny>,
        on_error: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let sub = slf.get().subscribe_stream(name)?;
        let helpers = slf.py().import("laminardb._subscriptions")?;
        let target = format!("stream='{name}'");
        helpers.call_method1("CallbackSubscription", (Py::new(slf.py(), sub)?, on_data, on_error, target))
    }

    /// Follows a named stream (or source): every batch it emits from now on.
    fn subscribe_stream(&self, name: &str) -> PyResult<PyStreamSubscription> {
        let handle = self.open()?;
        let output = handle.output(name).py()?;
        let sub = output.subscribe(SUBSCRIBER_BATCHES_MAX, handle.subscriber_queue_bytes());
        Ok(PyStreamSubscription::new(SubCore::new(sub, None), output.name.clone()))
    }

    /// Follows the rows of any `SELECT`, continuously: the query runs as a hidden stream
    /// for as long as the subscription lives.
    fn subscribe(&self, py: Python<'_>, sql: &str) -> PyResult<PySubscription> {
        let handle = self.open()?.clone();
        if laminardb_planner::reads_no_table(sql) {
            return self.subscribe_once(py, sql);
        }
        let id = self.state.next_query_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{}{id}", laminardb_engine::catalog::TRANSIENT_PREFIX);
        let request = Request::Subscribe { name: name.clone(), query: sql.to_string() };
        blocking(py, || handle.request(request))?;
        let output = handle.output(&name).py()?;
        let sub = output.subscribe(SUBSCRIBER_BATCHES_MAX, handle.subscriber_queue_bytes());
        let weak = Arc::downgrade(&handle);
        let drop_stream = move || {
            if let Some(handle) = weak.upgrade() {
                if !handle.is_closed() {
                    let _ = handle.execute(&format!("DROP STREAM IF EXISTS \"{name}\""), vec![]);
                }
            }
        };
        let cancel = CancelFlag::default();
        let (_, active) = self.state.record(sql, true, Some(cancel.clone()));
        Ok(PySubscription::new(SubCore::new(sub, Some(Box::new(drop_stream))).listed(cancel, active)))
    }

    fn queries(&self) -> PyResult<Vec<PyQueryInfo>> {
        self.open()?;
        Ok(self
            .state
            .queries
            .lock()
            .iter()
            .map(|q| PyQueryInfo { id: q.id, sql: q.sql.clone(), active: q.active.load(Ordering::Acquire) })
            .collect())
    }

    fn cancel_query(&self, query_id: u64) -> PyResult<()> {
        self.open()?;
        let queries = self.state.queries.lock();
        let record = queries
            .iter()
            .find(|q| q.id == query_id)
            .ok_or_else(|| to_pyerr(Error::query(format!("query {query_id} not found"))))?;
        if let Some(cancel) = &record.cancel {
            cancel.cancel();
        }
        record.active.store(false, Ordering::Release);
        Ok(())
    }

    // ---- ingestion -------------------------------------------------------------------

    fn insert(&self, py: Python<'_>, table: &str, data: Bound<'_, PyAny>) -> PyResult<u64> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let def = catalog.source(table).py()?;
        let batches = to_batches(py, &data, &def.schema)?;
        let rows = blocking(py, || handle.insert(table, &batches))?;
        self.state.count_events(rows);
        Ok(rows)
    }

    fn insert_json(&self, py: Python<'_>, table: &str, json_str: &str) -> PyResult<u64> {
        let handle = self.open()?;
        let rows = blocking(py, || {
            let catalog = handle.catalog();
            let def = catalog.source(table)?;
            let batches = laminardb_engine::ingest::read_json(json_str, &def.schema)?;
            handle.insert(table, &batches)
        })?;
        self.state.count_events(rows);
        Ok(rows)
    }

    fn insert_csv(&self, py: Python<'_>, table: &str, csv_str: &str) -> PyResult<u64> {
        let handle = self.open()?;
        let rows = blocking(py, || {
            let catalog = handle.catalog();
            let def = catalog.source(table)?;
            let batches = laminardb_engine::ingest::read_csv(csv_str, &def.schema)?;
            handle.insert(table, &batches)
        })?;
        self.state.count_events(rows);
        Ok(rows)
    }

    fn writer(&self, py: Python<'_>, table: &str) -> PyResult<PyWriter> {
        let handle = self.open()?;
        let catalog = handle.catalog();
        let def = catalog.source(table).py()?;
        Ok(PyWriter::new(py, handle.clone(), self.state.clone(), def.name.clone(), def.schema.clone(), def.is_changelog()))
    }

    // ---- queries ---------------------------------------------------------------------

    fn query(&self, py: Python<'_>, sql: &str) -> PyResult<PyQueryResult> {
        self.query_impl(py, sql, None)
    }

    #[pyo3(signature = (query, params=None))]
    fn sql(&self, py: Python<'_>, query: &str, params: Option<Bound<'_, PyAny>>) -> PyResult<PyQueryResult> {
        self.query_impl(py, query, params.as_ref())
    }

    #[pyo3(signature = (sql, params=None))]
    fn execute(&self, py: Python<'_>, sql: &str, params: Option<Bound<'_, PyAny>>) -> PyResult<PyExecuteResult> {
        let params = convert_params(params.as_ref())?;
        let outcome = self.run_sql(py, sql, params)?.pop().ok_or_else(|| to_pyerr(Error::parse("empty SQL")))?;
        Ok(match outcome {
            Outcome::Ddl { verb, object } => PyExecuteResult {
                result_type: "ddl",
                rows_affected: 0,
                ddl_type: Some(verb),
                ddl_object: Some(object),
                result: None,
            },
            Outcome::RowsAffected(n) => PyExecuteResult {
                result_type: "rows_affected",
                rows_affected: n,
                ddl_type: None,
                ddl_object: None,
                result: None,
            },
            Outcome::Query { kind, handle } => {
                let (_, active) = self.state.record(sql, true, Some(handle.cancel.clone()));
                let result = collect(py, handle.schema, handle.batches);
                active.store(false, Ordering::Release);
                let result = result?;
                let rows = result.row_count() as u64;
                PyExecuteResult {
                    result_type: if kind == QueryKind::Metadata { "metadata" } else { "query" },
                    rows_affected: rows,
                    ddl_type: None,
                    ddl_object: None,
                    result: Some(Py::new(py, result)?),
                }
            }
        })
    }

    /// The current contents of a named stream (or source), optionally filtered by a SQL
    /// boolean expression.
    #[pyo3(signature = (name, filter=None))]
    fn query_stream(&self, py: Python<'_>, name: &str, filter: Option<&str>) -> PyResult<PyQueryResult> {
        let catalog = self.open()?.catalog();
        if !catalog.contains(name) {
            return Err(to_pyerr(Error::query(format!("no stream named '{name}'"))));
        }
        let handle = self.open()?;
        let request = Request::StreamQuery { name: name.to_string(), filter: filter.map(str::to_string) };
        let outcome = blocking(py, || handle.request(request))?;
        let label = match filter {
            Some(f) => format!("query_stream({name:?}, {f:?})"),
            None => format!("query_stream({name:?})"),
        };
        self.collect_outcome(py, &label, outcome)
    }

    fn stream(&self, py: Python<'_>, sql: &str) -> PyResult<PyQueryStream> {
        let outcome = self.run_sql(py, sql, vec![])?.pop().ok_or_else(|| to_pyerr(Error::parse("empty SQL")))?;
        let Outcome::Query { handle, .. } = outcome else {
            return Err(to_pyerr(Error::query("stream() needs a query that returns rows")));
        };
        let (_, active) = self.state.record(sql, true, Some(handle.cancel.clone()));
        let on_finish = Arc::new(move || active.store(false, Ordering::Release));
        let conn = Arc::downgrade(&self.handle);
        let closed = Arc::new(move || conn.upgrade().is_none_or(|h| h.is_closed()));
        Ok(PyQueryStream::new(handle.schema, handle.batches, handle.cancel, on_finish, closed))
    }

    /// The logical and physical plans DataFusion chose, as text.
    fn explain(&self, py: Python<'_>, query: &str) -> PyResult<String> {
        let result = self.query_impl(py, &format!("EXPLAIN {query}"), None)?;
        let table = result.to_arrow_batches();
        let mut text = String::new();
        for batch in table {
            let kinds = batch.column(0).as_any().downcast_ref::<StringArray>();
            let plans = batch.column(1).as_any().downcast_ref::<StringArray>();
            let (Some(kinds), Some(plans)) = (kinds, plans) else { continue };
            for row in 0..batch.num_rows() {
                if kinds.is_valid(row) && plans.is_valid(row) {
                    text.push_str(&format!("{}:\n{}\n\n", kinds.value(row), plans.value(row)));
                }
            }
        }
        Ok(text.trim_end().to_string())
    }

    fn stats<'py>(&self, py: Python<'py>, table: &str) -> PyResult<Bound<'py, PyDict>> {
        let handle = self.open()?;
        let per_shard = blocking(py, || handle.stats(table))?;
        let watermark = self.watermark_of(py, table)?;
        let rows: u64 = per_shard.iter().map(|s| s.rows).sum();
        let bytes: u64 = per_shard.iter().map(|s| s.bytes).sum();
        let spilled: u64 = per_shard.iter().map(|s| s.spilled_rows).sum();
        let dict = PyDict::new(py);
        dict.set_item("name", table)?;
        dict.set_item("total_events", rows)?;
        dict.set_item("pending", 0)?;
        dict.set_item("capacity", handle.queue_capacity())?;
        dict.set_item("is_backpressured", false)?;
        dict.set_item("watermark", watermark)?;
        dict.set_item("utilization", 0.0)?;
        dict.set_item("memory_bytes", bytes)?;
        dict.set_item("spilled_rows", spilled)?;
        dict.set_item("expired_rows", per_shard.iter().map(|s| s.expired_rows).sum::<u64>())?;
        dict.set_item("rows_per_shard", per_shard.iter().map(|s| s.rows).collect::<Vec<_>>())?;
        Ok(dict)
    }

    /// Test hook: make the coordinator or a shard panic while handling a command.
    fn _inject_panic(&self, py: Python<'_>, site: &str) -> PyResult<()> {
        let handle = self.open()?;
        let site = match site {
            "coordinator" => PanicSite::Coordinator,
            "shard" => PanicSite::Shard,
            other => return Err(pyo3::exceptions::PyValueError::new_err(format!("unknown panic site {other}"))),
        };
        blocking(py, || handle.inject_panic(site))
    }
}

/// An already-completed asyncio future holding `value`, for `async with`.
fn ready_future<'py>(py: Python<'py>, value: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let asyncio = py.import("asyncio")?;
    let future = asyncio.call_method0("get_running_loop")?.call_method0("create_future")?;
    future.call_method1("set_result", (value,))?;
    Ok(future)
}

pub fn open_connection(py: Python<'_>, mut config: laminardb_engine::config::EngineConfig) -> PyResult<PyConnection> {
    let storage = config.storage_dir.clone();
    if let Some(dir) = &storage {
        config.functions = Arc::new(crate::functions::load(py, dir)?);
    }
    let handle = blocking(py, move || {
        let frontend = laminardb_planner::SqlFrontend::new(config.shards)?;
        Handle::open(config, Box::new(frontend))
    })?;
    // What recovery cut off or could not replay goes to Python's logging.
    let recovery = handle.recovery();
    if !recovery.torn_tails.is_empty() || !recovery.damage.is_empty() || !recovery.errors.is_empty() {
        let logger = py.import("logging")?.call_method1("getLogger", ("laminardb",))?;
        for line in recovery.torn_tails.iter().chain(&recovery.damage).chain(&recovery.errors) {
            logger.call_method1("warning", (format!("recovery: {line}"),))?;
        }
    }
    Ok(PyConnection::new(handle, storage))
}
