//! Top-N per window: `SELECT … FROM (SELECT …, ROW_NUMBER() OVER (PARTITION BY window_end
//! ORDER BY vol DESC) AS rn FROM windowed) WHERE rn <= 3` over a windowed stream, whose
//! rows of one window all arrive before the watermark passes its `window_end`.
//!
//! Rows are kept per partition (on the shard owning its keys) until the merged watermark
//! reaches their `window_end`; then the partition is sorted, numbered, and its first `n`
//! rows go out through the query's projections and filter, once: the output is
//! append-only and the state holds only windows still open. Rows that tie on the ORDER BY
//! are numbered in the order of all their columns, so 1 and N shards agree. A row whose
//! window the watermark has passed is late: dropped and counted.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::{take_record_batch, SortOptions};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, SortField};

use super::asof::{Loc, Rows};
use super::op::eval_branch;
use super::time::to_millis;
use super::PhysExpr;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo, Watermark};
use crate::error::{Error, Result};

/// What both Top-N operators (this one and [`super::rank`]) rank and run: the input
/// (`[partition keys…, input columns…]`), how to order a partition, how many rows pass, and
/// the query over the numbered rows.
#[derive(Clone, Debug)]
pub struct Ranking {
    /// The input starts with these key columns.
    pub key_types: Vec<DataType>,
    /// Sort columns in the input, descending?, nulls first?
    pub order: Vec<(usize, bool, bool)>,
    /// How many rows of each partition can pass the filter (`rn <= n`).
    pub n: usize,
    /// The window node's row: the input columns (after the keys), then the row number.
    pub numbered_schema: SchemaRef,
    /// The subquery's `SELECT` list over the numbered row, and its schema.
    pub inner: Vec<PhysExpr>,
    pub inner_schema: SchemaRef,
    /// The filter on the subquery's rows (`rn <= n` and whatever else it says).
    pub filter: PhysExpr,
    /// The outer `SELECT` list over the subquery's rows.
    pub output: Vec<PhysExpr>,
}

impl Ranking {
    /// The order rows are numbered in: the ORDER BY, then, for ties, every input column, so
    /// the numbering does not depend on arrival (or on the number of shards). Returns the
    /// sort fields and the columns of `batch` they read.
    pub(super) fn sort_key(&self, batch: &RecordBatch) -> (Vec<SortField>, Vec<ArrayRef>) {
        let keys = self.key_types.len();
        let mut fields: Vec<SortField> = self
            .order
            .iter()
            .map(|&(c, descending, nulls_first)| SortField::new_with_options(batch.column(c).data_type().clone(), SortOptions { descending, nulls_first }))
            .collect();
        let mut columns: Vec<ArrayRef> = self.order.iter().map(|&(c, ..)| batch.column(c).clone()).collect();
        for c in &batch.columns()[keys..] {
            fields.push(SortField::new(c.data_type().clone()));
            columns.push(c.clone());
        }
        (fields, columns)
    }

    /// `rows` (the input's, keys first) numbered `ranks`, through the query, as `schema`.
    pub(super) fn run(&self, rows: &RecordBatch, ranks: Arc<dyn Array>, schema: &SchemaRef) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = rows.columns()[self.key_types.len()..].to_vec();
        columns.push(ranks);
        let numbered = RecordBatch::try_new(self.numbered_schema.clone(), columns)?;
        let inner = eval_branch(None, &self.inner, &self.inner_schema, &numbered)?;
        eval_branch(Some(&self.filter), &self.output, schema, &inner)
    }
}

#[derive(Clone, Debug)]
pub struct TopNPlan {
    pub ranking: Ranking,
    /// The input's `window_end` column: the partition is complete once the watermark is there.
    pub time: usize,
    /// What it emits.
    pub schema: SchemaRef,
}

pub struct TopNOperator {
    plan: Arc<TopNPlan>,
    converter: RowConverter,
    rows: Rows,
    schema: Option<SchemaRef>,
    /// (window end, partition key) → its rows.
    open: BTreeMap<(i64, Box<[u8]>), Vec<Loc>>,
    watermark: i64,
    late: u64,
}

impl TopNOperator {
    fn new(plan: Arc<TopNPlan>) -> Result<TopNOperator> {
        let converter = RowConverter::new(plan.ranking.key_types.iter().cloned().map(SortField::new).collect())?;
        Ok(TopNOperator { plan, converter, rows: Rows::default(), schema: None, open: BTreeMap::new(), watermark: i64::MIN, late: 0 })
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        self.schema.get_or_insert_with(|| batch.schema());
        let keys: Vec<ArrayRef> = batch.columns()[..self.plan.ranking.key_types.len()].to_vec();
        let encoded = self.converter.convert_columns(&keys)?;
        let times = to_millis(batch.column(self.plan.time))?;
        let id = self.rows.push(batch)?;
        for r in 0..batch.num_rows() {
            if !times.is_valid(r) || times.value(r) <= self.watermark {
                self.late += 1;
                continue;
            }
            self.open.entry((times.value(r), encoded.row(r).as_ref().into())).or_default().push((id, r as u32));
        }
        Ok(())
    }

    /// The first `n` rows of one complete partition, numbered, through the query.
    fn emit(&self, locs: &[Loc], out: &mut Collector) -> Result<()> {
        let Some(schema) = &self.schema else { return Ok(()) };
        let rows = self.rows.gather(locs, schema)?;
        let ranking = &self.plan.ranking;
        let (fields, columns) = ranking.sort_key(&rows);
        let order = RowConverter::new(fields)?.convert_columns(&columns)?;
        let mut ranked: Vec<u32> = (0..rows.num_rows() as u32).collect();
        ranked.sort_unstable_by(|&a, &b| order.row(a as usize).cmp(&order.row(b as usize)));
        ranked.truncate(ranking.n);
        let first = take_record_batch(&rows, &UInt32Array::from(ranked))?;
        let ranks = Arc::new(UInt64Array::from_iter_values(1..=first.num_rows() as u64));
        let rows = ranking.run(&first, ranks, &self.plan.schema)?;
        if rows.num_rows() > 0 {
            out.rows.push(rows);
        }
        Ok(())
    }
}

/// What `save` writes: the rows of the open windows (Arrow IPC; empty: none).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TopNState {
    rows: Vec<u8>,
    watermark: i64,
    late: u64,
}

impl OperatorSpec for TopNPlan {
    fn name(&self) -> &'static str {
        "top-n"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(TopNOperator::new(self)?))
    }

    fn uses_watermarks(&self) -> bool {
        true
    }
}

impl Operator for TopNOperator {
    fn process(&mut self, _port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, _out: &mut Collector) -> Result<()> {
        self.add(batch)
    }

    /// Every partition whose window the watermark reached is complete: out, and dropped.
    fn on_watermark(&mut self, mark: Watermark, out: &mut Collector) -> Result<()> {
        let w = mark.ms();
        if w <= self.watermark {
            return Ok(());
        }
        self.watermark = w;
        let open = self.open.split_off(&(w.saturating_add(1), Box::default()));
        let done = std::mem::replace(&mut self.open, open);
        for locs in done.values() {
            self.emit(locs, out)?;
        }
        if self.open.is_empty() {
            self.rows = Rows::default();
        } else if self.rows.stored > 4096 && self.rows.stored > 2 * self.open.values().map(Vec::len).sum::<usize>() {
            // Most kept rows belong to windows gone: keep only the open ones.
            let mut fresh = TopNOperator::new(self.plan.clone())?;
            if let Some(batch) = self.kept()? {
                fresh.add(&batch)?;
            }
            self.rows = fresh.rows;
            self.open = fresh.open;
        }
        Ok(())
    }

    fn late_rows(&self) -> u64 {
        self.late
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        let rows = match self.kept()? {
            Some(batch) => crate::ipc::to_bytes(&batch.schema(), &[batch])?,
            None => Vec::new(),
        };
        let state = TopNState { rows, watermark: self.watermark, late: self.late };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&state).map_err(|e| Error::internal(format!("saving top-n state: {e}")))?;
        Ok(Some(bytes.into_vec()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let state: TopNState = crate::checkpoint::load_state(bytes, "top-n state")?;
        let mut fresh = TopNOperator::new(self.plan.clone())?;
        if !state.rows.is_empty() {
            for batch in crate::ipc::read(&state.rows)? {
                fresh.add(&batch)?;
            }
        }
        fresh.watermark = state.watermark;
        fresh.late = state.late;
        *self = fresh;
        Ok(())
    }
}

impl TopNOperator {
    /// The rows of the open windows, as one batch.
    fn kept(&self) -> Result<Option<RecordBatch>> {
        let Some(schema) = &self.schema else { return Ok(None) };
        let locs: Vec<Loc> = self.open.values().flatten().copied().collect();
        if locs.is_empty() {
            return Ok(None);
        }
        self.rows.gather(&locs, schema).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema, UInt64Type};
    use datafusion::logical_expr::Operator as Op;
    use datafusion::physical_expr::expressions::{col, lit, BinaryExpr};

    /// Top 2 by vol per window_end over `[key0 = window_end, sym, vol, window_end]`,
    /// emitting sym and rn.
    fn plan() -> Arc<TopNPlan> {
        let numbered = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, true),
            Field::new("vol", DataType::Int64, true),
            Field::new("window_end", DataType::Int64, true),
            Field::new("rn", DataType::UInt64, true),
        ]));
        let inner: Vec<PhysExpr> = ["sym", "vol", "rn"].iter().map(|c| col(c, &numbered).unwrap()).collect();
        let inner_schema = Arc::new(numbered.project(&[0, 1, 3]).unwrap());
        let filter = Arc::new(BinaryExpr::new(col("rn", &inner_schema).unwrap(), Op::LtEq, lit(2u64))) as PhysExpr;
        let output = vec![col("sym", &inner_schema).unwrap(), col("rn", &inner_schema).unwrap()];
        let schema = Arc::new(inner_schema.project(&[0, 2]).unwrap());
        let ranking = Ranking { key_types: vec![DataType::Int64], order: vec![(2, true, false)], n: 2, numbered_schema: numbered, inner, inner_schema, filter, output };
        Arc::new(TopNPlan { ranking, time: 3, schema })
    }

    fn rows(rows: &[(&str, i64, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key0", DataType::Int64, true),
            Field::new("sym", DataType::Utf8, true),
            Field::new("vol", DataType::Int64, true),
            Field::new("window_end", DataType::Int64, true),
        ]));
        let end: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()));
        let sym: ArrayRef = Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()));
        let vol: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
        RecordBatch::try_new(schema, vec![end.clone(), sym, vol, end]).unwrap()
    }

    fn ranked(out: &mut Collector) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for b in out.rows.drain(..) {
            let (s, r) = (b.column(0).as_string::<i32>(), b.column(1).as_primitive::<UInt64Type>());
            v.extend((0..b.num_rows()).map(|i| (s.value(i).to_string(), r.value(i))));
        }
        v
    }

    #[test]
    fn a_window_s_first_rows_go_out_once_it_closes_and_late_ones_are_counted() {
        let mut op = TopNOperator::new(plan()).unwrap();
        let mut out = Collector::default();
        op.process(0, &rows(&[("a", 5, 1000), ("b", 9, 1000), ("c", 7, 1000), ("d", 7, 1000), ("e", 1, 2000)]), None, &mut out).unwrap();
        assert!(out.rows.is_empty());
        op.on_watermark(Watermark::new(1000), &mut out).unwrap();
        // b 9, then c and d tie at 7: c first by its columns.
        assert_eq!(ranked(&mut out), vec![("b".into(), 1), ("c".into(), 2)]);
        op.process(0, &rows(&[("z", 99, 1000)]), None, &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        let mut back = TopNOperator::new(plan()).unwrap();
        back.restore(&op.save().unwrap().unwrap()).unwrap();
        back.process(0, &rows(&[("f", 4, 2000)]), None, &mut out).unwrap();
        back.on_watermark(Watermark::new(2000), &mut out).unwrap();
        assert_eq!(ranked(&mut out), vec![("f".into(), 1), ("e".into(), 2)]);
        assert!(back.open.is_empty());
    }
}
