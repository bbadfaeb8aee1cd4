//! Event time: columns of `TIMESTAMP` (any unit) or integer epoch milliseconds, converted
//! to and from the engine's epoch-millisecond `i64`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, PrimitiveArray};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
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

/// Event times as epoch milliseconds (nulls stay null).
pub fn to_millis(array: &ArrayRef) -> Result<Int64Array> {
    let out = match array.data_type() {
        DataType::Timestamp(unit, _) => {
            let raw = array.as_primitive_opt::<Int64Type>().cloned();
            let raw = match raw {
                Some(r) => r,
                None => cast(array, &DataType::Int64)?.as_primitive::<Int64Type>().clone(),
            };
            let per_ms: i64 = match unit {
                TimeUnit::Second => return Ok(raw.unary(|v| v.saturating_mul(1000))),
                TimeUnit::Millisecond => 1,
                TimeUnit::Microsecond => 1_000,
                TimeUnit::Nanosecond => 1_000_000,
            };
            raw.unary(|v| v.div_euclid(per_ms))
        }
        DataType::Date32 => {
            let days = cast(array, &DataType::Int32)?;
            days.as_primitive::<arrow::datatypes::Int32Type>().unary(|d| d as i64 * 86_400_000)
        }
        DataType::Date64 | DataType::Int64 => cast(array, &DataType::Int64)?.as_primitive::<Int64Type>().clone(),
        t if t.is_integer() => cast(array, &DataType::Int64)?.as_primitive::<Int64Type>().clone(),
        other => return Err(Error::query(format!("event time must be a TIMESTAMP or BIGINT column, not {other}"))),
    };
    Ok(out)
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
pub fn max_millis(array: &ArrayRef) -> Result<Option<i64>> {
    if array.null_count() == array.len() {
        return Ok(None);
    }
    Ok(arrow::compute::max(&to_millis(array)?))
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
}
