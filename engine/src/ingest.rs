//! Casting incoming batches to a source's declared schema.
//!
//! Every input format ends up as Arrow batches whose columns are matched to the declared
//! schema by name (so JSON key order or DataFrame column order never matters) and cast
//! with overflow and truncation checks. Anything that cannot be cast is a
//! `BatchSchemaMismatch` (302) and nothing of the insert is stored.

use std::sync::Arc;

use arrow::array::{new_null_array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::compute::{can_cast_types, cast_with_options, CastOptions};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::util::display::FormatOptions;

use crate::error::{Error, Result};

/// Casts `batch` to `target`: columns by name, missing nullable columns filled with nulls,
/// unknown columns rejected.
pub fn cast_to_schema(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch> {
    if Arc::ptr_eq(&batch.schema(), target) {
        return Ok(batch.clone());
    }
    if batch.schema().fields() == target.fields() {
        return Ok(RecordBatch::try_new_with_options(
            target.clone(),
            batch.columns().to_vec(),
            &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?);
    }
    let input = batch.schema();
    for field in input.fields() {
        if target.field_with_name(field.name()).is_err() {
            return Err(Error::batch_mismatch(format!(
                "column '{}' is not in the schema ({})",
                field.name(),
                column_list(target)
            )));
        }
    }
    let options = CastOptions { safe: false, format_options: FormatOptions::default() };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let column = match input.index_of(field.name()) {
            Ok(i) => cast_column(batch.column(i), field.data_type(), &options)
                .map_err(|why| Error::batch_mismatch(format!("column '{}': {why}", field.name())))?,
            Err(_) if field.is_nullable() => new_null_array(field.data_type(), batch.num_rows()),
            Err(_) => {
                return Err(Error::batch_mismatch(format!("missing non-nullable column '{}'", field.name())))
            }
        };
        if !field.is_nullable() && column.null_count() > 0 {
            return Err(Error::batch_mismatch(format!("column '{}' is NOT NULL but got nulls", field.name())));
        }
        columns.push(column);
    }
    Ok(RecordBatch::try_new_with_options(
        target.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

/// Integers into a TIMESTAMP column are epoch milliseconds, the unit of watermarks.
fn cast_column(col: &ArrayRef, to: &DataType, options: &CastOptions) -> std::result::Result<ArrayRef, String> {
    let from = col.data_type();
    if from == to {
        return Ok(col.clone());
    }
    if let DataType::Timestamp(_, tz) = to {
        if matches!(from, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
            if let Some(ms) = integers_in_text(col) {
                return cast_column(&ms, to, options);
            }
        }
        if from.is_integer() {
            let ms = cast_with_options(col, &DataType::Int64, options).map_err(|e| e.to_string())?;
            let as_ms = cast_with_options(&ms, &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()), options)
                .map_err(|e| e.to_string())?;
            return cast_with_options(&as_ms, to, options).map_err(|e| e.to_string());
        }
    }
    if !can_cast_types(from, to) {
        return Err(format!("cannot cast {from} to {to}"));
    }
    if from.is_floating() && to.is_integer() {
        // A fraction would be cut off silently: refuse it (51.0 is fine, 51.7 is not).
        let as_f64 = cast_with_options(col, &DataType::Float64, options).map_err(|e| e.to_string())?;
        let values = as_f64.as_any().downcast_ref::<arrow::array::Float64Array>().ok_or("not Float64")?;
        if let Some(v) = values.iter().flatten().find(|v| v.fract() != 0.0) {
            return Err(format!("{v} has a fraction and the column is {to}"));
        }
    }
    cast_with_options(col, to, options).map_err(|e| e.to_string())
}

/// Text that holds only integers (CSV, JSON strings) read as epoch milliseconds.
fn integers_in_text(col: &ArrayRef) -> Option<ArrayRef> {
    let text = arrow::compute::cast(col, &DataType::Utf8).ok()?;
    let text = text.as_any().downcast_ref::<arrow::array::StringArray>()?;
    let values: Option<Vec<Option<i64>>> =
        text.iter().map(|v| v.map_or(Some(None), |s| s.trim().parse::<i64>().ok().map(Some))).collect();
    Some(Arc::new(arrow::array::Int64Array::from(values?)))
}

/// The schema JSON and CSV text is read with: timestamps in milliseconds, so bare numbers
/// mean epoch milliseconds as everywhere else (then [`cast_to_schema`] to `target`).
pub fn text_reading_schema(target: &SchemaRef) -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(
        target
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, tz) => f
                    .as_ref()
                    .clone()
                    .with_data_type(DataType::Timestamp(TimeUnit::Millisecond, tz.clone()))
                    .with_nullable(true),
                _ => f.as_ref().clone().with_nullable(true),
            })
            .collect::<Vec<_>>(),
    ))
}

/// Parses a JSON array of objects or newline-delimited objects into batches cast to `target`.
pub fn read_json(text: &str, target: &SchemaRef) -> Result<Vec<RecordBatch>> {
    check_json_depth(text, JSON_DEPTH_MAX)?;
    let reading = text_reading_schema(target);
    let bad = |e: &dyn std::fmt::Display| Error::batch_mismatch(format!("invalid JSON input: {e}"));
    let trimmed = text.trim_start();
    let batches: Vec<RecordBatch> = if trimmed.starts_with('[') {
        let rows: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| bad(&e))?;
        if rows.iter().any(|r| !r.is_object()) {
            return Err(Error::batch_mismatch("a JSON array insert must hold objects"));
        }
        let mut decoder = arrow::json::ReaderBuilder::new(reading)
            .with_strict_mode(true)
            .build_decoder()
            .map_err(|e| bad(&e))?;
        decoder.serialize(&rows).map_err(|e| bad(&e))?;
        decoder.flush().map_err(|e| bad(&e))?.into_iter().collect()
    } else {
        arrow::json::ReaderBuilder::new(reading)
            .with_strict_mode(true)
            .build(std::io::Cursor::new(text.as_bytes()))
            .map_err(|e| bad(&e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(&e))?
    };
    batches.iter().map(|b| cast_to_schema(b, target)).collect()
}

/// How deeply JSON input may nest arrays and objects. The decoders recurse per level (one
/// of them without a limit, on the caller's thread), and a row of a table is one object
/// whose values may nest a few levels for LIST/STRUCT columns.
pub const JSON_DEPTH_MAX: usize = 64;

/// Refuses JSON text nesting `[`/`{` deeper than `max`, in one pass over the bytes
/// (brackets inside strings do not count).
pub fn check_json_depth(text: &str, max: usize) -> Result<()> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(Error::batch_mismatch(format!(
                        "invalid JSON input: nested deeper than {max} levels of arrays and objects"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses CSV with a header row; columns are matched by the header's names.
pub fn read_csv(text: &str, target: &SchemaRef) -> Result<Vec<RecordBatch>> {
    let bad = |e: &dyn std::fmt::Display| Error::batch_mismatch(format!("invalid CSV input: {e}"));
    let header = text.lines().next().ok_or_else(|| Error::batch_mismatch("CSV input is empty"))?;
    let names: Vec<String> = header.split(',').map(|h| h.trim().trim_matches('"').to_string()).collect();
    let reading = Arc::new(arrow::datatypes::Schema::new(
        names.iter().map(|n| arrow::datatypes::Field::new(n, DataType::Utf8, true)).collect::<Vec<_>>(),
    ));
    let reader = arrow::csv::ReaderBuilder::new(reading.clone())
        .with_header(true)
        .with_null_regex(regex_empty())
        .build(std::io::Cursor::new(text.as_bytes()))
        .map_err(|e| bad(&e))?;
    let batches: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>().map_err(|e| bad(&e))?;
    if batches.is_empty() {
        // A header alone still has to name the source's columns (text that is no CSV at
        // all reads as a header without rows).
        cast_to_schema(&RecordBatch::new_empty(reading), target)?;
    }
    batches.iter().map(|b| cast_to_schema(b, target)).collect()
}

fn regex_empty() -> regex::Regex {
    regex::Regex::new("^$").expect("valid regex")
}

fn column_list(schema: &SchemaRef) -> String {
    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

/// A zero-row batch with the schema, for results that must still carry their columns.
pub fn empty_batch(schema: &SchemaRef) -> RecordBatch {
    RecordBatch::new_empty(Arc::clone(schema))
}

#[cfg(test)]
mod fraction_tests {
    use super::*;
    use arrow::array::Float64Array;
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    #[test]
    fn floats_with_a_fraction_are_refused_by_integer_columns() {
        let target = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let ok = RecordBatch::try_from_iter(vec![("a", Arc::new(Float64Array::from(vec![51.0])) as ArrayRef)]).unwrap();
        assert!(cast_to_schema(&ok, &target).is_ok());
        let bad = RecordBatch::try_from_iter(vec![("a", Arc::new(Float64Array::from(vec![1.0, 51.7])) as ArrayRef)]).unwrap();
        let e = cast_to_schema(&bad, &target).unwrap_err();
        assert!(e.message.contains("51.7"), "{}", e.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    fn target() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("sym", DataType::Utf8, true),
            Field::new("px", DataType::Float64, true),
        ]))
    }

    #[test]
    fn reorders_by_name_casts_ints_and_fills_missing() {
        let input = RecordBatch::try_from_iter(vec![
            ("px", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            ("ts", Arc::new(Int64Array::from(vec![1000, 2000])) as ArrayRef),
        ])
        .unwrap();
        let out = cast_to_schema(&input, &target()).unwrap();
        let px = out.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(px.values(), &[1.0, 2.0]);
        let ts = out.column(0).as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap();
        assert_eq!(ts.values(), &[1_000_000, 2_000_000], "ints are epoch milliseconds");
        assert_eq!(out.column(1).null_count(), 2);
    }

    #[test]
    fn json_array_ndjson_and_csv() {
        let t = target();
        let a = read_json(r#"[{"px": 1, "ts": 1000, "sym": "A"}, {"sym": "B"}]"#, &t).unwrap();
        let n = read_json("{\"ts\": 2000, \"px\": 2.5}\n{\"ts\": 3000}\n", &t).unwrap();
        let c = read_csv("sym,px,ts\nA,1.5,1000\nB,,2000\n", &t).unwrap();
        for (batches, rows) in [(a, 2), (n, 2), (c, 2)] {
            assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), rows);
            let ts = batches[0].column(0).as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap();
            assert!(ts.value(0) == 1_000_000 || ts.value(0) == 2_000_000);
        }
        assert!(read_json(r#"[{"nope": 1}]"#, &t).is_err());
        assert!(read_csv("px\nabc\n", &t).is_err());
    }

    #[test]
    fn uncastable_values_are_302() {
        let input = RecordBatch::try_from_iter(vec![(
            "px",
            Arc::new(StringArray::from(vec!["1.5", "abc"])) as ArrayRef,
        )])
        .unwrap();
        let err = cast_to_schema(&input, &target()).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::BatchSchemaMismatch);
        let extra = RecordBatch::try_from_iter(vec![("nope", Arc::new(Int64Array::from(vec![1])) as ArrayRef)]).unwrap();
        assert_eq!(cast_to_schema(&extra, &target()).unwrap_err().code, crate::ErrorCode::BatchSchemaMismatch);
    }
}

#[cfg(test)]
mod json_depth_tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        check_json_depth(r#"[{"a": 1, "s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]"#, 4).unwrap();
        check_json_depth(r#"[{"s": "\\\"[[[["}]"#, 2).unwrap();
        assert!(check_json_depth(&"{\"a\":".repeat(100), 64).is_err());
        assert!(check_json_depth("[[[", 2).is_err());
        check_json_depth("[[]]", 2).unwrap();
    }
}
