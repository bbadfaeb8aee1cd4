//! Keeping a stream's good rows when its expressions fail on some.
//!
//! A stream's filter and projection run over a whole batch at once, and one row that
//! makes an expression fail (a division by zero, a cast of `'abc'` to INT) fails the
//! batch. [`eval_isolating`] then finds the failing rows by bisection, so every good row
//! still passes through the stream, in order, and only the rows that fail on their own
//! are rejected: returned with the first error, for the caller to count and report.
//! Stream expressions are row-wise (DataFusion scalar functions), so evaluating a slice
//! gives the same rows as evaluating the whole batch. A panic inside an expression counts
//! as that slice failing.

use std::panic::{catch_unwind, AssertUnwindSafe};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;

use super::op::eval_branch;
use super::PhysExpr;
use crate::error::{panic_message, Error, Result};

/// The rows of an input batch a stream's expressions failed on.
#[derive(Debug)]
pub struct Rejected {
    /// Their positions in the input batch, ascending.
    pub rows: Vec<usize>,
    /// The error of the first of them.
    pub error: Error,
}

/// Filter then project `batch`, keeping every row the expressions do not fail on.
/// Returns the output of the good rows (in input order) and, if any row failed, which.
pub fn eval_isolating(
    filter: Option<&PhysExpr>,
    exprs: &[PhysExpr],
    schema: &SchemaRef,
    batch: &RecordBatch,
) -> Result<(RecordBatch, Option<Rejected>)> {
    let eval = |slice: &RecordBatch| -> Result<RecordBatch> {
        match catch_unwind(AssertUnwindSafe(|| eval_branch(filter, exprs, schema, slice))) {
            Ok(result) => result,
            Err(panic) => Err(Error::query(format!("an expression panicked: {}", panic_message(&*panic)))),
        }
    };
    let first = match eval(batch) {
        Ok(out) => return Ok((out, None)),
        Err(e) => e,
    };
    let mut good = Vec::new();
    let mut rejected: Option<Rejected> = None;
    // Ranges still to evaluate, the next one on top: halves go in right first, so the
    // output keeps the input's order.
    let n = batch.num_rows();
    let mut todo = Vec::new();
    if n == 1 {
        rejected = Some(Rejected { rows: vec![0], error: first });
    } else if n > 1 {
        todo.push((n / 2, n - n / 2));
        todo.push((0, n / 2));
    }
    while let Some((offset, len)) = todo.pop() {
        match eval(&batch.slice(offset, len)) {
            Ok(out) => {
                if out.num_rows() > 0 {
                    good.push(out);
                }
            }
            Err(e) if len == 1 => match rejected.as_mut() {
                Some(r) => r.rows.push(offset),
                None => rejected = Some(Rejected { rows: vec![offset], error: e }),
            },
            Err(_) => {
                let half = len / 2;
                todo.push((offset + half, len - half));
                todo.push((offset, half));
            }
        }
    }
    let out = match good.len() {
        0 => RecordBatch::new_empty(schema.clone()),
        1 => good.pop().expect("one"),
        _ => concat_batches(schema, &good)?,
    };
    Ok((out, rejected))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{col, lit, BinaryExpr};
    use datafusion::scalar::ScalarValue;

    use super::*;

    /// `100 / v` over the rows of `v`.
    fn divide(v: Vec<i64>) -> (Vec<i64>, Vec<usize>) {
        let input = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(input.clone(), vec![Arc::new(Int64Array::from(v))]).unwrap();
        let expr: PhysExpr =
            Arc::new(BinaryExpr::new(lit(ScalarValue::Int64(Some(100))), Operator::Divide, col("v", &input).unwrap()));
        let out_schema = Arc::new(Schema::new(vec![Field::new("q", DataType::Int64, true)]));
        let (out, rejected) = eval_isolating(None, &[expr], &out_schema, &batch).unwrap();
        let values = out.column(0).as_primitive::<Int64Type>().values().to_vec();
        let rows = rejected.map(|r| {
            assert!(r.error.message.to_lowercase().contains("divide by zero"), "{}", r.error.message);
            r.rows
        });
        (values, rows.unwrap_or_default())
    }

    #[test]
    fn good_rows_pass_in_order_and_each_bad_row_is_named() {
        assert_eq!(divide(vec![1, 2, 0, 4, 5, 0, 0, 10]), (vec![100, 50, 25, 20, 10], vec![2, 5, 6]));
        assert_eq!(divide(vec![0]), (vec![], vec![0]));
        assert_eq!(divide(vec![0, 0, 0]), (vec![], vec![0, 1, 2]));
        assert_eq!(divide(vec![50, 25]), (vec![2, 4], vec![]));
    }

    #[test]
    fn a_thousand_rows_with_scattered_failures() {
        let v: Vec<i64> = (0..1000).map(|i| if i % 97 == 3 { 0 } else { 1 + i % 7 }).collect();
        let expected: Vec<i64> = v.iter().filter(|&&x| x != 0).map(|x| 100 / x).collect();
        let bad: Vec<usize> = (0..1000).filter(|i| i % 97 == 3).collect();
        assert_eq!(divide(v), (expected, bad));
    }
}
