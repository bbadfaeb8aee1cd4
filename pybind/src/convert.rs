//! Python input → Arrow batches, for all ten input formats.
//!
//! Plain Python rows and columns are built straight into typed Arrow arrays for the
//! declared schema (the single-row dict is the latency-critical path); Arrow objects come
//! in zero-copy through the PyCapsule interface; pandas and polars go through their Arrow
//! export. Everything is then cast to the declared schema by the engine, with the GIL
//! released.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Float32Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, Int8Builder, LargeStringBuilder, RecordBatch, RecordBatchOptions, StringBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder, TimestampNanosecondBuilder,
    TimestampSecondBuilder, UInt16Builder, UInt32Builder, UInt64Builder, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use pyo3_arrow::{PyArray, PyRecordBatch, PyRecordBatchReader};

use laminardb_engine::Error;

use crate::errors::to_pyerr;

/// Converts any supported input into batches (not yet cast to `schema`).
pub fn to_batches(py: Python<'_>, data: &Bound<'_, PyAny>, schema: &SchemaRef) -> PyResult<Vec<RecordBatch>> {
    if let Ok(dict) = data.cast::<PyDict>() {
        return dict_to_batches(py, dict, schema);
    }
    if let Ok(list) = data.cast::<PyList>() {
        if list.is_empty() {
            return Err(PyTypeError::new_err("cannot insert an empty list"));
        }
        let rows: Vec<Bound<'_, PyDict>> = list
            .iter()
            .map(|row| {
                row.cast_into::<PyDict>()
                    .map_err(|_| PyTypeError::new_err("a list insert must hold dicts (one per row)"))
            })
            .collect::<PyResult<_>>()?;
        return Ok(vec![rows_to_batch(py, &rows, schema)?]);
    }
    let module = data.get_type().module().map(|m| m.to_string()).unwrap_or_default();
    if module.starts_with("pandas") {
        if !data.hasattr("columns")? {
            return Err(PyTypeError::new_err("pandas Series cannot be inserted; use a DataFrame"));
        }
        let pyarrow = py.import("pyarrow")?;
        let kwargs = PyDict::new(py);
        // A named index is data (`df.set_index("id")`); an unnamed one is only row numbers.
        let names = data.getattr("index")?.getattr("names")?;
        let named = names.try_iter()?.any(|n| n.map(|n| !n.is_none()).unwrap_or(false));
        kwargs.set_item("preserve_index", named)?;
        let table = pyarrow.getattr("Table")?.call_method("from_pandas", (data,), Some(&kwargs))?;
        return read_stream(py, &table);
    }
    if data.hasattr("__arrow_c_stream__")? {
        return read_stream(py, data);
    }
    if data.hasattr("__arrow_c_array__")? {
        let batch: PyRecordBatch = data.extract()?;
        return Ok(vec![batch.into_inner()]);
    }
    if module.starts_with("polars") && data.hasattr("to_arrow")? {
        return read_stream(py, &data.call_method0("to_arrow")?);
    }
    Err(PyTypeError::new_err(format!(
        "unsupported insert type {}: use a dict, a list of dicts, a pandas or polars DataFrame, \
         a pyarrow RecordBatch or Table, or any object with __arrow_c_stream__",
        data.get_type().name()?
    )))
}

fn read_stream(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Vec<RecordBatch>> {
    let reader: PyRecordBatchReader = data.extract()?;
    let reader = reader.into_reader()?;
    py.detach(|| reader.collect::<Result<Vec<_>, _>>())
        .map_err(|e| to_pyerr(Error::batch_mismatch(e.to_string())))
}

fn is_column_like(value: &Bound<'_, PyAny>) -> bool {
    // Scalars answer first: this runs per value of every single-row insert, and `hasattr`
    // on a number raises (and clears) an AttributeError.
    if value.is_none() || value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>() || value.is_instance_of::<PyString>() {
        return false;
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        return true;
    }
    // numpy arrays, pandas Series, pyarrow arrays: sized, and not a str/bytes/dict scalar.
    !value.is_instance_of::<PyString>()
        && !value.is_instance_of::<PyBytes>()
        && !value.is_instance_of::<PyDict>()
        && value.hasattr("__len__").unwrap_or(false)
        && value.hasattr("__array__").unwrap_or(false) | value.hasattr("__arrow_c_array__").unwrap_or(false)
}

fn dict_to_batches(py: Python<'_>, dict: &Bound<'_, PyDict>, schema: &SchemaRef) -> PyResult<Vec<RecordBatch>> {
    if dict.is_empty() {
        return Err(PyTypeError::new_err("cannot insert an empty dict"));
    }
    let columnar = dict.iter().filter(|(_, v)| is_column_like(v)).count();
    if columnar == 0 {
        return Ok(vec![rows_to_batch(py, std::slice::from_ref(dict), schema)?]);
    }
    if columnar != dict.len() {
        return Err(to_pyerr(Error::batch_mismatch(
            "a dict insert must hold either one value per column (a row) or a list per column",
        )));
    }
    let mut fields = Vec::with_capacity(dict.len());
    let mut arrays = Vec::with_capacity(dict.len());
    let mut rows = None;
    for (key, column) in dict.iter() {
        let name: String = key.extract()?;
        let field = target_field(schema, &name)?;
        let array = if column.is_instance_of::<PyList>() || column.is_instance_of::<PyTuple>() {
            let values: Vec<Bound<'_, PyAny>> = column.try_iter()?.collect::<PyResult<_>>()?;
            build_array(py, &field, &values)?
        } else {
            check_nesting(&name, std::slice::from_ref(&column))?;
            let pyarrow = py.import("pyarrow")?;
            let array: PyArray = pyarrow.call_method1("array", (column,)).map_err(|e| mismatch(&name, e))?.extract()?;
            array.into_inner().0
        };
        match rows {
            None => rows = Some(array.len()),
            Some(n) if n != array.len() => {
                return Err(to_pyerr(Error::batch_mismatch(format!(
                    "column '{name}' has {} values, another has {n}",
                    array.len()
                ))))
            }
            _ => {}
        }
        fields.push(Field::new(name, array.data_type().clone(), true));
        arrays.push(array);
    }
    let batch = RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        arrays,
        &RecordBatchOptions::new().with_row_count(rows),
    )
    .map_err(|e| to_pyerr(Error::batch_mismatch(e.to_string())))?;
    Ok(vec![batch])
}

/// Row dicts → one batch with the declared types (columns absent from every row are left
/// for the cast to fill with nulls). Each row's keys are matched to the schema once, as
/// they are iterated (no lookup string is built per column).
fn rows_to_batch(py: Python<'_>, rows: &[Bound<'_, PyDict>], schema: &SchemaRef) -> PyResult<RecordBatch> {
    let none = py.None().into_bound(py);
    let mut columns: Vec<Vec<Bound<'_, PyAny>>> = schema.fields().iter().map(|_| Vec::with_capacity(rows.len())).collect();
    let mut present = vec![false; columns.len()];
    for (r, row) in rows.iter().enumerate() {
        for (key, value) in row.iter() {
            let key = key.cast_into::<PyString>().map_err(|_| PyTypeError::new_err("column names must be strings"))?;
            let name = key.to_str()?;
            let i = schema.index_of(name).map_err(|_| unknown_column(schema, name))?;
            // Rows before this one without the column hold None in it.
            columns[i].resize(r, none.clone());
            columns[i].push(value);
            present[i] = true;
        }
    }
    let mut arrays = Vec::with_capacity(columns.len());
    let mut declared = true;
    for ((field, mut values), &present) in schema.fields().iter().zip(columns).zip(&present) {
        if !present {
            declared = false;
            continue;
        }
        values.resize(rows.len(), none.clone());
        let array = build_array(py, field, &values)?;
        declared &= array.data_type() == field.data_type() && (field.is_nullable() || array.null_count() == 0);
        arrays.push(array);
    }
    // Every column built as declared: the batch takes the source's own schema, which the
    // engine's cast then passes through untouched. Otherwise the present columns as built.
    let schema = if declared {
        schema.clone()
    } else {
        let present = schema.fields().iter().zip(&present).filter(|(_, &p)| p).map(|(f, _)| f);
        Arc::new(Schema::new(present.zip(&arrays).map(|(f, a)| Field::new(f.name(), a.data_type().clone(), true)).collect::<Vec<_>>()))
    };
    RecordBatch::try_new_with_options(schema, arrays, &RecordBatchOptions::new().with_row_count(Some(rows.len())))
        .map_err(|e| to_pyerr(Error::batch_mismatch(e.to_string())))
}

fn target_field(schema: &SchemaRef, name: &str) -> PyResult<Field> {
    schema.field_with_name(name).map(|f| f.as_ref().clone()).map_err(|_| unknown_column(schema, name))
}

fn unknown_column(schema: &SchemaRef, name: &str) -> PyErr {
    let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    to_pyerr(Error::batch_mismatch(format!("column '{name}' is not in the schema ({})", cols.join(", "))))
}

/// How deeply a value handed to pyarrow's inference may nest lists, tuples and dicts:
/// pyarrow recurses once per level on the caller's stack and crashes the interpreter
/// somewhere past ten thousand.
const PY_NESTING_MAX: usize = 64;

/// Refuses values nested deeper than [`PY_NESTING_MAX`] (walked without recursion).
fn check_nesting(column: &str, values: &[Bound<'_, PyAny>]) -> PyResult<()> {
    let mut stack: Vec<(Bound<'_, PyAny>, usize)> = values.iter().map(|v| (v.clone(), 1)).collect();
    while let Some((value, depth)) = stack.pop() {
        let children: Vec<Bound<'_, PyAny>> = if let Ok(list) = value.cast::<PyList>() {
            list.iter().collect()
        } else if let Ok(tuple) = value.cast::<PyTuple>() {
            tuple.iter().collect()
        } else if let Ok(dict) = value.cast::<PyDict>() {
            dict.values().iter().collect()
        } else {
            continue;
        };
        if depth > PY_NESTING_MAX {
            return Err(to_pyerr(Error::batch_mismatch(format!(
                "column '{column}': a value nests lists, tuples or dicts deeper than {PY_NESTING_MAX} levels"
            ))));
        }
        stack.extend(children.into_iter().map(|c| (c, depth + 1)));
    }
    Ok(())
}

fn mismatch(column: &str, e: PyErr) -> PyErr {
    to_pyerr(Error::batch_mismatch(format!("column '{column}': {e}")))
}

/// Builds a column of the field's type from Python values; values that are not plain
/// Python scalars of a matching kind send the column through pyarrow's inference instead,
/// and the engine's cast then decides whether it fits.
fn build_array(py: Python<'_>, field: &Field, values: &[Bound<'_, PyAny>]) -> PyResult<ArrayRef> {
    if let Some(array) = build_native(field.data_type(), values) {
        return Ok(array);
    }
    check_nesting(field.name(), values)?;
    let pyarrow = py.import("pyarrow")?;
    let list = PyList::new(py, values)?;
    let array: PyArray = pyarrow
        .call_method1("array", (list,))
        .map_err(|e| mismatch(field.name(), e))?
        .extract()?;
    Ok(array.into_inner().0)
}

/// Builds one array from `values`, sized for them: a builder's default capacity (1,024
/// values) would stay allocated in every retained single-row batch, 20 KB a row.
macro_rules! build_with {
    ($builder:ty, $values:expr, $extract:expr) => {
        build_with!($builder, <$builder>::with_capacity($values.len()), $values, $extract)
    };
    // Variable-width values: `values.len()` items, their bytes grown as they come.
    (bytes $builder:ty, $values:expr, $extract:expr) => {
        build_with!($builder, <$builder>::with_capacity($values.len(), 0), $values, $extract)
    };
    ($builder:ty, $new:expr, $values:expr, $extract:expr) => {{
        let mut b: $builder = $new;
        for v in $values {
            if v.is_none() {
                b.append_null();
            } else {
                b.append_value($extract(v)?);
            }
        }
        Some(Arc::new(b.finish()) as ArrayRef)
    }};
}

pub(crate) fn int<T: TryFrom<i64>>(v: &Bound<'_, PyAny>) -> Option<T> {
    if !v.is_instance_of::<PyInt>() {
        return None;
    }
    T::try_from(v.extract::<i64>().ok()?).ok()
}

pub(crate) fn uint<T: TryFrom<u64>>(v: &Bound<'_, PyAny>) -> Option<T> {
    if !v.is_instance_of::<PyInt>() {
        return None;
    }
    T::try_from(v.extract::<u64>().ok()?).ok()
}

pub(crate) fn float(v: &Bound<'_, PyAny>) -> Option<f64> {
    if v.is_instance_of::<PyFloat>() || (v.is_instance_of::<PyInt>() && !v.is_instance_of::<PyBool>()) {
        v.extract::<f64>().ok()
    } else {
        None
    }
}

/// A Python str's text, borrowed (no copy before the builder's).
pub(crate) fn text<'a>(v: &'a Bound<'_, PyAny>) -> Option<&'a str> {
    v.cast::<PyString>().ok()?.to_str().ok()
}

/// A Python bytes object's contents, borrowed.
pub(crate) fn bytes<'a>(v: &'a Bound<'_, PyAny>) -> Option<&'a [u8]> {
    Some(v.cast::<PyBytes>().ok()?.as_bytes())
}

/// Epoch milliseconds from a Python int, in the column's unit.
pub(crate) fn epoch_ms_in(unit: TimeUnit) -> impl Fn(&Bound<'_, PyAny>) -> Option<i64> {
    move |v| {
        let ms: i64 = int(v)?;
        match unit {
            TimeUnit::Second => Some(ms.div_euclid(1000)),
            TimeUnit::Millisecond => Some(ms),
            TimeUnit::Microsecond => ms.checked_mul(1_000),
            TimeUnit::Nanosecond => ms.checked_mul(1_000_000),
        }
    }
}

fn build_native(ty: &DataType, values: &[Bound<'_, PyAny>]) -> Option<ArrayRef> {
    match ty {
        DataType::Boolean => build_with!(BooleanBuilder, values, |v: &Bound<'_, PyAny>| {
            v.is_instance_of::<PyBool>().then(|| v.is_truthy().ok()).flatten()
        }),
        DataType::Int8 => build_with!(Int8Builder, values, int::<i8>),
        DataType::Int16 => build_with!(Int16Builder, values, int::<i16>),
        DataType::Int32 => build_with!(Int32Builder, values, int::<i32>),
        DataType::Int64 => build_with!(Int64Builder, values, int::<i64>),
        DataType::UInt8 => build_with!(UInt8Builder, values, uint::<u8>),
        DataType::UInt16 => build_with!(UInt16Builder, values, uint::<u16>),
        DataType::UInt32 => build_with!(UInt32Builder, values, uint::<u32>),
        DataType::UInt64 => build_with!(UInt64Builder, values, uint::<u64>),
        DataType::Float32 => build_with!(Float32Builder, values, |v| float(v).map(|f| f as f32)),
        DataType::Float64 => build_with!(Float64Builder, values, float),
        DataType::Utf8 => build_with!(bytes StringBuilder, values, text),
        DataType::LargeUtf8 => build_with!(bytes LargeStringBuilder, values, text),
        DataType::Binary => build_with!(bytes BinaryBuilder, values, bytes),
        DataType::Timestamp(unit, tz) => {
            let f = epoch_ms_in(*unit);
            let array: ArrayRef = match unit {
                TimeUnit::Second => build_with!(TimestampSecondBuilder, values, &f)?,
                TimeUnit::Millisecond => build_with!(TimestampMillisecondBuilder, values, &f)?,
                TimeUnit::Microsecond => build_with!(TimestampMicrosecondBuilder, values, &f)?,
                TimeUnit::Nanosecond => build_with!(TimestampNanosecondBuilder, values, &f)?,
            };
            match tz {
                None => Some(array),
                Some(tz) => arrow::compute::cast(&array, &DataType::Timestamp(*unit, Some(tz.clone()))).ok(),
            }
        }
        _ => None,
    }
}

/// Python parameters for `sql(query, params)` as SQL scalars.
pub fn to_scalar(value: &Bound<'_, PyAny>) -> PyResult<datafusion_scalar::ScalarValue> {
    use datafusion_scalar::ScalarValue as S;
    if value.is_none() {
        return Ok(S::Null);
    }
    if value.is_instance_of::<PyBool>() {
        return Ok(S::Boolean(Some(value.extract()?)));
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(S::Int64(Some(value.extract()?)));
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(S::Float64(Some(value.extract()?)));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(S::Utf8(Some(s.to_str()?.to_owned())));
    }
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(S::Binary(Some(b.as_bytes().to_vec())));
    }
    Err(PyTypeError::new_err(format!("unsupported parameter type {}", value.get_type().name()?)))
}

/// Re-exported so the binding does not name DataFusion beyond its scalar type.
pub mod datafusion_scalar {
    pub use laminardb_shards::command::ScalarValue;
}
