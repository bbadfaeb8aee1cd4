//! Python aggregate functions in SQL (`Connection.register_udaf`): a class with
//! `accumulate(*arrays)`, `merge(other)` and `evaluate()`, whose state is the attributes
//! its declared `accumulator_type` (a struct) names. Each group's instance is a DataFusion
//! [`Accumulator`]: ad hoc, DataFusion's hash aggregate drives it (partial states merged
//! through `state`/`merge_batch`); in streams, `stream::user_agg` keeps one per group and
//! window and saves their state in checkpoints as Arrow. Every call takes the GIL once for
//! one group's rows of a batch, as the scalar functions do (`udf`), and an exception is a
//! `QueryError` naming the function, with the traceback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef};
use arrow::datatypes::{DataType, FieldRef, Fields};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, Signature};
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3_arrow::{PyArray, PyDataType};

use laminardb_engine::functions::UserAggregate;
use laminardb_engine::{Error, Result};

use crate::udf::{traceback, with_python};

static IDS: AtomicU64 = AtomicU64::new(1);

/// What every instance of one registered class shares.
struct Class {
    id: u64,
    name: String,
    class: Py<PyAny>,
    return_type: DataType,
    state: Fields,
    signature: Signature,
    /// `laminardb._udf`, the return type and the state type as Python objects.
    helpers: pyo3::sync::PyOnceLock<(Py<PyAny>, Py<PyAny>, Py<PyAny>)>,
}

impl Class {
    fn helpers<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (module, ret, state) = self.helpers.get_or_try_init(py, || -> PyResult<_> {
            let module = py.import("laminardb._udf")?.into_any().unbind();
            let ret = PyDataType::new(self.return_type.clone()).into_pyarrow(py)?.unbind();
            let state = PyDataType::new(DataType::Struct(self.state.clone())).into_pyarrow(py)?.unbind();
            Ok((module, ret, state))
        })?;
        Ok((module.bind(py).clone(), ret.bind(py).clone(), state.bind(py).clone()))
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        Error::query(format!("aggregate function '{}': {what}", self.name))
    }

    /// Runs `f` with the GIL, taking turns with the other engine threads; a Python
    /// exception becomes a `QueryError` with its traceback.
    fn call<T>(&self, f: impl FnOnce(Python<'_>) -> PyResult<T>) -> Result<T> {
        with_python(|py| f(py).map_err(|e| self.fail(traceback(py, &e))))
    }

    fn new_instance(self: &Arc<Self>) -> Result<PythonAccumulator> {
        let instance = self.call(|py| Ok(self.class.bind(py).call0()?.unbind()))?;
        Ok(PythonAccumulator { class: self.clone(), instance })
    }

    fn pyarrow<'py>(py: Python<'py>, arrays: &[ArrayRef]) -> PyResult<Vec<Bound<'py, PyAny>>> {
        arrays
            .iter()
            .map(|a| {
                let array = PyArray::from_array_ref(a.clone());
                let object: Py<PyAny> = array.to_pyarrow(py).map(|b| b.unbind())?;
                Ok(object.into_bound(py))
            })
            .collect()
    }
}

/// DataFusion's view of the class (ad-hoc queries).
pub struct PythonUdaf(Arc<Class>);

impl std::fmt::Debug for PythonUdaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PythonUdaf({} -> {})", self.0.name, self.0.return_type)
    }
}

crate::udf::by_id!(PythonUdaf, |f: &PythonUdaf| f.0.id);

impl AggregateUDFImpl for PythonUdaf {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn signature(&self) -> &Signature {
        &self.0.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(self.0.return_type.clone())
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(self.0.new_instance().map_err(external)?))
    }

    fn state_fields(&self, _args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(self.0.state.iter().cloned().collect())
    }
}

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// One group's instance of the class.
#[derive(Debug)]
pub struct PythonAccumulator {
    class: Arc<Class>,
    instance: Py<PyAny>,
}

impl std::fmt::Debug for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)
    }
}

impl Accumulator for PythonAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        if values.first().is_some_and(|a| a.is_empty()) {
            return Ok(());
        }
        self.class
            .call(|py| {
                let arrays = Class::pyarrow(py, values)?;
                self.instance.bind(py).call_method1("accumulate", pyo3::types::PyTuple::new(py, arrays)?)?;
                Ok(())
            })
            .map_err(external)
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        let class = &self.class;
        let array = class
            .call(|py| {
                let (module, ret, _) = class.helpers(py)?;
                let out: PyArray = module.call_method1("_udaf_evaluate", (self.instance.bind(py), ret))?.extract()?;
                Ok(out.into_inner().0)
            })
            .map_err(external)?;
        if array.data_type() != &class.return_type || array.len() != 1 {
            return Err(external(class.fail(format!(
                "evaluate() gave {} values of {}; it was registered returning one {}",
                array.len(),
                array.data_type(),
                class.return_type
            ))));
        }
        ScalarValue::try_from_array(&array, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + 64
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        let class = &self.class;
        let arrays = class
            .call(|py| {
                let (module, _, state) = class.helpers(py)?;
                let out = module.call_method1("_udaf_state", (self.instance.bind(py), state))?;
                out.extract::<Vec<PyArray>>().map(|v| v.into_iter().map(|a| a.into_inner().0).collect::<Vec<_>>())
            })
            .map_err(external)?;
        arrays.iter().map(|a| ScalarValue::try_from_array(a, 0)).collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        if states.first().is_some_and(|a| a.is_empty()) {
            return Ok(());
        }
        let class = &self.class;
        class
            .call(|py| {
                let (module, _, state) = class.helpers(py)?;
                let arrays = PyList::new(py, Class::pyarrow(py, states)?)?;
                module.call_method1("_udaf_merge", (class.class.bind(py), self.instance.bind(py), arrays, state))?;
                Ok(())
            })
            .map_err(external)
    }
}

/// The class as the engine's registry keeps it (`functions::UserAggregate`).
#[derive(Debug)]
struct Registered {
    class: Arc<Class>,
    udaf: Arc<AggregateUDF>,
}

impl UserAggregate for Registered {
    fn udaf(&self) -> Arc<AggregateUDF> {
        self.udaf.clone()
    }

    fn accumulator(&self) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(self.class.new_instance()?))
    }

    fn state_fields(&self, _args: &[DataType]) -> Vec<FieldRef> {
        self.class.state.iter().cloned().collect()
    }

    fn restore(&self, states: &[ArrayRef], row: usize) -> Result<Box<dyn Accumulator>> {
        let class = &self.class;
        let instance = class.call(|py| {
            let (module, _, state) = class.helpers(py)?;
            let arrays = PyList::new(py, Class::pyarrow(py, states)?)?;
            Ok(module.call_method1("_udaf_restore", (class.class.bind(py), arrays, row, state))?.unbind())
        })?;
        Ok(Box::new(PythonAccumulator { class: class.clone(), instance }))
    }
}

/// `class` as SQL aggregate `name`; with `arg_types`, planning checks (and casts) the
/// arguments to them, else any arguments are taken.
pub fn python_udaf(
    name: &str,
    class: Py<PyAny>,
    return_type: DataType,
    state: Fields,
    arg_types: Option<Vec<DataType>>,
) -> Arc<dyn UserAggregate> {
    let signature = crate::udf::signature(arg_types);
    let class = Arc::new(Class {
        id: IDS.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        class,
        return_type,
        state,
        signature,
        helpers: pyo3::sync::PyOnceLock::new(),
    });
    let udaf = Arc::new(AggregateUDF::new_from_impl(PythonUdaf(class.clone())));
    Arc::new(Registered { class, udaf })
}
