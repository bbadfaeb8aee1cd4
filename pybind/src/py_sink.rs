//! Python sinks (`connector = 'python'`): each shard's instance hands every batch it
//! writes to a function or object registered by name (`Connection.register_sink`,
//! `@laminardb.sink`), as a pyarrow RecordBatch (or pandas / polars), with the GIL taken
//! once per batch on the shard's thread. An exception counts against the sink
//! (`sink_metrics().errors`, `last_error`, with its traceback) and goes to the sink's
//! `on_error`; the batch is dropped for that sink, the other sinks and streams go on.
//! Registrations live in the process, not the database: a database with storage refuses
//! these sinks (`engine::sink::register_transient`), as it could not open them again.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3_arrow::PyRecordBatch;

use laminardb_engine::sink::{OptionsChecked, Sink, SinkContext};
use laminardb_engine::source::ConnectorOptions;
use laminardb_engine::{Error, Result};

use crate::errors::to_pyerr;

struct Registered {
    target: Py<PyAny>,
    format: String,
    on_error: Option<Py<PyAny>>,
}

static SINKS: Mutex<BTreeMap<String, Registered>> = Mutex::new(BTreeMap::new());

/// Makes `target` the Python sink `name` (replacing one of that name for sinks created
/// after).
#[pyfunction]
#[pyo3(name = "_register_sink", signature = (name, target, format="arrow", on_error=None))]
pub fn register_sink(name: &str, target: Bound<'_, PyAny>, format: &str, on_error: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    if name.is_empty() {
        return Err(to_pyerr(Error::connector("register_sink: the name is empty")));
    }
    if !(target.is_callable() || target.hasattr("write")?) {
        return Err(to_pyerr(Error::connector(format!("register_sink('{name}', …): neither callable nor with a write(batch) method"))));
    }
    if !matches!(format, "arrow" | "pandas" | "polars") {
        return Err(to_pyerr(Error::connector(format!("register_sink('{name}', …): format '{format}' is not one of arrow, pandas, polars"))));
    }
    let registered = Registered { target: target.unbind(), format: format.to_string(), on_error: on_error.map(Bound::unbind) };
    SINKS.lock().insert(name.to_string(), registered);
    Ok(())
}

/// The `python` connector's factory.
pub fn create(options: &ConnectorOptions, context: &SinkContext) -> Result<Box<dyn Sink>> {
    options.check_known(&["name"])?;
    let name = options.required("name")?.to_string();
    let found = Python::attach(|py| {
        SINKS.lock().get(&name).map(|r| (r.target.clone_ref(py), r.format.clone(), r.on_error.as_ref().map(|e| e.clone_ref(py))))
    });
    let Some((target, format, on_error)) = found else {
        return Err(Error::connector(format!(
            "python sink: nothing is registered as '{name}' (Connection.register_sink or @laminardb.sink first)"
        )));
    };
    let Some(task) = context.task else { return Ok(Box::new(OptionsChecked)) };
    // A class: an instance per shard.
    let target = Python::attach(|py| -> Result<Py<PyAny>> {
        let bound = target.bind(py);
        if bound.is_instance_of::<pyo3::types::PyType>() {
            return bound
                .call0()
                .map(Bound::unbind)
                .map_err(|e| Error::connector(format!("python sink '{name}': making an instance: {}", crate::udf::traceback(py, &e))));
        }
        Ok(target)
    })?;
    let sink = PythonSink { name, target, format, on_error };
    sink.hook("open", &[task.shard as u64])?;
    Ok(Box::new(sink))
}

struct PythonSink {
    name: String,
    target: Py<PyAny>,
    format: String,
    on_error: Option<Py<PyAny>>,
}

impl PythonSink {
    /// Runs `f` with the GIL; a Python exception is this sink's error (also handed to
    /// `on_error`).
    fn call(&self, f: impl FnOnce(Python<'_>) -> PyResult<()>) -> Result<()> {
        crate::udf::keep_thread_state();
        Python::attach(|py| {
            let Err(e) = f(py) else { return Ok(()) };
            let text = crate::udf::traceback(py, &e);
            let error = Error::connector(format!("python sink '{}': {text}", self.name));
            if let Some(handler) = &self.on_error {
                let exception = to_pyerr(error.clone());
                let _ = exception.value(py).setattr("__cause__", e.value(py));
                if let Err(failed) = handler.bind(py).call1((exception.value(py),)) {
                    failed.print(py);
                }
            }
            Err(error)
        })
    }

    /// Calls the object's method `method` with `args`, when it has one.
    fn hook(&self, method: &str, args: &[u64]) -> Result<()> {
        self.call(|py| {
            let target = self.target.bind(py);
            // A function has no hooks; an object with `write` may.
            if !target.hasattr("write")? || !target.hasattr(method)? {
                return Ok(());
            }
            target.call_method1(method, pyo3::types::PyTuple::new(py, args)?).map(|_| ())
        })
    }
}

impl Sink for PythonSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.call(|py| {
            let arrow = PyRecordBatch::new(batch.clone()).into_pyarrow(py)?;
            let converted = py.import("laminardb._sinks")?.call_method1("_convert", (arrow, self.format.as_str()))?;
            let target = self.target.bind(py);
            if target.hasattr("write")? {
                target.call_method1("write", (converted,))?;
            } else {
                target.call1((converted,))?;
            }
            Ok(())
        })
    }

    fn checkpoint(&mut self, id: u64) -> Result<()> {
        self.hook("checkpoint", &[id])
    }

    fn close(&mut self) -> Result<()> {
        self.hook("close", &[])
    }
}
