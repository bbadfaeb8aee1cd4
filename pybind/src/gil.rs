//! The one way engine work is entered from Python: with the GIL released and any Rust
//! panic turned into `LaminarError` (900) instead of an interpreter crash.

use pyo3::prelude::*;

use laminardb_engine::{Error, Result};

use crate::errors::to_pyerr;

/// Runs `f` without the GIL.
pub fn blocking<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T> + Send) -> PyResult<T> {
    py.detach(|| guarded(f)).map_err(to_pyerr)
}

/// Runs `f` (holding the GIL), turning a panic into an `Internal` error.
pub fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Error::internal(format!(
            "panic in the Python binding: {}",
            laminardb_engine::error::panic_message(&*payload)
        ))),
    }
}
