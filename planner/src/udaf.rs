//! Ad-hoc aggregates that must agree with the stream operators (`engine::stream::agg`),
//! registered over DataFusion's own under the same names:
//!
//! * `sum` of BIGINT fails on overflow ("SUM overflowed the BIGINT range") where
//!   DataFusion's wraps around silently; a stream fails the same batch.
//! * `min` / `max` of floats order NaN and ±0.0 as IEEE 754's total order does (NaN above
//!   every number, -0.0 below 0.0). DataFusion's own kernels do so without `GROUP BY`,
//!   but its grouped accumulator compares with `<`/`>`, so a grouped MAX over {NaN, 1.0}
//!   depended on the rows' order. DOUBLE gets a grouped accumulator of its own
//!   (`TotalOrderGroups`); REAL and HALF use DataFusion's per-group accumulator, whose
//!   kernels use the total order.
//!
//! Every other call (other types, `DISTINCT`, window frames of the other types) goes to
//! DataFusion's function unchanged.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array};
use arrow::datatypes::{DataType, FieldRef, Float64Type, Int64Type};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::expr::AggregateFunctionParams;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::udf_eq::UdfEq;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, GroupsAccumulator, ReversedUDAF, Signature,
};

/// Registers the aggregates of this module on `ctx`.
pub fn register(ctx: &SessionContext) {
    let state = ctx.state();
    let functions = state.aggregate_functions();
    let wrap = |name: &str, kind: Kind| {
        functions.get(name).map(|inner| AggregateUDF::new_from_impl(Agreeing { inner: inner.inner().clone().into(), kind }))
    };
    let replacements: Vec<AggregateUDF> =
        [wrap("sum", Kind::Sum), wrap("min", Kind::MinMax), wrap("max", Kind::MinMax)].into_iter().flatten().collect();
    for udaf in replacements {
        ctx.register_udaf(udaf);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Sum,
    MinMax,
}

/// DataFusion's aggregate `inner`, changed where `kind` says (see the module's doc).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Agreeing {
    inner: UdfEq<Arc<dyn AggregateUDFImpl>>,
    kind: Kind,
}

impl Agreeing {
    /// A checked BIGINT sum: `SUM(x)` of an integer column (DataFusion sums every signed
    /// integer type as Int64), not DISTINCT.
    fn checked_sum(&self, args: &AccumulatorArgs) -> bool {
        self.kind == Kind::Sum && !args.is_distinct && args.return_type() == &DataType::Int64
    }

    fn float_min_max(&self, args: &AccumulatorArgs) -> bool {
        self.kind == Kind::MinMax && args.return_type().is_floating()
    }

    fn is_min(&self) -> bool {
        self.inner.name().eq_ignore_ascii_case("min")
    }
}

fn overflow() -> DataFusionError {
    DataFusionError::Execution(
        "SUM overflowed the BIGINT range; cast the argument to DOUBLE or DECIMAL to sum larger values".into(),
    )
}

impl AggregateUDFImpl for Agreeing {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn schema_name(&self, params: &AggregateFunctionParams) -> DfResult<String> {
        self.inner.schema_name(params)
    }
    fn human_display(&self, params: &AggregateFunctionParams) -> DfResult<String> {
        self.inner.human_display(params)
    }
    fn display_name(&self, params: &AggregateFunctionParams) -> DfResult<String> {
        self.inner.display_name(params)
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field(&self, arg_fields: &[FieldRef]) -> DfResult<FieldRef> {
        self.inner.return_field(arg_fields)
    }
    fn is_nullable(&self) -> bool {
        self.inner.is_nullable()
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        self.inner.state_fields(args)
    }
    fn accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        if self.checked_sum(&args) {
            return Ok(Box::new(CheckedSum { sum: None }));
        }
        self.inner.accumulator(args)
    }
    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        if self.checked_sum(&args) || (self.float_min_max(&args) && args.return_type() == &DataType::Float64) {
            return true;
        }
        !self.float_min_max(&args) && self.inner.groups_accumulator_supported(args)
    }
    fn create_groups_accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn GroupsAccumulator>> {
        if self.checked_sum(&args) {
            return Ok(Box::new(CheckedGroupSums { sums: Vec::new(), seen: Vec::new() }));
        }
        if self.float_min_max(&args) && args.return_type() == &DataType::Float64 {
            return Ok(Box::new(TotalOrderGroups { min: self.is_min(), keys: Vec::new(), seen: Vec::new() }));
        }
        self.inner.create_groups_accumulator(args)
    }
    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        if self.checked_sum(&args) {
            return Ok(Box::new(CheckedSum { sum: None }));
        }
        self.inner.create_sliding_accumulator(args)
    }
    fn reverse_expr(&self) -> ReversedUDAF {
        self.inner.reverse_expr()
    }
    fn default_value(&self, data_type: &DataType) -> DfResult<ScalarValue> {
        self.inner.default_value(data_type)
    }
    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// One BIGINT sum, checked (no value yet: NULL). Also a sliding window's: it takes rows
/// back exactly.
#[derive(Debug)]
struct CheckedSum {
    sum: Option<i64>,
}

impl CheckedSum {
    fn add(&mut self, values: &ArrayRef, sign: i64) -> DfResult<()> {
        let values = values.as_primitive::<Int64Type>();
        for v in values.iter().flatten() {
            let d = v.checked_mul(sign).ok_or_else(overflow)?;
            self.sum = Some(self.sum.unwrap_or(0).checked_add(d).ok_or_else(overflow)?);
        }
        Ok(())
    }
}

impl Accumulator for CheckedSum {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.add(&values[0], 1)
    }
    fn retract_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.add(&values[0], -1)
    }
    fn supports_retract_batch(&self) -> bool {
        true
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        self.add(&states[0], 1)
    }
    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Int64(self.sum)])
    }
    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::Int64(self.sum))
    }
    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
}

/// The `GroupsAccumulator` of a type whose state is its result: one 8-byte value per
/// group in `$values` beside a `seen` flag, folded by its `fold` (rows and states alike)
/// and emitted by its `take`.
macro_rules! fold_groups_accumulator {
    ($t:ty, $values:ident) => {
        impl GroupsAccumulator for $t {
            fn update_batch(&mut self, values: &[ArrayRef], groups: &[usize], filter: Option<&BooleanArray>, total: usize) -> DfResult<()> {
                self.fold(&values[0], groups, filter, total)
            }
            fn merge_batch(&mut self, values: &[ArrayRef], groups: &[usize], filter: Option<&BooleanArray>, total: usize) -> DfResult<()> {
                self.fold(&values[0], groups, filter, total)
            }
            fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
                Ok(self.take(emit_to))
            }
            fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
                Ok(vec![self.take(emit_to)])
            }
            fn size(&self) -> usize {
                self.$values.capacity() * 8 + self.seen.capacity()
            }
        }
    };
}

/// BIGINT sums of many groups, checked.
#[derive(Debug)]
struct CheckedGroupSums {
    sums: Vec<i64>,
    seen: Vec<bool>,
}

impl CheckedGroupSums {
    fn fold(&mut self, values: &ArrayRef, groups: &[usize], filter: Option<&BooleanArray>, total: usize) -> DfResult<()> {
        self.sums.resize(total, 0);
        self.seen.resize(total, false);
        let values = values.as_primitive::<Int64Type>();
        if values.null_count() == 0 && filter.is_none() {
            // Every row counts: one pass without per-row checks but the overflow flag.
            let mut overflowed = false;
            for (&g, &v) in groups.iter().zip(values.values().iter()) {
                let (sum, over) = self.sums[g].overflowing_add(v);
                self.sums[g] = sum;
                overflowed |= over;
                self.seen[g] = true;
            }
            return if overflowed { Err(overflow()) } else { Ok(()) };
        }
        for (i, &g) in groups.iter().enumerate() {
            if values.is_null(i) || filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            self.sums[g] = self.sums[g].checked_add(values.value(i)).ok_or_else(overflow)?;
            self.seen[g] = true;
        }
        Ok(())
    }

    fn take(&mut self, emit_to: EmitTo) -> ArrayRef {
        let sums = emit_to.take_needed(&mut self.sums);
        let seen = emit_to.take_needed(&mut self.seen);
        Arc::new(sums.into_iter().zip(seen).map(|(s, seen)| seen.then_some(s)).collect::<Int64Array>())
    }
}

fold_groups_accumulator!(CheckedGroupSums, sums);

/// MIN or MAX of DOUBLE for many groups, in IEEE 754's total order (as the streams'
/// `Acc::MinMaxFloat` and DataFusion's ungrouped kernels).
#[derive(Debug)]
struct TotalOrderGroups {
    min: bool,
    /// Each group's extreme as its total-order key (`total_order_key`): integers compare
    /// as the floats do in the total order, without a branch per row.
    keys: Vec<i64>,
    seen: Vec<bool>,
}

/// The integer whose order is IEEE 754's total order of the floats (`f64::total_cmp`'s
/// transform; it is its own inverse).
fn total_order_key(bits: i64) -> i64 {
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

impl TotalOrderGroups {
    fn fold(&mut self, values: &ArrayRef, groups: &[usize], filter: Option<&BooleanArray>, total: usize) -> DfResult<()> {
        self.keys.resize(total, if self.min { i64::MAX } else { i64::MIN });
        self.seen.resize(total, false);
        let values = values.as_primitive::<Float64Type>();
        let rows = groups.iter().zip(values.values().iter()).enumerate();
        let all = values.null_count() == 0 && filter.is_none();
        let counts = |i: usize| all || (values.is_valid(i) && filter.is_none_or(|f| f.is_valid(i) && f.value(i)));
        let (keys, seen) = (&mut self.keys, &mut self.seen);
        if self.min {
            for (_, (&g, v)) in rows.filter(|(i, _)| counts(*i)) {
                keys[g] = keys[g].min(total_order_key(v.to_bits() as i64));
                seen[g] = true;
            }
        } else {
            for (_, (&g, v)) in rows.filter(|(i, _)| counts(*i)) {
                keys[g] = keys[g].max(total_order_key(v.to_bits() as i64));
                seen[g] = true;
            }
        }
        Ok(())
    }

    fn take(&mut self, emit_to: EmitTo) -> ArrayRef {
        let keys = emit_to.take_needed(&mut self.keys);
        let seen = emit_to.take_needed(&mut self.seen);
        let values = keys.into_iter().zip(seen).map(|(k, seen)| seen.then(|| f64::from_bits(total_order_key(k) as u64)));
        Arc::new(values.collect::<Float64Array>())
    }
}

fold_groups_accumulator!(TotalOrderGroups, keys);
