//! Query results: `QueryResult` (materialized batches with every export), `ExecuteResult`
//! and the `stream()` iterator.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parking_lot::Mutex;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyList, PyTuple};
use pyo3_arrow::{PySchema, PyTable};

use laminardb_engine::frontend::{BatchReceiver, CancelFlag};
use laminardb_engine::{Error, ErrorCode, Result};

use crate::errors::IntoPyResult;
use crate::gil::blocking;

#[pyclass(name = "QueryResult", module = "laminardb", frozen)]
pub struct PyQueryResult {
    batches: Vec<RecordBatch>,
    schema: SchemaRef,
}

impl PyQueryResult {
    pub fn new(batches: Vec<RecordBatch>, schema: SchemaRef) -> Self {
        let batches = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        PyQueryResult { batches, schema }
    }

    pub fn to_arrow_batches(&self) -> &[RecordBatch] {
        &self.batches
    }

    pub fn row_count(&self) -> usize {
        self.rows()
    }

    fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    fn table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyTable::try_new(self.batches.clone(), self.schema.clone())?.into_pyarrow(py)
    }

    /// Rows `[0, limit)` as Python tuples, built column by column.
    fn tuples<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyList>> {
        let table = self.table(py)?;
        let table = if limit < self.rows() { table.call_method1("slice", (0, limit))? } else { table };
        let columns = table.getattr("columns")?;
        let mut lists = Vec::new();
        for column in columns.try_iter()? {
            lists.push(column?.call_method0("to_pylist")?);
        }
        let builtins = py.import("builtins")?;
        let zipped = builtins.getattr("zip")?.call1(PyTuple::new(py, lists)?)?;
        builtins.getattr("list")?.call1((zipped,))?.cast_into::<PyList>().map_err(Into::into)
    }
}

#[pymethods]
impl PyQueryResult {
    #[getter]
    fn num_rows(&self) -> usize {
        self.rows()
    }
    #[getter]
    fn num_columns(&self) -> usize {
        self.schema.fields().len()
    }
    #[getter]
    fn num_batches(&self) -> usize {
        self.batches.len()
    }
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PySchema::new(self.schema.clone()).into_pyarrow(py)
    }
    #[getter]
    fn columns(&self) -> Vec<String> {
        self.schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    fn to_arrow<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py)
    }
    fn arrow<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py)
    }
    fn to_pandas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py)?.call_method0("to_pandas")
    }
    fn df<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.to_pandas(py)
    }
    fn to_polars<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("polars")?.call_method1("from_arrow", (self.table(py)?,))
    }
    #[pyo3(signature = (*, lazy=false))]
    fn pl<'py>(&self, py: Python<'py>, lazy: bool) -> PyResult<Bound<'py, PyAny>> {
        let frame = self.to_polars(py)?;
        if lazy { frame.call_method0("lazy") } else { Ok(frame) }
    }
    fn to_dicts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.table(py)?.call_method0("to_pydict")
    }
    /// The richest frame library installed: polars, then pandas, else a pyarrow Table.
    fn to_df<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if py.import("polars").is_ok() {
            return self.to_polars(py);
        }
        if py.import("pandas").is_ok() {
            return self.to_pandas(py);
        }
        self.table(py)
    }

    fn fetchone<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let rows = self.tuples(py, 1)?;
        Ok(if rows.is_empty() { None } else { Some(rows.get_item(0)?) })
    }
    fn fetchall<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.tuples(py, usize::MAX)
    }
    #[pyo3(signature = (size=1))]
    fn fetchmany<'py>(&self, py: Python<'py>, size: usize) -> PyResult<Bound<'py, PyList>> {
        self.tuples(py, size)
    }

    #[pyo3(signature = (max_rows=20))]
    fn show(&self, py: Python<'_>, max_rows: usize) -> PyResult<()> {
        let shown = self.batches.iter().map(|b| b.num_rows()).sum::<usize>().min(max_rows);
        let mut batches = Vec::new();
        let mut left = shown;
        for b in &self.batches {
            if left == 0 {
                break;
            }
            let take = left.min(b.num_rows());
            batches.push(b.slice(0, take));
            left -= take;
        }
        let mut text = if batches.is_empty() {
            format!("(empty result; columns: {})", self.columns().join(", "))
        } else {
            arrow::util::pretty::pretty_format_batches(&batches).map_err(Error::from).py()?.to_string()
        };
        if self.rows() > shown {
            text.push_str(&format!("\n… {} more rows", self.rows() - shown));
        }
        py.import("builtins")?.getattr("print")?.call1((text,))?;
        Ok(())
    }

    /// Notebooks: pandas' table of the rows; without pandas (or if the conversion fails),
    /// the repr in a `<pre>`.
    fn _repr_html_(slf: &Bound<'_, Self>) -> String {
        let table = slf.call_method0("to_pandas").and_then(|df| df.call_method0("_repr_html_")).and_then(|h| h.extract::<String>());
        table.unwrap_or_else(|_| {
            let text = slf.borrow().__repr__();
            format!("<pre>{}</pre>", text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;"))
        })
    }

    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyCapsule>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let table = PyTable::try_new(self.batches.clone(), self.schema.clone())?;
        table.into_pyobject(py)?.call_method1("__arrow_c_stream__", (requested_schema,))
    }

    fn __len__(&self) -> usize {
        self.rows()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.tuples(py, usize::MAX)?.try_iter().map(|i| i.into_any())
    }

    fn __repr__(&self) -> String {
        format!("QueryResult(rows={}, columns={})", self.rows(), self.schema.fields().len())
    }
}

/// Collects a running query into a result, waiting without the GIL.
pub fn collect(py: Python<'_>, schema: SchemaRef, batches: BatchReceiver) -> PyResult<PyQueryResult> {
    let collected = blocking(py, move || {
        let mut out = Vec::new();
        for batch in batches.iter() {
            out.push(batch?);
        }
        Ok(out)
    })?;
    Ok(PyQueryResult::new(collected, schema))
}

#[pyclass(name = "ExecuteResult", module = "laminardb", frozen)]
pub struct PyExecuteResult {
    pub result_type: &'static str,
    pub rows_affected: u64,
    pub ddl_type: Option<String>,
    pub ddl_object: Option<String>,
    pub result: Option<Py<PyQueryResult>>,
}

#[pymethods]
impl PyExecuteResult {
    /// "ddl", "rows_affected", "query" or "metadata".
    #[getter]
    fn result_type(&self) -> &'static str {
        self.result_type
    }
    #[getter]
    fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
    #[getter]
    fn ddl_type(&self) -> Option<String> {
        self.ddl_type.clone()
    }
    #[getter]
    fn ddl_object(&self) -> Option<String> {
        self.ddl_object.clone()
    }
    fn to_query_result(&self, py: Python<'_>) -> Option<Py<PyQueryResult>> {
        self.result.as_ref().map(|r| r.clone_ref(py))
    }
    fn __int__(&self) -> u64 {
        self.rows_affected
    }
    /// A statement that ran is truthy; DML that touched no row is not.
    fn __bool__(&self) -> bool {
        self.result_type != "rows_affected" || self.rows_affected > 0
    }
    fn __repr__(&self) -> String {
        match self.result_type {
            "ddl" => format!(
                "ExecuteResult(ddl, {} {})",
                self.ddl_type.as_deref().unwrap_or(""),
                self.ddl_object.as_deref().unwrap_or("")
            ),
            "rows_affected" => format!("ExecuteResult(rows_affected={})", self.rows_affected),
            other => format!("ExecuteResult({other}, rows={})", self.rows_affected),
        }
    }
}

/// `conn.stream(sql)`: result batches as they are produced.
#[pyclass(name = "QueryStream", module = "laminardb", frozen)]
pub struct PyQueryStream {
    schema: SchemaRef,
    batches: BatchReceiver,
    cancel: CancelFlag,
    state: Mutex<StreamState>,
    on_finish: Arc<dyn Fn() + Send + Sync>,
    /// Whether the connection that ran the query has been closed: reads after that raise
    /// SHUTDOWN (901) instead of whatever the torn-down query left in the channel.
    connection_closed: Arc<dyn Fn() -> bool + Send + Sync>,
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum StreamState {
    Active,
    Finished,
    Cancelled,
}

impl PyQueryStream {
    pub fn new(
        schema: SchemaRef,
        batches: BatchReceiver,
        cancel: CancelFlag,
        on_finish: Arc<dyn Fn() + Send + Sync>,
        connection_closed: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        PyQueryStream { schema, batches, cancel, state: Mutex::new(StreamState::Active), on_finish, connection_closed }
    }

    fn finish(&self, state: StreamState) {
        let mut current = self.state.lock();
        if *current == StreamState::Active {
            *current = state;
            (self.on_finish)();
        }
    }

    /// What a read must do before touching the channel: `Ok(false)` ends the iteration
    /// (cancelled by `cancel()` or already finished), an error reports a cancellation from
    /// `cancel_query()` or a closed connection, `Ok(true)` reads.
    fn before_read(&self) -> PyResult<bool> {
        match *self.state.lock() {
            StreamState::Cancelled | StreamState::Finished => return Ok(false),
            StreamState::Active => {}
        }
        if self.cancel.is_cancelled() {
            self.finish(StreamState::Cancelled);
            return Err(Error::new(ErrorCode::QueryCancelled, "the query was cancelled")).py();
        }
        if (self.connection_closed)() {
            self.finish(StreamState::Finished);
            return Err(Error::shutdown()).py();
        }
        Ok(true)
    }

    fn receive(&self, result: std::result::Result<Result<RecordBatch>, flume::RecvError>) -> PyResult<Option<PyQueryResult>> {
        match result {
            Ok(Ok(batch)) => Ok(Some(PyQueryResult::new(vec![batch], self.schema.clone()))),
            Ok(Err(_)) | Err(_) if (self.connection_closed)() => {
                self.finish(StreamState::Finished);
                Err(Error::shutdown()).py()
            }
            Ok(Err(e)) => {
                self.finish(StreamState::Finished);
                Err(e).py()
            }
            Err(_) => {
                self.finish(StreamState::Finished);
                Ok(None)
            }
        }
    }
}

#[pymethods]
impl PyQueryStream {
    #[getter]
    fn is_active(&self) -> bool {
        *self.state.lock() == StreamState::Active && !self.cancel.is_cancelled()
    }

    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PySchema::new(self.schema.clone()).into_pyarrow(py)
    }

    /// The next batch if one is ready, else `None`.
    fn try_next(&self) -> PyResult<Option<PyQueryResult>> {
        if !self.before_read()? {
            return Ok(None);
        }
        match self.batches.try_recv() {
            Ok(batch) => self.receive(Ok(batch)),
            Err(flume::TryRecvError::Empty) => Ok(None),
            Err(flume::TryRecvError::Disconnected) => self.receive(Err(flume::RecvError::Disconnected)),
        }
    }

    fn cancel(&self) {
        self.cancel.cancel();
        self.finish(StreamState::Cancelled);
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<PyQueryResult> {
        if !self.before_read()? {
            return Err(PyStopIteration::new_err(()));
        }
        let rx = self.batches.clone();
        let received = py.detach(move || rx.recv());
        match self.receive(received)? {
            Some(r) => Ok(r),
            None => Err(PyStopIteration::new_err(())),
        }
    }

    fn __repr__(&self) -> &'static str {
        match *self.state.lock() {
            StreamState::Active if self.cancel.is_cancelled() => "QueryStream(cancelled)",
            StreamState::Active => "QueryStream(active)",
            StreamState::Finished => "QueryStream(finished)",
            StreamState::Cancelled => "QueryStream(cancelled)",
        }
    }
}
