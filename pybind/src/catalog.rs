//! Catalog introspection classes: `SourceInfo`, `SinkInfo`, `StreamInfo`, `QueryInfo`.

use arrow::datatypes::SchemaRef;
use pyo3::prelude::*;
use pyo3_arrow::PySchema;

#[pyclass(name = "SourceInfo", module = "laminardb", frozen)]
pub struct PySourceInfo {
    pub name: String,
    pub schema: SchemaRef,
    pub watermark_column: Option<String>,
}

#[pymethods]
impl PySourceInfo {
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[getter]
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PySchema::new(self.schema.clone()).into_pyarrow(py)
    }
    #[getter]
    fn watermark_column(&self) -> Option<String> {
        self.watermark_column.clone()
    }
    fn __repr__(&self) -> String {
        format!("SourceInfo(name='{}', columns={})", self.name, self.schema.fields().len())
    }
}

#[pyclass(name = "SinkInfo", module = "laminardb", frozen)]
pub struct PySinkInfo {
    pub name: String,
}

#[pymethods]
impl PySinkInfo {
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }
    fn __repr__(&self) -> String {
        format!("SinkInfo(name='{}')", self.name)
    }
}

#[pyclass(name = "StreamInfo", module = "laminardb", frozen)]
pub struct PyStreamInfo {
    pub name: String,
    pub sql: Option<String>,
}

#[pymethods]
impl PyStreamInfo {
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[getter]
    fn sql(&self) -> Option<String> {
        self.sql.clone()
    }
    fn __repr__(&self) -> String {
        format!("StreamInfo(name='{}')", self.name)
    }
}

#[pyclass(name = "QueryInfo", module = "laminardb", frozen)]
pub struct PyQueryInfo {
    pub id: u64,
    pub sql: String,
    pub active: bool,
}

#[pymethods]
impl PyQueryInfo {
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }
    #[getter]
    fn sql(&self) -> String {
        self.sql.clone()
    }
    #[getter]
    fn active(&self) -> bool {
        self.active
    }
    fn __repr__(&self) -> String {
        format!("QueryInfo(id={}, active={})", self.id, if self.active { "True" } else { "False" })
    }
}
