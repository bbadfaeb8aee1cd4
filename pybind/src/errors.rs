//! The Python exception hierarchy and the one mapping from engine errors to it.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use laminardb_engine::error::ErrorClass;
use laminardb_engine::{Error, ErrorCode};

create_exception!(laminardb, LaminarError, PyException, "Base class of every laminardb error; `.code` holds its number.");
create_exception!(laminardb, ConnectionError, LaminarError, "Opening, using or closing a connection failed (1xx).");
create_exception!(laminardb, SchemaError, LaminarError, "Unknown or duplicate objects, invalid schemas (2xx).");
create_exception!(laminardb, IngestionError, LaminarError, "Rows could not be inserted (3xx).");
create_exception!(laminardb, QueryError, LaminarError, "SQL could not be parsed, planned or run (4xx).");
create_exception!(laminardb, SubscriptionError, LaminarError, "A subscription failed, closed or timed out (5xx).");
create_exception!(laminardb, StreamError, LaminarError, "A continuous query failed.");
create_exception!(laminardb, CheckpointError, LaminarError, "Checkpointing is disabled or failed.");
create_exception!(laminardb, ConnectorError, LaminarError, "A connector is unknown or misconfigured.");

pub fn to_pyerr(e: Error) -> PyErr {
    let code = e.code.as_u16();
    let message = e.to_string();
    let err = match (e.class, code / 100) {
        (ErrorClass::Checkpoint, _) => CheckpointError::new_err(message),
        (ErrorClass::Connector, _) => ConnectorError::new_err(message),
        (ErrorClass::Stream, _) => StreamError::new_err(message),
        (_, 1) => ConnectionError::new_err(message),
        (_, 2) => SchemaError::new_err(message),
        (_, 3) => IngestionError::new_err(message),
        (_, 4) => QueryError::new_err(message),
        (_, 5) => SubscriptionError::new_err(message),
        _ => LaminarError::new_err(message),
    };
    Python::attach(|py| {
        let _ = err.value(py).setattr("code", code);
    });
    err
}

pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}

pub fn register(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    let classes: [(&str, Bound<'_, pyo3::types::PyType>, u16); 9] = [
        ("LaminarError", py.get_type::<LaminarError>(), 900),
        ("ConnectionError", py.get_type::<ConnectionError>(), 100),
        ("SchemaError", py.get_type::<SchemaError>(), 200),
        ("IngestionError", py.get_type::<IngestionError>(), 300),
        ("QueryError", py.get_type::<QueryError>(), 400),
        ("SubscriptionError", py.get_type::<SubscriptionError>(), 500),
        ("StreamError", py.get_type::<StreamError>(), 900),
        ("CheckpointError", py.get_type::<CheckpointError>(), 900),
        ("ConnectorError", py.get_type::<ConnectorError>(), 400),
    ];
    for (name, class, default_code) in classes {
        // A class-level default so `.code` exists even on errors raised from Python code.
        class.setattr("code", default_code)?;
        m.add(name, class)?;
    }
    let codes = PyModule::new(py, "codes")?;
    for code in ErrorCode::ALL {
        codes.add(code.constant_name(), code.as_u16())?;
    }
    m.add_submodule(&codes)?;
    Ok(())
}
