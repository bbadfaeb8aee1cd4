//! A vectorized Python scalar function called over a group (`planner::group_call`): its
//! aggregate twin gathers the group's argument arrays and, for the result, calls the
//! function once with all of them (concatenated), taking one value back. Its state is the
//! rows themselves (`List` arrays), so partial groups merge by appending, and a stream
//! takes it only over a window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{new_empty_array, Array, ArrayRef, AsArray, ListArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::expr::AggregateFunctionParams;
use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, Signature};
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3_arrow::{PyArray, PyDataType};

use laminardb_engine::functions::UserAggregate;
use laminardb_engine::{Error, Result};

use crate::udf::{traceback, with_python};

static IDS: AtomicU64 = AtomicU64::new(1);

struct Function {
    id: u64,
    /// The twin's SQL name, and the function's own (shown in column names and errors).
    name: String,
    shown: String,
    func: Py<PyAny>,
    return_type: DataType,
    signature: Signature,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} over groups", self.shown)
    }
}

impl Function {
    fn fail(&self, what: impl std::fmt::Display) -> Error {
        Error::query(format!("function '{}' (over a group's rows): {what}", self.shown))
    }

    /// One call with a whole group's arguments; its one value.
    fn call(&self, args: Vec<ArrayRef>) -> Result<ScalarValue> {
        let array = with_python(|py| -> Result<ArrayRef> {
            let python = |e: PyErr| self.fail(traceback(py, &e));
            let arrays = args
                .into_iter()
                .map(|a| PyArray::from_array_ref(a).to_pyarrow(py).map(|b| b.unbind()))
                .collect::<PyResult<Vec<_>>>()
                .map_err(python)?;
            let return_type = PyDataType::new(self.return_type.clone()).into_pyarrow(py).map_err(python)?;
            let out = py
                .import("laminardb._udf")
                .and_then(|m| m.call_method1("_invoke_group", (self.func.bind(py), PyList::new(py, arrays)?, return_type)))
                .map_err(python)?;
            let array: PyArray = out.extract().map_err(|e| self.fail(format!("did not return a value: {e}")))?;
            Ok(array.into_inner().0)
        })?;
        if array.data_type() != &self.return_type || array.len() != 1 {
            return Err(self.fail(format!(
                "returned {} values of {} for one group; it was registered returning {}",
                array.len(),
                array.data_type(),
                self.return_type
            )));
        }
        Ok(ScalarValue::try_from_array(&array, 0)?)
    }
}

/// DataFusion's view of the twin.
struct Twin(Arc<Function>);

impl std::fmt::Debug for Twin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

crate::udf::by_id!(Twin, |f: &Twin| f.0.id);

fn external(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

fn list_field(name: &str, ty: &DataType) -> FieldRef {
    Arc::new(Field::new(name, DataType::List(Arc::new(Field::new_list_field(ty.clone(), true))), true))
}

impl AggregateUDFImpl for Twin {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn signature(&self) -> &Signature {
        &self.0.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(self.0.return_type.clone())
    }

    /// The column is named after the function as written (`vwap(t.price,t.volume)`).
    fn schema_name(&self, params: &AggregateFunctionParams) -> DfResult<String> {
        let args: Vec<String> = params.args.iter().map(|a| a.schema_name().to_string()).collect();
        Ok(format!("{}({})", self.0.shown, args.join(",")))
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(Gather { function: self.0.clone(), args: Vec::new() }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(args.input_fields.iter().enumerate().map(|(i, f)| list_field(&format!("rows{i}"), f.data_type())).collect())
    }
}

/// One group's rows, per argument, as they came.
#[derive(Debug)]
struct Gather {
    function: Arc<Function>,
    args: Vec<Vec<ArrayRef>>,
}

impl Gather {
    fn push(&mut self, arrays: impl ExactSizeIterator<Item = ArrayRef>) {
        if self.args.is_empty() {
            self.args = (0..arrays.len()).map(|_| Vec::new()).collect();
        }
        for (chunks, array) in self.args.iter_mut().zip(arrays) {
            if !array.is_empty() {
                chunks.push(array);
            }
        }
    }

    fn concatenated(&self) -> DfResult<Vec<ArrayRef>> {
        self.args
            .iter()
            .map(|chunks| {
                let refs: Vec<&dyn Array> = chunks.iter().map(|c| c.as_ref()).collect();
                match refs.as_slice() {
                    [] => Err(DataFusionError::Internal("a group without rows".into())),
                    [one] => Ok(one.slice(0, one.len())),
                    many => Ok(arrow::compute::concat(many)?),
                }
            })
            .collect()
    }
}

impl Accumulator for Gather {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.push(values.iter().cloned());
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        if self.args.iter().all(|chunks| chunks.is_empty()) {
            return ScalarValue::try_from(&self.function.return_type);
        }
        self.function.call(self.concatenated()?).map_err(external)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.args.iter().flatten().map(|a| a.get_array_memory_size()).sum::<usize>()
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        let arrays = self.concatenated()?;
        Ok(arrays
            .into_iter()
            .map(|values| {
                let field = Arc::new(Field::new_list_field(values.data_type().clone(), true));
                let offsets = OffsetBuffer::from_lengths([values.len()]);
                ScalarValue::List(Arc::new(ListArray::new(field, offsets, values, None)))
            })
            .collect())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let lists: Vec<&ListArray> = states.iter().map(|s| s.as_list::<i32>()).collect();
        for row in 0..lists.first().map_or(0, |l| l.len()) {
            self.push(lists.iter().map(|l| if l.is_null(row) { new_empty_array(&l.value_type()) } else { l.value(row) }).collect::<Vec<_>>().into_iter());
        }
        Ok(())
    }
}

/// The engine's view of the twin (`functions::UserAggregate`).
#[derive(Debug)]
struct Registered {
    function: Arc<Function>,
    udaf: Arc<AggregateUDF>,
}

impl UserAggregate for Registered {
    fn udaf(&self) -> Arc<AggregateUDF> {
        self.udaf.clone()
    }

    fn accumulator(&self) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Gather { function: self.function.clone(), args: Vec::new() }))
    }

    fn state_fields(&self, args: &[DataType]) -> Vec<FieldRef> {
        args.iter().enumerate().map(|(i, t)| list_field(&format!("rows{i}"), t)).collect()
    }

    fn restore(&self, states: &[ArrayRef], row: usize) -> Result<Box<dyn Accumulator>> {
        let mut gather = Gather { function: self.function.clone(), args: Vec::new() };
        let sliced: Vec<ArrayRef> = states.iter().map(|s| s.slice(row, 1)).collect();
        gather.merge_batch(&sliced)?;
        Ok(Box::new(gather))
    }

    fn keeps_rows(&self) -> bool {
        true
    }
}

/// The twin of vectorized function `shown` (registered as `name`).
pub fn twin(name: &str, shown: &str, func: Py<PyAny>, return_type: DataType, signature: Signature) -> Arc<dyn UserAggregate> {
    let function = Arc::new(Function {
        id: IDS.fetch_add(1, Ordering::Relaxed),
        name: name.to_string(),
        shown: shown.to_string(),
        func,
        return_type,
        signature,
    });
    let udaf = Arc::new(AggregateUDF::new_from_impl(Twin(function.clone())));
    Arc::new(Registered { function, udaf })
}
