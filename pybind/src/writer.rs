//! `Writer`: a handle for repeated inserts into one source, with watermarks.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use pyo3::prelude::*;
use pyo3_arrow::PySchema;

use laminardb_engine::{Error, ErrorCode};
use laminardb_shards::Handle;

use crate::connection::ConnState;
use crate::convert::to_batches;
use crate::errors::to_pyerr;
use crate::gil::blocking;

/// No watermark yet: the smallest timestamp, as upstream reports it.
pub const NO_WATERMARK: i64 = i64::MIN;

#[pyclass(name = "Writer", module = "laminardb", frozen)]
pub struct PyWriter {
    handle: Arc<Handle>,
    state: Arc<ConnState>,
    source: String,
    schema: SchemaRef,
    watermark: AtomicI64,
    closed: AtomicBool,
}

impl PyWriter {
    pub fn new(handle: Arc<Handle>, state: Arc<ConnState>, source: String, schema: SchemaRef) -> Self {
        PyWriter { handle, state, source, schema, watermark: AtomicI64::new(NO_WATERMARK), closed: AtomicBool::new(false) }
    }

    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(to_pyerr(Error::new(ErrorCode::WriterClosed, format!("the writer for '{}' is closed", self.source))));
        }
        if self.handle.is_closed() {
            return Err(to_pyerr(Error::closed()));
        }
        Ok(())
    }
}

#[pymethods]
impl PyWriter {
    /// The source's name; `IngestionError` once the writer is closed.
    #[getter]
    fn name(&self) -> PyResult<String> {
        self.check_open()?;
        Ok(self.source.clone())
    }

    /// The source's schema; `IngestionError` once the writer is closed.
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        PySchema::new(self.schema.clone()).into_pyarrow(py)
    }

    /// Epoch milliseconds of the last watermark this writer emitted.
    #[getter]
    fn current_watermark(&self) -> i64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Inserts rows in any supported format; returns once they are stored.
    fn insert(&self, py: Python<'_>, data: Bound<'_, PyAny>) -> PyResult<()> {
        self.check_open()?;
        let batches = to_batches(py, &data, &self.schema)?;
        let handle = &self.handle;
        let source = &self.source;
        let rows = blocking(py, || handle.insert(source, &batches))?;
        self.state.count_events(rows);
        Ok(())
    }

    /// Inserts are applied as they are made, so there is never anything buffered: 0.
    fn flush(&self) -> PyResult<u64> {
        self.check_open()?;
        Ok(0)
    }

    /// Declares that no event older than `timestamp` (epoch ms) will follow.
    fn watermark(&self, py: Python<'_>, timestamp: i64) -> PyResult<()> {
        self.check_open()?;
        let handle = &self.handle;
        let source = &self.source;
        let mark = laminardb_engine::dataflow::Watermark::decode(timestamp);
        let merged = laminardb_engine::dataflow::Watermark::encode(blocking(py, || handle.watermark(source, mark))?);
        self.watermark.fetch_max(merged.max(timestamp), Ordering::AcqRel);
        Ok(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyResult<PyRef<'_, Self>> {
        slf.check_open()?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        if self.closed.load(Ordering::Acquire) {
            return "Writer(closed)".into();
        }
        format!("Writer(source='{}', open)", self.source)
    }
}
