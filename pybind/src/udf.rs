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

use std::hash::{Hash, Hasher};
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
}

impl std::fmt::Debug for PythonUdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PythonUdf({}, {} -> {})", self.name, if self.vectorized { "vectorized" } else { "row by row" }, self.return_type)
    }
}

impl PartialEq for PythonUdf {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for PythonUdf {}

impl Hash for PythonUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// `func` as SQL function `name`.
pub fn python_udf(name: &str, func: Py<PyAny>, return_type: DataType, vectorized: bool) -> ScalarUDF {
    // Any arguments, none included; Volatile: Python functions may keep state, so a call
    // with literal arguments is not folded into a constant at planning.
    let signature = Signature::one_of(vec![TypeSignature::Nullary, TypeSignature::VariadicAny], Volatility::Volatile);
    ScalarUDF::new_from_impl(PythonUdf {
        id: IDS.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        func,
        return_type,
        vectorized,
        signature,
    })
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
        let array = Python::attach(|py| self.call(py, &args.args, rows)).map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(ColumnarValue::Array(array))
    }
}

impl PythonUdf {
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
        let invoke = py.import("laminardb._udf").and_then(|m| m.getattr("_invoke")).map_err(python)?;
        let return_type = PyDataType::new(self.return_type.clone()).into_pyarrow(py).map_err(python)?;
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
