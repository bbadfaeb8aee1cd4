//! # laminardb._laminardb: the Python extension module
//!
//! Thin `Py*` classes over [`laminardb_shards::Handle`]. This crate converts Python values
//! to Arrow and back, maps errors to the exception tree ([`errors`]) and enters the
//! engine only through [`gil::blocking`], which releases the GIL and catches panics.
//! It holds no engine logic of its own.

mod catalog;
mod config;
mod connection;
mod convert;
mod errors;
mod gil;
mod metrics;
mod py_sink;
mod result;
mod subscription;
mod functions;
mod group_call;
mod udaf;
mod udf;
mod writer;

use pyo3::prelude::*;

/// mimalloc for small blocks, glibc for large ones: see `laminardb_engine::alloc`.
#[global_allocator]
static ALLOCATOR: laminardb_engine::alloc::Split = laminardb_engine::alloc::Split;

use laminardb_engine::{Error, ErrorCode};

use crate::config::PyLaminarConfig;
use crate::connection::{open_connection, PyConnection};
use crate::errors::to_pyerr;

/// The storage directory a database location names: a plain path does, `:memory:` and
/// URIs (`memory://`, `laminar://…`) do not.
fn storage_path(location: &str) -> Option<String> {
    (location != ":memory:" && !location.contains("://")).then(|| location.to_string())
}

/// Opens an embedded database. `path` is its storage directory (created if missing;
/// `config.storage_dir` takes precedence), or ":memory:" for one that keeps nothing.
#[pyfunction]
#[pyo3(signature = (path, *, config=None))]
fn open<'py>(py: Python<'py>, path: &str, config: Option<PyLaminarConfig>) -> PyResult<Bound<'py, PyConnection>> {
    if path.is_empty() {
        return Err(to_pyerr(Error::new(ErrorCode::ConnectionFailed, "the database path is empty")));
    }
    let metrics_port = config.as_ref().and_then(|c| c.metrics_port);
    let mut config = config.map(|c| c.inner).unwrap_or_default();
    if config.storage_dir.is_none() {
        config.storage_dir = storage_path(path);
    }
    let conn = Bound::new(py, open_connection(py, config)?)?;
    if let Some(port) = metrics_port {
        if let Err(e) = py.import("laminardb._metrics").and_then(|m| m.call_method1("serve", (&conn, port))) {
            let _ = conn.call_method0("close");
            return Err(to_pyerr(Error::new(ErrorCode::ConnectionFailed, format!("serving metrics on 127.0.0.1:{port}: {e}"))));
        }
    }
    Ok(conn)
}

/// Opens an embedded database from a URI: `laminar://[host[:port]]/name`, `memory://`,
/// or a plain path. Everything runs in this process; host and port are accepted for
/// compatibility and not contacted.
#[pyfunction]
fn connect(py: Python<'_>, uri: &str) -> PyResult<PyConnection> {
    let supported = uri == ":memory:"
        || uri.starts_with("laminar://")
        || uri.starts_with("memory://")
        || !uri.contains("://");
    if !supported || uri.is_empty() {
        return Err(to_pyerr(Error::new(
            ErrorCode::ConnectionFailed,
            format!("unsupported URI '{uri}': use laminar://…, memory:// or a path"),
        )));
    }
    let config = laminardb_engine::config::EngineConfig { storage_dir: storage_path(uri), ..Default::default() };
    open_connection(py, config)
}

#[pymodule]
fn _laminardb(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    laminardb_connectors::register();
    laminardb_engine::sink::register_transient("python", py_sink::create);
    m.add_function(wrap_pyfunction!(py_sink::register_sink, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(subscription::_stop_async_waiter, m)?)?;
    m.add_class::<PyConnection>()?;
    m.add_class::<PyLaminarConfig>()?;
    m.add_class::<writer::PyWriter>()?;
    m.add_class::<result::PyQueryResult>()?;
    m.add_class::<result::PyExecuteResult>()?;
    m.add_class::<result::PyQueryStream>()?;
    m.add_class::<subscription::PySubscription>()?;
    m.add_class::<metrics::PyPipelineMetrics>()?;
    m.add_class::<metrics::PySourceMetrics>()?;
    m.add_class::<metrics::PyStreamMetrics>()?;
    m.add_class::<metrics::PySinkMetrics>()?;
    m.add_class::<metrics::PyPipelineTopology>()?;
    m.add_class::<metrics::PyPipelineNode>()?;
    m.add_class::<metrics::PyPipelineEdge>()?;
    m.add_class::<subscription::PyStreamSubscription>()?;
    m.add_class::<catalog::PySourceInfo>()?;
    m.add_class::<catalog::PySinkInfo>()?;
    m.add_class::<catalog::PyStreamInfo>()?;
    m.add_class::<catalog::PyQueryInfo>()?;
    errors::register(py, m)?;
    Ok(())
}
