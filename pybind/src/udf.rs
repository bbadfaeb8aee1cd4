//! Python scalar functions in SQL (`Connection.register_udf`): each is a DataFusion
//! [`ScalarUDFImpl`] whose evaluation takes the GIL once per batch, hands the arguments
//! over as pyarrow arrays (literal arguments as scalars) without copying, and takes one
//! array back (`laminardb._udf._invoke` turns what the function returned into it).
//!
//! A function runs wherever its expression is evaluated: on the query pool for ad-hoc
//! queries, on the shards for streams. Neither holds anything a Python thread waits for
//! while it waits for the GIL: a Python caller waiting on the engine has released it
//! (`gil::blocking`). A Python exception, or an array of the wrong type or length, is a
//! `QueryError` naming the function, with the traceback; in a stream only the rows it
//! failed on are rejected (`stream::isolate`).

use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{Array, ArrayRef};
use arrow::datatypes::DataType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature, Volatility};
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3_arrow::{PyArray, PyDataType};

use laminardb_engine::{Error, Result};

static IDS: AtomicU64 = AtomicU64::new(1);

pub struct PythonUdf {
    /// Tells registrations apart (two are equal only if they are one).
    id: u64,
    name: String,
    func: Py<PyAny>,
    return_type: DataType,
    vectorized: bool,
    signature: Signature,
    helpers: pyo3::sync::PyOnceLock<(Py<PyAny>, Py<PyAny>)>,
}

impl std::fmt::Debug for PythonUdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PythonUdf({}, {} -> {})", self.name, if self.vectorized { "vectorized" } else { "row by row" }, self.return_type)
    }
}

/// Equality and hashing by registration id: two registrations are equal only if they are
/// one (DataFusion's UDF traits ask for both).
macro_rules! by_id {
    ($t:ty, $id:expr) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                $id(self) == $id(other)
            }
        }

        impl Eq for $t {}

        impl std::hash::Hash for $t {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                $id(self).hash(state);
            }
        }
    };
}
pub(crate) use by_id;

by_id!(PythonUdf, |f: &PythonUdf| f.id);

/// `func` as SQL function `name`; with `arg_types`, planning checks (and casts) the
/// arguments to them, else any arguments are taken.
pub fn python_udf(name: &str, func: Py<PyAny>, return_type: DataType, arg_types: Option<Vec<DataType>>, vectorized: bool) -> ScalarUDF {
    let signature = signature(arg_types);
    ScalarUDF::new_from_impl(PythonUdf {
        id: IDS.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        func,
        return_type,
        vectorized,
        signature,
        helpers: pyo3::sync::PyOnceLock::new(),
    })
}

/// A Python function's signature: with `arg_types`, planning checks (and casts) the
/// arguments to them, else any arguments are taken. Volatile: Python functions may keep
/// state, so a call with literal arguments is not folded into a constant at planning.
pub fn signature(arg_types: Option<Vec<DataType>>) -> Signature {
    match arg_types {
        Some(types) if types.is_empty() => Signature::nullary(Volatility::Volatile),
        Some(types) => Signature::exact(types, Volatility::Volatile),
        None => Signature::one_of(vec![TypeSignature::Nullary, TypeSignature::VariadicAny], Volatility::Volatile),
    }
}

impl ScalarUDFImpl for PythonUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(self.return_type.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let array = with_python(|py| self.call(py, &args.args, rows)).map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(ColumnarValue::Array(array))
    }
}

/// Runs `f` with the GIL from an engine thread: with the thread's kept Python thread state
/// (`keep_thread_state`), after its turn (`PythonTurn`). Every Python function call the
/// engine makes goes through here.
pub(crate) fn with_python<T>(f: impl FnOnce(Python<'_>) -> T) -> T {
    keep_thread_state();
    let _turn = PythonTurn::take();
    Python::attach(f)
}

/// Engine threads take turns at Python functions: one that finds another at it spins
/// (yielding its core) instead of sleeping on the GIL, whose hand-over wakes a sleeping
/// thread, which costs more on a VM than a small batch's call (with two shards calling at
/// once: 0.33 of the SQL filter's rows/s against 0.94 with one, perf/README.md). The wait
/// is bounded: past it the thread goes to the GIL anyway, so a function that waits for
/// another engine thread (a query from inside a function) cannot deadlock on the turn.
struct PythonTurn(bool);

static PYTHON_BUSY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl PythonTurn {
    fn take() -> PythonTurn {
        let deadline = std::time::Instant::now() + std::time::Duration::from_micros(500);
        loop {
            if PYTHON_BUSY.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return PythonTurn(true);
            }
            if std::time::Instant::now() > deadline {
                return PythonTurn(false);
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for PythonTurn {
    fn drop(&mut self) {
        if self.0 {
            PYTHON_BUSY.store(false, Ordering::Release);
        }
    }
}

/// Gives the calling engine thread a Python thread state it keeps (the GIL released), so
/// each call's `Python::attach` reuses it: otherwise every call makes and frees one, which
/// costs more than a small batch's work. Once per thread; engine threads live as long as
/// their database.
pub(crate) fn keep_thread_state() {
    thread_local! {
        static KEPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    KEPT.with(|kept| {
        if kept.get() {
            return;
        }
        kept.set(true);
        // SAFETY: only on a thread with no Python thread state (so not holding the GIL):
        // it takes the GIL (making its state, counted once by PyGILState and never
        // released) and at once releases the GIL, keeping the state; later
        // PyGILState_Ensure calls on this thread find it.
        unsafe {
            if pyo3::ffi::PyGILState_GetThisThreadState().is_null() {
                pyo3::ffi::PyGILState_Ensure();
                pyo3::ffi::PyEval_SaveThread();
            }
        }
    });
}

impl PythonUdf {
    /// `laminardb._udf._invoke` and the return type as a pyarrow type, looked up once.
    fn helpers<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (invoke, return_type) = self.helpers.get_or_try_init(py, || -> PyResult<_> {
            let invoke = py.import("laminardb._udf")?.getattr("_invoke")?.unbind();
            let return_type = PyDataType::new(self.return_type.clone()).into_pyarrow(py)?.unbind();
            Ok((invoke, return_type))
        })?;
        Ok((invoke.bind(py).clone(), return_type.bind(py).clone()))
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        Error::query(format!("function '{}': {what}", self.name))
    }

    /// One call for `rows` rows (the GIL held).
    fn call(&self, py: Python<'_>, args: &[ColumnarValue], rows: usize) -> Result<ArrayRef> {
        let python = |e: PyErr| self.fail(traceback(py, &e));
        let mut arrays = Vec::with_capacity(args.len());
        let mut scalars = Vec::with_capacity(args.len());
        for arg in args {
            let (array, scalar) = match arg {
                ColumnarValue::Array(array) => (array.clone(), false),
                ColumnarValue::Scalar(value) => (value.to_array_of_size(1).map_err(|e| self.fail(e))?, true),
            };
            let array = PyArray::from_array_ref(array);
            arrays.push(array.to_pyarrow(py).map_err(python)?.unbind());
            scalars.push(scalar);
        }
        let (invoke, return_type) = self.helpers(py).map_err(python)?;
        let out = invoke
            .call1((self.func.bind(py), PyList::new(py, arrays).map_err(python)?, scalars, rows, return_type, self.vectorized))
            .map_err(python)?;
        let array: PyArray = out.extract().map_err(|e| self.fail(format!("did not return an array: {e}")))?;
        let array = array.into_inner().0;
        if array.data_type() != &self.return_type {
            return Err(self.fail(format!("returned {} values; it was registered returning {}", array.data_type(), self.return_type)));
        }
        if array.len() != rows {
            return Err(self.fail(format!("returned {} values for {rows} rows", array.len())));
        }
        Ok(array)
    }
}

/// A Python exception as its traceback text.
pub fn traceback(py: Python<'_>, e: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|tb| {
        tb.call_method1("format_exception", (e.get_type(py), e.value(py), e.traceback(py)))?.extract::<Vec<String>>()
    });
    match formatted {
        Ok(lines) => format!("raised {}", lines.concat().trim_end()),
        Err(_) => format!("raised {e}"),
    }
}
