//! Event time: columns of `TIMESTAMP` (any unit) or integer epoch milliseconds, converted
//! to and from the engine's epoch-millisecond `i64`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, PrimitiveArray};
use arrow::buffer::{NullBuffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date64Type, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};

use crate::error::{Error, Result};

/// Wall-clock time now, in epoch milliseconds (processing time, not event time).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Whether `data_type` can carry event time.
pub fn is_event_time(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Timestamp(..) | DataType::Int64 | DataType::Int32 | DataType::UInt32 | DataType::UInt64 | DataType::Date32 | DataType::Date64
    )
}

/// Event times as epoch milliseconds (nulls stay null). Millisecond timestamps, DATE64 and
/// BIGINT columns share their values buffer: no copy.
pub fn to_millis(array: &ArrayRef) -> Result<Int64Array> {
    let out = match array.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) => raw_values(array),
        DataType::Timestamp(unit, _) => {
            let unit = *unit;
            raw_values(array).unary(|v| unit_to_millis(v, unit))
        }
        DataType::Date32 => {
            let days = cast(array, &DataType::Int32)?;
            days.as_primitive::<arrow::datatypes::Int32Type>().unary(|d| d as i64 * 86_400_000)
        }
        DataType::Int64 | DataType::Date64 => raw_values(array),
        t if t.is_integer() => cast(array, &DataType::Int64)?.as_primitive::<Int64Type>().clone(),
        other => return Err(Error::query(format!("event time must be a TIMESTAMP or BIGINT column, not {other}"))),
    };
    Ok(out)
}

/// The 64-bit values of a TIMESTAMP, DATE64 or BIGINT array as they are stored, sharing
/// its buffers.
fn raw_values(array: &ArrayRef) -> Int64Array {
    let (values, nulls) = match array.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => parts(array.as_primitive::<TimestampSecondType>()),
        DataType::Timestamp(TimeUnit::Millisecond, _) => parts(array.as_primitive::<TimestampMillisecondType>()),
        DataType::Timestamp(TimeUnit::Microsecond, _) => parts(array.as_primitive::<TimestampMicrosecondType>()),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => parts(array.as_primitive::<TimestampNanosecondType>()),
        DataType::Date64 => parts(array.as_primitive::<Date64Type>()),
        _ => parts(array.as_primitive::<Int64Type>()),
    };
    Int64Array::new(values, nulls)
}

fn parts<T: ArrowPrimitiveType<Native = i64>>(array: &PrimitiveArray<T>) -> (ScalarBuffer<i64>, Option<NullBuffer>) {
    (array.values().clone(), array.nulls().cloned())
}

/// One timestamp value of `unit` in epoch milliseconds (rounding down, so the order of
/// values is kept).
fn unit_to_millis(v: i64, unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => v.saturating_mul(1000),
        TimeUnit::Millisecond => v,
        TimeUnit::Microsecond => v.div_euclid(1_000),
        TimeUnit::Nanosecond => v.div_euclid(1_000_000),
    }
}

/// Epoch milliseconds as an array of `data_type` (the event-time column's type).
pub fn from_millis(millis: Vec<i64>, data_type: &DataType) -> Result<ArrayRef> {
    let ms = Int64Array::from(millis);
    Ok(match data_type {
        DataType::Timestamp(unit, tz) => {
            let tz = tz.clone();
            match unit {
                TimeUnit::Second => Arc::new(
                    PrimitiveArray::<TimestampSecondType>::from(ms.values().iter().map(|v| v.div_euclid(1000)).collect::<Vec<_>>())
                        .with_timezone_opt(tz),
                ),
                TimeUnit::Millisecond => {
                    Arc::new(PrimitiveArray::<TimestampMillisecondType>::from(ms.values().to_vec()).with_timezone_opt(tz))
                }
                TimeUnit::Microsecond => Arc::new(
                    PrimitiveArray::<TimestampMicrosecondType>::from(ms.values().iter().map(|v| v * 1_000).collect::<Vec<_>>())
                        .with_timezone_opt(tz),
                ),
                TimeUnit::Nanosecond => Arc::new(
                    PrimitiveArray::<TimestampNanosecondType>::from(ms.values().iter().map(|v| v * 1_000_000).collect::<Vec<_>>())
                        .with_timezone_opt(tz),
                ),
            }
        }
        DataType::Date32 => cast(&(Arc::new(Int64Array::from_iter_values(ms.values().iter().map(|v| v.div_euclid(86_400_000)))) as ArrayRef), &DataType::Int32)
            .and_then(|a| cast(&a, &DataType::Date32))?,
        DataType::Int64 => Arc::new(ms),
        other => cast(&(Arc::new(ms) as ArrayRef), other)?,
    })
}

/// The largest non-null event time of `array`, in epoch milliseconds.
///
/// Every insert into a source with a watermark asks, so timestamps are not converted
/// row by row: the conversion keeps the order of values, and only the largest is converted.
pub fn max_millis(array: &ArrayRef) -> Result<Option<i64>> {
    if array.null_count() == array.len() {
        return Ok(None);
    }
    Ok(match array.data_type() {
        DataType::Timestamp(unit, _) => arrow::compute::max(&raw_values(array)).map(|v| unit_to_millis(v, *unit)),
        _ => arrow::compute::max(&to_millis(array)?),
    })
}

/// The largest event time at or below `limit` and how many are above it (nulls count
/// for neither). Only called when [`max_millis`] is above `limit`.
pub fn max_millis_below(array: &ArrayRef, limit: i64) -> Result<(Option<i64>, u64)> {
    let ms = to_millis(array)?;
    let (mut max, mut above) = (None::<i64>, 0u64);
    for v in ms.iter().flatten() {
        if v > limit {
            above += 1;
        } else {
            max = max.max(Some(v));
        }
    }
    Ok((max, above))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::TimestampMicrosecondArray;

    #[test]
    fn timestamps_round_trip_through_millis() {
        let a: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![1_500_000, -1]));
        let ms = to_millis(&a).unwrap();
        assert_eq!(ms.values().to_vec(), vec![1500, -1]);
        let back = from_millis(vec![1500], a.data_type()).unwrap();
        assert_eq!(back.as_primitive::<TimestampMicrosecondType>().value(0), 1_500_000);
        assert_eq!(max_millis(&a).unwrap(), Some(1500));
    }

    /// Every unit, sliced, with nulls: the largest event time converted alone equals the
    /// largest of the converted column, and BIGINT values are shared, not copied.
    #[test]
    fn largest_event_time_of_every_unit() {
        let raw = vec![Some(-1_999_999_999), None, Some(7_000_000_001), Some(-5), Some(3_000_000_000), None];
        let columns: Vec<ArrayRef> = vec![
            Arc::new(PrimitiveArray::<TimestampSecondType>::from(raw.clone())),
            Arc::new(PrimitiveArray::<TimestampMillisecondType>::from(raw.clone()).with_timezone("UTC")),
            Arc::new(PrimitiveArray::<TimestampMicrosecondType>::from(raw.clone())),
            Arc::new(PrimitiveArray::<TimestampNanosecondType>::from(raw.clone())),
            Arc::new(PrimitiveArray::<Date64Type>::from(raw.clone())),
            Arc::new(Int64Array::from(raw.clone())),
        ];
        let per_ms = [(1, 1000), (1, 1), (1000, 1), (1_000_000, 1), (1, 1), (1, 1)];
        for (column, (div, mul)) in columns.iter().zip(per_ms) {
            // Rows 1..5: the first value and the last null are sliced off.
            let sliced = column.slice(1, 4);
            let ms = to_millis(&sliced).unwrap();
            let expected: Vec<Option<i64>> =
                raw[1..5].iter().map(|v| v.map(|v: i64| v.div_euclid(div).saturating_mul(mul))).collect();
            assert_eq!(ms.iter().collect::<Vec<_>>(), expected, "{}", column.data_type());
            assert_eq!(max_millis(&sliced).unwrap(), expected.iter().flatten().max().copied(), "{}", column.data_type());
        }
        let bigint = columns[5].slice(1, 4);
        let ms = to_millis(&bigint).unwrap();
        assert_eq!(ms.values().as_ptr(), bigint.as_primitive::<Int64Type>().values().as_ptr());
        let nulls: ArrayRef = Arc::new(Int64Array::from(vec![None, None]));
        assert_eq!(max_millis(&nulls).unwrap(), None);
    }

    #[test]
    fn the_largest_time_below_a_limit_skips_and_counts_the_rest() {
        let a: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![Some(1_000), None, Some(9_000_000), Some(2_000)]));
        assert_eq!(max_millis_below(&a, 5).unwrap(), (Some(2), 1));
        assert_eq!(max_millis_below(&a, 0).unwrap(), (None, 3));
    }
}
