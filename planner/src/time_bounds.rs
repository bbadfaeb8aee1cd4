//! The time bounds of a stream join's condition: conjuncts such as
//! `b.ts BETWEEN a.ts - INTERVAL '5' SECOND AND a.ts + INTERVAL '5' SECOND` or
//! `b.ts >= a.ts AND b.ts < a.ts + INTERVAL '1' MINUTE` (or `b.ts = a.ts`) that limit how far apart in time
//! the two rows of a pair can be, which makes the join an interval join
//! (`laminardb_engine::stream::interval`) whose state the watermark bounds.

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::{Expr as DfExpr, ExprSchemable, Operator};

use laminardb_engine::stream::time::is_event_time;
use laminardb_engine::{Error, Result};

/// `lo <= right time − left time <= hi` (ms) holds for every pair the condition keeps;
/// `times`: the time column of each side, by index in that side's schema.
#[derive(Debug, PartialEq, Eq)]
pub struct TimeBounds {
    pub times: [usize; 2],
    pub lo: i64,
    pub hi: i64,
}

/// The bounds the conjuncts put on the difference of one time column per side, if they
/// bound it both ways. Strict comparisons give the same (inclusive) bound: the conjuncts
/// stay the join's exact condition. Where times or durations finer than a millisecond are
/// involved, the bounds widen by one, as the engine compares whole milliseconds.
/// `is_time(side, column)`: the column carries the time that side's watermark measures
/// (other columns, however typed, bound nothing the watermark can tell).
pub fn time_bounds(conjuncts: &[DfExpr], schemas: [&DFSchema; 2], is_time: &dyn Fn(usize, usize) -> bool) -> Result<Option<TimeBounds>> {
    let mut times: Option<[usize; 2]> = None;
    let mut fine = false;
    let (mut lo, mut hi) = (None::<i64>, None::<i64>);
    for c in conjuncts {
        for (a, op, b) in comparisons(c) {
            let (Some(ta), Some(tb)) = (term(a, schemas, is_time), term(b, schemas, is_time)) else { continue };
            fine |= ta.fine || tb.fine;
            // As `right + r op left + l`.
            let (right, op, left) = match (ta.side, tb.side) {
                (1, 0) => (ta, op, tb),
                (0, 1) => (tb, flip(op), ta),
                _ => continue,
            };
            let pair = [left.column, right.column];
            if *times.get_or_insert(pair) != pair {
                continue;
            }
            let bound = left.offset.checked_sub(right.offset).ok_or_else(|| Error::query(format!("the join condition {c} overflows")))?;
            match op {
                Operator::Gt | Operator::GtEq => lo = Some(lo.map_or(bound, |l| l.max(bound))),
                _ => hi = Some(hi.map_or(bound, |h| h.min(bound))),
            }
        }
    }
    let (Some(times), Some(mut lo), Some(mut hi)) = (times, lo, hi) else { return Ok(None) };
    if lo > hi {
        return Err(Error::query(format!(
            "the join's time condition can never hold: it asks the right time minus the left time to be at least {lo} ms and at most {hi} ms"
        )));
    }
    if fine {
        (lo, hi) = (lo.saturating_sub(1), hi.saturating_add(1));
    }
    Ok(Some(TimeBounds { times, lo, hi }))
}

/// The ordering comparisons a conjunct makes (`BETWEEN` and `=` are two).
fn comparisons(c: &DfExpr) -> Vec<(&DfExpr, Operator, &DfExpr)> {
    match c {
        DfExpr::Between(b) if !b.negated => vec![(&b.expr, Operator::GtEq, &b.low), (&b.expr, Operator::LtEq, &b.high)],
        DfExpr::BinaryExpr(b) if b.op == Operator::Eq => vec![(&b.left, Operator::GtEq, &b.right), (&b.left, Operator::LtEq, &b.right)],
        DfExpr::BinaryExpr(b) if matches!(b.op, Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq) => {
            vec![(&b.left, b.op, &b.right)]
        }
        _ => Vec::new(),
    }
}

fn flip(op: Operator) -> Operator {
    match op {
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        other => other,
    }
}

/// A time column of one side plus a constant number of milliseconds.
struct Term {
    side: usize,
    column: usize,
    offset: i64,
    /// The column or a duration added is finer than milliseconds.
    fine: bool,
}

fn term(e: &DfExpr, schemas: [&DFSchema; 2], is_time: &dyn Fn(usize, usize) -> bool) -> Option<Term> {
    match e {
        DfExpr::Column(c) => (0..2).find_map(|side| {
            let column = schemas[side].index_of_column(c).ok()?;
            let data_type = schemas[side].field(column).data_type();
            let fine = matches!(data_type, DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Nanosecond, _));
            (is_event_time(data_type) && is_time(side, column)).then_some(Term { side, column, offset: 0, fine })
        }),
        // A timestamp read in another unit is the same instant.
        DfExpr::Cast(cast) if cast.field.data_type().is_temporal() => {
            let inner = term(&cast.expr, schemas, is_time)?;
            let from = cast.expr.get_type(schemas[inner.side]).ok()?;
            matches!(from, DataType::Timestamp(..)).then_some(inner)
        }
        DfExpr::BinaryExpr(b) if matches!(b.op, Operator::Plus | Operator::Minus) => {
            if let (Some(t), Some((ms, fine))) = (term(&b.left, schemas, is_time), millis(&b.right)) {
                let offset = if b.op == Operator::Plus { t.offset.checked_add(ms)? } else { t.offset.checked_sub(ms)? };
                return Some(Term { offset, fine: t.fine || fine, ..t });
            }
            if b.op == Operator::Plus {
                if let (Some((ms, fine)), Some(t)) = (millis(&b.left), term(&b.right, schemas, is_time)) {
                    return Some(Term { offset: t.offset.checked_add(ms)?, fine: t.fine || fine, ..t });
                }
            }
            None
        }
        _ => None,
    }
}

/// A constant duration in milliseconds (and whether it had a finer part, cut off): an
/// interval of fixed length, or an integer (epoch-millisecond columns).
fn millis(e: &DfExpr) -> Option<(i64, bool)> {
    let DfExpr::Literal(value, _) = e else { return None };
    let nanos = |ms: i64, ns: i64| Some((ms.checked_add(ns / 1_000_000)?, ns % 1_000_000 != 0));
    match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => nanos((v.days as i64).checked_mul(86_400_000)?, v.nanoseconds),
        ScalarValue::IntervalDayTime(Some(v)) => Some(((v.days as i64).checked_mul(86_400_000)?.checked_add(v.milliseconds as i64)?, false)),
        ScalarValue::DurationSecond(Some(v)) => Some((v.checked_mul(1000)?, false)),
        ScalarValue::DurationMillisecond(Some(v)) => Some((*v, false)),
        ScalarValue::DurationMicrosecond(Some(v)) => nanos(0, v.checked_mul(1000)?),
        ScalarValue::DurationNanosecond(Some(v)) => nanos(0, *v),
        ScalarValue::Int64(Some(v)) => Some((*v, false)),
        ScalarValue::Int32(Some(v)) => Some((*v as i64, false)),
        ScalarValue::Int16(Some(v)) => Some((*v as i64, false)),
        ScalarValue::Int8(Some(v)) => Some((*v as i64, false)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::{col, lit};

    fn side(name: &str, unit: TimeUnit) -> DFSchema {
        let schema = Schema::new(vec![Field::new("k", DataType::Utf8, true), Field::new("ts", DataType::Timestamp(unit, None), true)]);
        DFSchema::try_from_qualified_schema(name, &schema).unwrap()
    }

    fn seconds(s: i64) -> DfExpr {
        lit(ScalarValue::new_interval_mdn(0, 0, s * 1_000_000_000))
    }

    #[test]
    fn between_and_comparisons_written_either_way_give_the_bounds() {
        let (a, b) = (side("a", TimeUnit::Millisecond), side("b", TimeUnit::Millisecond));
        let between = col("b.ts").between(col("a.ts") - seconds(2), col("a.ts") + seconds(3));
        assert_eq!(time_bounds(&[between], [&a, &b], &|_, _| true).unwrap(), Some(TimeBounds { times: [1, 1], lo: -2000, hi: 3000 }));
        // a.ts < b.ts + 1 s (so b − a > −1 s) and b.ts <= a.ts; the tighter of two upper bounds.
        let conjuncts = [col("a.ts").lt(col("b.ts") + seconds(1)), col("b.ts").lt_eq(col("a.ts")), col("b.ts").lt_eq(col("a.ts") + seconds(9))];
        assert_eq!(time_bounds(&conjuncts, [&a, &b], &|_, _| true).unwrap(), Some(TimeBounds { times: [1, 1], lo: -1000, hi: 0 }));
        // Equal times: both bounds 0.
        assert_eq!(time_bounds(&[col("a.ts").eq(col("b.ts"))], [&a, &b], &|_, _| true).unwrap(), Some(TimeBounds { times: [1, 1], lo: 0, hi: 0 }));
        // One way only: no bound.
        assert_eq!(time_bounds(&[col("b.ts").gt_eq(col("a.ts"))], [&a, &b], &|_, _| true).unwrap(), None);
        // An empty interval is refused.
        let empty = col("b.ts").between(col("a.ts") + seconds(3), col("a.ts"));
        assert!(time_bounds(&[empty], [&a, &b], &|_, _| true).unwrap_err().to_string().contains("can never hold"));
    }

    #[test]
    fn only_columns_carrying_the_watermark_s_time_bound_anything() {
        let (a, b) = (side("a", TimeUnit::Millisecond), side("b", TimeUnit::Millisecond));
        let between = col("b.ts").between(col("a.ts"), col("a.ts") + seconds(1));
        assert_eq!(time_bounds(&[between], [&a, &b], &|side, _| side == 0).unwrap(), None);
    }

    #[test]
    fn times_finer_than_a_millisecond_widen_the_bounds_by_one() {
        let (a, b) = (side("a", TimeUnit::Microsecond), side("b", TimeUnit::Millisecond));
        let between = col("b.ts").between(col("a.ts"), col("a.ts") + seconds(1));
        assert_eq!(time_bounds(&[between], [&a, &b], &|_, _| true).unwrap(), Some(TimeBounds { times: [1, 1], lo: -1, hi: 1001 }));
    }
}
