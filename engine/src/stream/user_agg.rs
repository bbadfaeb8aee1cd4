//! A user's aggregate function (`functions::UserAggregate`, a Python class) over a
//! stream's groups: one accumulator per group, created when its first row comes. A
//! batch's rows reach each group's accumulator in one call, in arrival order (an
//! order-sensitive function, an EMA, sees them as they came). Sessions that merge fold
//! one accumulator's state into the other's (`Accumulator::merge_batch`). Checkpoints keep
//! every group's state as Arrow (`UserAggregate::state_fields`), restored exactly.

use std::sync::Arc;

use arrow::array::{new_empty_array, Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Accumulator;

use super::UserCall;
use crate::error::{Error, Result};
use crate::functions::UserAggregate;

#[derive(Default)]
pub struct UserAcc {
    /// `None` only in the placeholder a checkpoint's load makes (replaced by `restore`).
    function: Option<Arc<dyn UserAggregate>>,
    arg_types: Vec<DataType>,
    groups: Vec<Option<Box<dyn Accumulator>>>,
}

impl UserAcc {
    pub fn new(call: &UserCall) -> UserAcc {
        UserAcc { function: Some(call.function.clone()), arg_types: call.arg_types.clone(), groups: Vec::new() }
    }

    fn function(&self) -> Result<&Arc<dyn UserAggregate>> {
        self.function.as_ref().ok_or_else(|| Error::internal("a user aggregate's state was loaded without its function"))
    }

    pub fn resize(&mut self, groups: usize) {
        self.groups.resize_with(groups, || None);
    }

    pub fn reset(&mut self, g: usize) {
        self.groups[g] = None;
    }

    fn accumulator(&mut self, g: usize) -> Result<&mut Box<dyn Accumulator>> {
        if self.groups[g].is_none() {
            self.groups[g] = Some(self.function()?.accumulator()?);
        }
        Ok(self.groups[g].as_mut().expect("made above"))
    }

    /// Folds input rows `rows[i]` of `args` into groups `groups[i]`: one call per group.
    pub fn update(&mut self, args: &[ArrayRef], rows: &[u32], groups: &[u32]) -> Result<()> {
        let mut pairs: Vec<(u32, u32)> = groups.iter().copied().zip(rows.iter().copied()).collect();
        // Stable: each group's rows stay in arrival order.
        pairs.sort_by_key(|&(g, _)| g);
        for run in pairs.chunk_by(|a, b| a.0 == b.0) {
            let indices = UInt32Array::from_iter_values(run.iter().map(|&(_, r)| r));
            let taken = args.iter().map(|a| take(a.as_ref(), &indices, None)).collect::<Result<Vec<_>, _>>()?;
            self.accumulator(run[0].0 as usize)?.update_batch(&taken)?;
        }
        Ok(())
    }

    /// Folds group `src`'s state into group `dst` (sessions merging).
    pub fn merge(&mut self, dst: usize, src: usize) -> Result<()> {
        let Some(mut from) = self.groups[src].take() else { return Ok(()) };
        if self.groups[dst].is_none() {
            self.groups[dst] = Some(from);
            return Ok(());
        }
        let states = from.state()?.into_iter().map(|s| s.to_array()).collect::<Result<Vec<_>, _>>()?;
        self.accumulator(dst)?.merge_batch(&states)?;
        Ok(())
    }

    /// The result of each of `groups` (of a group no row reached: a fresh accumulator's).
    pub fn evaluate(&mut self, groups: &[usize], out_type: &DataType) -> Result<ArrayRef> {
        if groups.is_empty() {
            return Ok(new_empty_array(out_type));
        }
        let mut values = Vec::with_capacity(groups.len());
        for &g in groups {
            values.push(match &mut self.groups[g] {
                Some(acc) => acc.evaluate()?,
                None => self.function()?.accumulator()?.evaluate()?,
            });
        }
        let array = ScalarValue::iter_to_array(values)?;
        if array.data_type() == out_type {
            return Ok(array);
        }
        Ok(cast(&array, out_type)?)
    }

    /// Every group's state as Arrow IPC: a `present` column, then the state fields.
    pub fn save(&mut self) -> Result<Vec<u8>> {
        let fields = self.function()?.state_fields(&self.arg_types);
        let mut columns: Vec<Vec<ScalarValue>> = vec![Vec::with_capacity(self.groups.len()); fields.len()];
        let nulls = fields.iter().map(|f| ScalarValue::try_from(f.data_type())).collect::<Result<Vec<_>, _>>()?;
        let mut present = Vec::with_capacity(self.groups.len());
        for group in &mut self.groups {
            present.push(group.is_some());
            let state = match group {
                Some(acc) => acc.state()?,
                None => nulls.clone(),
            };
            if state.len() != fields.len() {
                return Err(Error::internal(format!("an aggregate's state has {} values, not {}", state.len(), fields.len())));
            }
            for (column, value) in columns.iter_mut().zip(state) {
                column.push(value);
            }
        }
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(BooleanArray::from(present))];
        let mut schema = vec![Field::new("present", DataType::Boolean, false)];
        for (field, column) in fields.iter().zip(columns) {
            let array = if column.is_empty() { new_empty_array(field.data_type()) } else { ScalarValue::iter_to_array(column)? };
            schema.push(Field::new(field.name(), array.data_type().clone(), true));
            arrays.push(array);
        }
        let schema = Arc::new(Schema::new(schema));
        let batch = RecordBatch::try_new(schema.clone(), arrays)?;
        crate::ipc::to_bytes(&schema, &[batch])
    }

    /// The groups `save` wrote, for the function of `call`.
    pub fn restore(call: &UserCall, bytes: &[u8]) -> Result<UserAcc> {
        let mut acc = UserAcc::new(call);
        let Some(batch) = crate::ipc::read(bytes)?.into_iter().next() else { return Ok(acc) };
        let present = batch
            .column(0)
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| Error::internal("a user aggregate's saved state has no 'present' column"))?;
        let states = &batch.columns()[1..];
        acc.groups = (0..batch.num_rows())
            .map(|row| if present.value(row) { call.function.restore(states, row).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Float64Array};
    use arrow::datatypes::{FieldRef, Float64Type};
    use datafusion::logical_expr::AggregateUDF;

    /// A sum whose state is its running total: enough to see state go out and come back.
    #[derive(Debug, Default)]
    struct Sum(f64);

    impl Accumulator for Sum {
        fn update_batch(&mut self, values: &[ArrayRef]) -> datafusion::error::Result<()> {
            self.0 += values[0].as_primitive::<Float64Type>().iter().flatten().sum::<f64>();
            Ok(())
        }
        fn evaluate(&mut self) -> datafusion::error::Result<ScalarValue> {
            Ok(ScalarValue::Float64(Some(self.0)))
        }
        fn size(&self) -> usize {
            8
        }
        fn state(&mut self) -> datafusion::error::Result<Vec<ScalarValue>> {
            Ok(vec![ScalarValue::Float64(Some(self.0))])
        }
        fn merge_batch(&mut self, states: &[ArrayRef]) -> datafusion::error::Result<()> {
            self.update_batch(states)
        }
    }

    #[derive(Debug)]
    struct SumFunction;

    impl UserAggregate for SumFunction {
        fn udaf(&self) -> Arc<AggregateUDF> {
            unimplemented!("not planned in this test")
        }
        fn accumulator(&self) -> Result<Box<dyn Accumulator>> {
            Ok(Box::new(Sum::default()))
        }
        fn state_fields(&self, _args: &[DataType]) -> Vec<FieldRef> {
            vec![Arc::new(Field::new("total", DataType::Float64, true))]
        }
        fn restore(&self, states: &[ArrayRef], row: usize) -> Result<Box<dyn Accumulator>> {
            Ok(Box::new(Sum(states[0].as_primitive::<Float64Type>().value(row))))
        }
    }

    fn values(acc: &mut UserAcc, groups: &[usize]) -> Vec<Option<f64>> {
        acc.evaluate(groups, &DataType::Float64).unwrap().as_primitive::<Float64Type>().iter().collect()
    }

    #[test]
    fn groups_fold_their_rows_merge_and_come_back_from_a_checkpoint() {
        let call = UserCall { function: Arc::new(SumFunction), args: vec![0], arg_types: vec![DataType::Float64] };
        let mut acc = UserAcc::new(&call);
        acc.resize(3);
        let input: ArrayRef = Arc::new(Float64Array::from(vec![1.0, 2.0, 4.0, 8.0, 16.0]));
        // Rows 0..4 to groups 0, 2, 0, 2; row 4 not folded; group 1 gets nothing.
        acc.update(&[input], &[0, 1, 2, 3], &[0, 2, 0, 2]).unwrap();
        assert_eq!(values(&mut acc, &[0, 1, 2]), vec![Some(5.0), Some(0.0), Some(10.0)]);
        let saved = acc.save().unwrap();
        let mut back = UserAcc::restore(&call, &saved).unwrap();
        assert_eq!(values(&mut back, &[0, 1, 2]), vec![Some(5.0), Some(0.0), Some(10.0)]);
        assert!(back.groups[1].is_none(), "a group no row reached stays empty");
        back.merge(0, 2).unwrap();
        assert_eq!(values(&mut back, &[0]), vec![Some(15.0)]);
        back.reset(0);
        assert_eq!(values(&mut back, &[0]), vec![Some(0.0)]);
    }
}
