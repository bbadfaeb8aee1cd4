//! Top-N per key as a changelog: `SELECT … FROM (SELECT …, ROW_NUMBER() OVER (PARTITION BY
//! sym ORDER BY px DESC) AS rn FROM trades) WHERE rn <= 3` over an append-only input, and
//! its `rn = 1` forms: the first row per key (`ORDER BY ts`, deduplication) or the latest
//! (`ORDER BY ts DESC`).
//!
//! Each partition (on the shard owning its keys) keeps only its current first `n` rows:
//! the input only grows, so a row that falls out can never come back, and the state is `n`
//! rows per partition. After each batch, every partition it changed emits the difference:
//! `-D` for the rows (with their old numbers) that left the output, then `+I` for those
//! that entered. When the query shows the row number, a row that moved is retracted and
//! inserted again with its new number; otherwise only rows entering or leaving change
//! the output. Rows that tie on the ORDER BY are numbered in the order of all their
//! columns, so 1 and N shards agree. A query of the stream reads the current rows.
//!
//! `SELECT DISTINCT` is the same operator partitioned by every selected column with
//! `n = 1` (`RankPlan::append_only`): each distinct row goes out once, when first seen,
//! and the state holds one row per distinct value.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};

use super::asof::{Loc, Rows};
use super::topn::Ranking;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct RankPlan {
    /// The input, the order, N and the query over the numbered rows.
    pub ranking: Ranking,
    /// The `SELECT` list's schema (what a query of the stream reads).
    pub rows_schema: SchemaRef,
    /// What it emits: `rows_schema` and the change column.
    pub schema: SchemaRef,
    /// The output shows the row number: a row whose number changed is a changed row.
    pub rank_visible: bool,
    /// `SELECT DISTINCT` (partitioned by every column, `n = 1`): a partition's first row
    /// never leaves, so the output is append-only rows, without the change column.
    pub append_only: bool,
}

/// A kept row: its sort key (ORDER BY, then every column) and where it is.
type Kept = (Box<[u8]>, Loc);

/// Marks a row of the batch being added (its final place is known once the batch is).
const PENDING: u32 = u32::MAX;

pub struct RankOperator {
    plan: Arc<RankPlan>,
    keys: RowConverter,
    /// Made from the first batch's column types.
    order: Option<RowConverter>,
    schema: Option<SchemaRef>,
    rows: Rows,
    /// Partition key → its first `n` rows, in order.
    parts: HashMap<Box<[u8]>, Vec<Kept>, ahash::RandomState>,
    live: usize,
}

impl RankOperator {
    fn new(plan: Arc<RankPlan>) -> Result<RankOperator> {
        let keys = RowConverter::new(plan.ranking.key_types.iter().cloned().map(SortField::new).collect())?;
        Ok(RankOperator { plan, keys, order: None, schema: None, rows: Rows::default(), parts: HashMap::default(), live: 0 })
    }

    /// The sort keys of `batch`'s rows: the ORDER BY, then every input column.
    fn order_keys(&mut self, batch: &RecordBatch) -> Result<arrow::row::Rows> {
        let (fields, columns) = self.plan.ranking.sort_key(batch);
        if self.order.is_none() {
            self.order = Some(RowConverter::new(fields)?);
        }
        Ok(self.order.as_ref().expect("made above").convert_columns(&columns)?)
    }

    /// Adds `batch`'s rows; returns each changed partition's rows before the batch.
    fn add(&mut self, batch: &RecordBatch) -> Result<HashMap<Box<[u8]>, Vec<Kept>, ahash::RandomState>> {
        self.schema.get_or_insert_with(|| batch.schema());
        let n = self.plan.ranking.n;
        let keys: Vec<ArrayRef> = batch.columns()[..self.plan.ranking.key_types.len()].to_vec();
        // Without PARTITION BY every row is in the one partition, whose key is empty.
        let encoded = if keys.is_empty() { None } else { Some(self.keys.convert_columns(&keys)?) };
        let order = self.order_keys(batch)?;
        let mut before: HashMap<Box<[u8]>, Vec<Kept>, ahash::RandomState> = HashMap::default();
        for r in 0..batch.num_rows() {
            let sort = order.row(r);
            let key: &[u8] = encoded.as_ref().map_or(&[], |e| e.row(r).data());
            let part = self.parts.entry(key.into()).or_default();
            if part.len() == n && part.last().is_some_and(|last| sort.as_ref() >= last.0.as_ref()) {
                continue;
            }
            if !before.contains_key(key) {
                before.insert(key.into(), part.clone());
            }
            let at = part.partition_point(|k| k.0.as_ref() <= sort.as_ref());
            part.insert(at, (sort.as_ref().into(), (PENDING, r as u32)));
            part.truncate(n);
        }
        // The batch's rows still kept are stored; their places are filled in.
        let mut entered: Vec<u32> = Vec::new();
        for key in before.keys() {
            entered.extend(self.parts[key].iter().filter(|k| k.1 .0 == PENDING).map(|k| k.1 .1));
        }
        entered.sort_unstable();
        if !entered.is_empty() {
            let kept = take_record_batch(batch, &UInt32Array::from(entered.clone()))?;
            let id = self.rows.push(&kept)?;
            for key in before.keys() {
                for k in self.parts.get_mut(key).expect("touched").iter_mut().filter(|k| k.1 .0 == PENDING) {
                    let row = entered.binary_search(&k.1 .1).map_err(|_| Error::internal("top-n: a kept row was not stored"))?;
                    k.1 = (id, row as u32);
                }
            }
        }
        self.live = self.live + before.keys().map(|k| self.parts[k].len()).sum::<usize>() - before.values().map(Vec::len).sum::<usize>();
        Ok(before)
    }

    /// Rows at `locs` numbered `ranks`, through the query.
    fn output(&self, locs: &[Loc], ranks: &[u64]) -> Result<RecordBatch> {
        let plan = &self.plan;
        let Some(schema) = &self.schema else { return Ok(RecordBatch::new_empty(plan.rows_schema.clone())) };
        let rows = self.rows.gather(locs, schema)?;
        plan.ranking.run(&rows, Arc::new(UInt64Array::from(ranks.to_vec())), &plan.rows_schema)
    }

    /// The changes of the partitions `before` lists, as one changelog batch.
    fn changes(&self, before: &HashMap<Box<[u8]>, Vec<Kept>, ahash::RandomState>) -> Result<Option<RecordBatch>> {
        let visible = self.plan.rank_visible;
        let (mut gone, mut gone_ranks, mut came, mut came_ranks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (key, old) in before {
            let new = &self.parts[key];
            let same = |a: &[Kept], i: usize, b: &[Kept]| match visible {
                true => b.get(i).is_some_and(|x| x.1 == a[i].1),
                false => b.iter().any(|x| x.1 == a[i].1),
            };
            for i in 0..old.len() {
                if !same(old, i, new) {
                    gone.push(old[i].1);
                    gone_ranks.push(i as u64 + 1);
                }
            }
            for i in 0..new.len() {
                if !same(new, i, old) {
                    came.push(new[i].1);
                    came_ranks.push(i as u64 + 1);
                }
            }
        }
        let inserted = self.output(&came, &came_ranks)?;
        if self.plan.append_only {
            return Ok((inserted.num_rows() > 0).then_some(inserted));
        }
        let retracted = self.output(&gone, &gone_ranks)?;
        let (r, i) = (retracted.num_rows(), inserted.num_rows());
        if r + i == 0 {
            return Ok(None);
        }
        let rows = arrow::compute::concat_batches(&self.plan.rows_schema, [&retracted, &inserted])?;
        let ops = StringArray::from_iter_values(std::iter::repeat_n("-D", r).chain(std::iter::repeat_n("+I", i)));
        let mut columns = rows.columns().to_vec();
        columns.push(Arc::new(ops));
        Ok(Some(RecordBatch::try_new(self.plan.schema.clone(), columns)?))
    }

    /// Every kept row in rank order with its number.
    fn kept(&self) -> (Vec<Loc>, Vec<u64>) {
        let mut locs = Vec::with_capacity(self.live);
        let mut ranks = Vec::with_capacity(self.live);
        for part in self.parts.values() {
            for (i, k) in part.iter().enumerate() {
                locs.push(k.1);
                ranks.push(i as u64 + 1);
            }
        }
        (locs, ranks)
    }

    /// Keeps only the kept rows' batch once most stored rows have left.
    fn compact(&mut self) -> Result<()> {
        if self.rows.stored <= 4096 || self.rows.stored <= 2 * self.live {
            return Ok(());
        }
        let Some(schema) = self.schema.clone() else { return Ok(()) };
        let (locs, _) = self.kept();
        let batch = self.rows.gather(&locs, &schema)?;
        let mut fresh = Rows::default();
        let id = fresh.push(&batch)?;
        let mut next = 0u32;
        for part in self.parts.values_mut() {
            for k in part.iter_mut() {
                k.1 = (id, next);
                next += 1;
            }
        }
        self.rows = fresh;
        Ok(())
    }
}

impl OperatorSpec for RankPlan {
    fn name(&self) -> &'static str {
        "top-n-changelog"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(RankOperator::new(self)?))
    }

    fn changelog(&self) -> bool {
        !self.append_only
    }
}

impl Operator for RankOperator {
    fn process(&mut self, _port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        let before = self.add(batch)?;
        out.rows.extend(self.changes(&before)?);
        self.compact()
    }

    fn scan(&self, _global: bool) -> Result<Option<Vec<RecordBatch>>> {
        if self.plan.append_only {
            // Its rows are retained as emitted, like any append-only stream's.
            return Ok(None);
        }
        let (locs, ranks) = self.kept();
        Ok(Some(vec![self.output(&locs, &ranks)?]))
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        let Some(schema) = &self.schema else { return Ok(Some(Vec::new())) };
        let (locs, _) = self.kept();
        let batch = self.rows.gather(&locs, schema)?;
        Ok(Some(crate::ipc::to_bytes(schema, &[batch])?))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let mut fresh = RankOperator::new(self.plan.clone())?;
        if !bytes.is_empty() {
            for batch in crate::ipc::read(bytes)? {
                fresh.add(&batch)?;
            }
        }
        *self = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::Operator as Op;
    use crate::stream::PhysExpr;

    /// Input `[key0, k, v]`; top `n` by v descending per k; output `k, v[, rn]`.
    fn plan(n: usize, rank_visible: bool) -> Arc<RankPlan> {
        let numbered = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
            Field::new("rn", DataType::UInt64, true),
        ]));
        let inner: Vec<PhysExpr> = (0..3).map(|i| Arc::new(Column::new(numbered.field(i).name(), i)) as PhysExpr).collect();
        let filter: PhysExpr = Arc::new(BinaryExpr::new(
            Arc::new(Column::new("rn", 2)),
            Op::LtEq,
            Arc::new(Literal::new(ScalarValue::UInt64(Some(n as u64)))),
        ));
        let width = if rank_visible { 3 } else { 2 };
        let rows_schema = Arc::new(Schema::new(numbered.fields()[..width].to_vec()));
        let mut fields = rows_schema.fields().to_vec();
        fields.push(Arc::new(Field::new(crate::stream::OP_COLUMN, DataType::Utf8, false)));
        let ranking = Ranking {
            key_types: vec![DataType::Int64],
            order: vec![(2, true, false)],
            n,
            numbered_schema: numbered.clone(),
            inner,
            inner_schema: numbered.clone(),
            filter,
            output: (0..width).map(|i| Arc::new(Column::new(numbered.field(i).name(), i)) as PhysExpr).collect(),
        };
        Arc::new(RankPlan {
            ranking,
            rows_schema,
            schema: Arc::new(Schema::new(fields)),
            rank_visible,
            append_only: false,
        })
    }

    fn feed(op: &mut RankOperator, rows: &[(i64, i64)]) -> Vec<String> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key0", DataType::Int64, true),
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let k = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let v = Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let batch = RecordBatch::try_new(schema, vec![Arc::new(k.clone()), Arc::new(k), Arc::new(v)]).unwrap();
        let mut out = Collector::default();
        op.process(0, &batch, None, &mut out).unwrap();
        text(&out.rows)
    }

    fn text(batches: &[RecordBatch]) -> Vec<String> {
        let mut lines = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|c| match c.data_type() {
                        DataType::Int64 => c.as_primitive::<Int64Type>().value(r).to_string(),
                        DataType::UInt64 => c.as_primitive::<arrow::datatypes::UInt64Type>().value(r).to_string(),
                        _ => c.as_string::<i32>().value(r).to_string(),
                    })
                    .collect();
                lines.push(cells.join(","));
            }
        }
        lines
    }

    #[test]
    fn rows_entering_and_leaving_the_top_n_are_inserted_and_retracted() {
        let mut op = RankOperator::new(plan(2, false)).unwrap();
        let mut first = feed(&mut op, &[(1, 5), (1, 7), (2, 1)]);
        first.sort();
        assert_eq!(first, vec!["1,5,+I", "1,7,+I", "2,1,+I"]);
        // 6 pushes 5 out; 4 never enters.
        assert_eq!(feed(&mut op, &[(1, 6), (1, 4)]), vec!["1,5,-D", "1,6,+I"]);
        let mut now = text(&op.scan(false).unwrap().unwrap());
        now.sort();
        assert_eq!(now, vec!["1,6", "1,7", "2,1"]);
        // Through a checkpoint: the same rows, and they go on from there.
        let saved = op.save().unwrap().unwrap();
        let mut back = RankOperator::new(plan(2, false)).unwrap();
        back.restore(&saved).unwrap();
        assert_eq!(feed(&mut back, &[(1, 9)]), vec!["1,6,-D", "1,9,+I"]);
    }

    #[test]
    fn with_the_row_number_shown_a_row_that_moves_is_updated() {
        let mut op = RankOperator::new(plan(2, true)).unwrap();
        assert_eq!(feed(&mut op, &[(1, 5)]), vec!["1,5,1,+I"]);
        assert_eq!(feed(&mut op, &[(1, 7)]), vec!["1,5,1,-D", "1,7,1,+I", "1,5,2,+I"]);
        assert_eq!(feed(&mut op, &[(1, 6), (1, 6)]), vec!["1,5,2,-D", "1,6,2,+I"]);
    }

    #[test]
    fn state_stays_at_n_rows_per_partition() {
        let mut op = RankOperator::new(plan(3, false)).unwrap();
        for b in 0..50 {
            let rows: Vec<(i64, i64)> = (0..1000).map(|i| (i % 10, b * 1000 + i)).collect();
            feed(&mut op, &rows);
        }
        assert_eq!(op.live, 30);
        assert!(op.rows.stored <= 4096 + 30, "{}", op.rows.stored);
    }
}
