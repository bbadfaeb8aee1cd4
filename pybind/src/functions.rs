//! A connection's Python functions: the checks of `register_udf` / `register_udaf`, the
//! engine's registry entry (`udf`, `udaf`), and, in a database with storage, how to
//! import each again. `laminardb._udf` keeps `<storage_dir>/FUNCTIONS` (name, kind,
//! module and qualified name, declared types); `open()` imports them before recovery plans
//! the streams that call them. A function that cannot be imported again (a lambda, a
//! local function) is not stored, and a stream calling it is refused in such a database.

use arrow::datatypes::{DataType, Fields};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_arrow::PyDataType;

use laminardb_engine::functions::Functions;
use laminardb_engine::Error;

use crate::errors::to_pyerr;

/// What a function was declared as.
pub enum Spec {
    Scalar { return_type: DataType, arg_types: Option<Vec<DataType>>, vectorized: bool },
    Aggregate { return_type: DataType, state: Fields, arg_types: Option<Vec<DataType>> },
}

impl Spec {
    fn kind(&self) -> &'static str {
        match self {
            Spec::Scalar { .. } => "scalar",
            Spec::Aggregate { .. } => "aggregate",
        }
    }

    fn to_py<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        let ty = |t: &DataType| PyDataType::new(t.clone()).into_pyarrow(py);
        let types = |ts: &Option<Vec<DataType>>| -> PyResult<Option<Vec<Bound<'py, PyAny>>>> {
            ts.as_ref().map(|ts| ts.iter().map(ty).collect()).transpose()
        };
        match self {
            Spec::Scalar { return_type, arg_types, vectorized } => {
                dict.set_item("return_type", ty(return_type)?)?;
                dict.set_item("arg_types", types(arg_types)?)?;
                dict.set_item("vectorized", vectorized)?;
            }
            Spec::Aggregate { return_type, state, arg_types } => {
                dict.set_item("return_type", ty(return_type)?)?;
                dict.set_item("accumulator_type", ty(&DataType::Struct(state.clone()))?)?;
                dict.set_item("arg_types", types(arg_types)?)?;
            }
        }
        Ok(dict)
    }

    fn from_py(kind: &str, dict: &Bound<'_, PyAny>) -> PyResult<Spec> {
        let ty = |key: &str| -> PyResult<DataType> { Ok(dict.get_item(key)?.extract::<PyDataType>()?.into_inner()) };
        let arg_types = declared_arg_types(None, dict)?;
        match kind {
            "scalar" => Ok(Spec::Scalar { return_type: ty("return_type")?, arg_types, vectorized: dict.get_item("vectorized")?.extract()? }),
            "aggregate" => match ty("accumulator_type")? {
                DataType::Struct(state) => Ok(Spec::Aggregate { return_type: ty("return_type")?, state, arg_types }),
                other => Err(to_pyerr(Error::query(format!("a stored aggregate's state is {other}, not a struct")))),
            },
            other => Err(to_pyerr(Error::query(format!("a stored function of unknown kind '{other}'")))),
        }
    }
}

/// A Python function's SQL name: SQL folds unquoted names to lower case, so is the
/// function's; a plain name that no built-in function has.
pub fn function_name(call: &str, name: &str) -> PyResult<String> {
    let sql_name = name.to_lowercase();
    let plain = !sql_name.is_empty()
        && sql_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !sql_name.starts_with(|c: char| c.is_ascii_digit());
    if !plain {
        return Err(to_pyerr(Error::query(format!("{call}: '{name}' is not a plain SQL name (letters, digits, _)"))));
    }
    if laminardb_planner::is_builtin_function(&sql_name) {
        return Err(to_pyerr(Error::query(format!("{call}: '{sql_name}' is a built-in SQL function; choose another name"))));
    }
    Ok(sql_name)
}

/// A type given to the call, else by the decorator (`spec[key]`), else an error saying
/// `call` needs it.
pub fn declared_type(given: Option<PyDataType>, spec: &Bound<'_, PyAny>, key: &str, call: &str, decorated: &str) -> PyResult<DataType> {
    match given {
        Some(t) => Ok(t.into_inner()),
        None => match spec.get_item(key) {
            Ok(t) => Ok(t.extract::<PyDataType>()?.into_inner()),
            Err(_) => Err(to_pyerr(Error::query(format!("{call} needs {key} (or {decorated})")))),
        },
    }
}

/// Argument types given to the call, else by the decorator (`spec`), else none.
pub fn declared_arg_types(given: Option<Vec<PyDataType>>, spec: &Bound<'_, PyAny>) -> PyResult<Option<Vec<DataType>>> {
    Ok(match given {
        Some(types) => Some(types.into_iter().map(PyDataType::into_inner).collect()),
        None => match spec.get_item("arg_types") {
            Ok(types) if !types.is_none() => Some(types.extract::<Vec<PyDataType>>()?.into_iter().map(PyDataType::into_inner).collect()),
            _ => None,
        },
    })
}

/// Puts `object` in the registry as `name` (already checked by `function_name`); a
/// vectorized function with its aggregate twin (`group_call`), for calls over a group.
fn add(functions: &Functions, name: &str, object: Bound<'_, PyAny>, spec: &Spec) {
    let twin = laminardb_planner::group_call::twin_name(name);
    match spec {
        Spec::Scalar { return_type, arg_types, vectorized } => {
            functions.register(crate::udf::python_udf(
                name,
                object.clone().unbind(),
                return_type.clone(),
                arg_types.clone(),
                *vectorized,
            ));
            if *vectorized {
                let signature = crate::udf::signature(arg_types.clone());
                functions.register_aggregate(&twin, crate::group_call::twin(&twin, name, object.unbind(), return_type.clone(), signature));
            } else {
                functions.remove_aggregate(&twin);
            }
        }
        Spec::Aggregate { return_type, state, arg_types } => functions.register_aggregate(
            name,
            crate::udaf::python_udaf(name, object.unbind(), return_type.clone(), state.clone(), arg_types.clone()),
        ),
    }
}

/// Registers `object` as `name`; with a storage directory, stores how to import it again
/// if it can be (then streams of that database may call it).
pub fn register(py: Python<'_>, functions: &Functions, storage: Option<&str>, name: &str, object: Bound<'_, PyAny>, spec: Spec) -> PyResult<()> {
    add(functions, name, object.clone(), &spec);
    if let Some(dir) = storage {
        let stored: bool = py
            .import("laminardb._udf")?
            .call_method1("_store_function", (dir, name, spec.kind(), object, spec.to_py(py)?))?
            .extract()?;
        if stored {
            mark_stored(functions, name);
        }
    }
    Ok(())
}

/// `name` (and its twin, if it has one) will be there again when the database reopens.
fn mark_stored(functions: &Functions, name: &str) {
    functions.mark_stored(name);
    let twin = laminardb_planner::group_call::twin_name(name);
    if functions.aggregate(&twin).is_some() {
        functions.mark_stored(&twin);
    }
}

/// The functions `<dir>/FUNCTIONS` names, imported again, for a database about to open
/// (one that cannot be imported is left out, with a warning: a stream calling it then
/// fails to open, naming it).
pub fn load(py: Python<'_>, dir: &str) -> PyResult<Functions> {
    let functions = Functions::default();
    let loaded = py.import("laminardb._udf")?.call_method1("_load_functions", (dir,))?;
    for item in loaded.try_iter()? {
        let (name, kind, object, spec): (String, String, Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
        add(&functions, &name, object, &Spec::from_py(&kind, &spec)?);
        mark_stored(&functions, &name);
    }
    Ok(functions)
}
