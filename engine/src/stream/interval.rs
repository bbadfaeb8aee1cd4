//! The interval join: an inner equi-join whose condition also bounds the two rows' times
//! against each other (`ON a.k = b.k AND b.ts BETWEEN a.ts - INTERVAL '5' SECOND AND a.ts
//! + INTERVAL '5' SECOND`), so the watermark tells when a kept row can meet nothing more.
//!
//! The plan gives the bounds as `lo <= right time − left time <= hi` (milliseconds; the
//! exact condition, `<` or `<=`, still runs as the residual). A pair is emitted once, when
//! the later of its two rows arrives, as in the plain inner join. Under the merged
//! watermark `w` (no row of either side below it is still to come):
//! - a left row at `t` can still meet right rows in `[t + lo, t + hi]`, so it is dropped
//!   once `t + hi < w`; a right row at `t` once `t − lo < w`;
//! - a row arriving below `w` is late: some rows it would have met may be gone, so it is
//!   dropped and counted (`late_rows`), never joined with part of its matches.
//!
//! `LEFT`, `RIGHT` and `FULL` outer: a preserved side's row that met no row by the time it
//! is dropped (or on arrival, if it can meet none: a NULL key or time) goes out once, with
//! the other side's columns NULL. No row is emitted and then retracted: the output stays
//! append-only.
//!
//! `WHERE EXISTS (…)` / `NOT EXISTS (…)` (left semi and anti joins, [`Existence`]): only
//! left rows go out, once: a semi join's when it first meets a right row, an anti join's
//! when it is dropped having met none (as an outer join pads, without the right columns).
//!
//! The state is bounded by what arrives within the interval plus the watermark's delay.
//! A pair can hold a time up to `max(hi, −lo)` behind `w`, so the watermark passed on to
//! the readers is held back by that much (`watermark_delay_ms`): rows emitted are never
//! late downstream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};

use super::asof::{Loc, Rows};
use super::op::eval_branch;
use super::time::to_millis;
use super::JoinPlan;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo, Watermark};
use crate::error::{Error, Result};

/// An interval join: `JoinPlan`'s keys, residual and output, each side's time column and
/// the bounds of right time − left time.
#[derive(Clone, Debug)]
pub struct IntervalPlan {
    pub join: JoinPlan,
    /// The time column in each side's input (`[keys…, columns…]`).
    pub times: [usize; 2],
    /// Every pair the condition keeps has `lo <= right time − left time <= hi` (ms).
    pub lo: i64,
    pub hi: i64,
    /// `[LEFT, RIGHT]` outer (both: `FULL`): that side's rows that meet no row go out once
    /// the watermark says none can come, with the other side's columns NULL. An anti join
    /// is `[true, false]`.
    pub outer: [bool; 2],
    /// A semi or anti join: the output is the left rows' (`join.output` reads the left
    /// columns alone); `join.joined_schema` is still both sides', for the residual.
    pub existence: Option<Existence>,
}

/// Which left rows a semi or anti join emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existence {
    /// `EXISTS`: those that meet a right row, once.
    Semi,
    /// `NOT EXISTS`: those that meet none.
    Anti,
}

impl IntervalPlan {
    /// How far behind the merged watermark a kept row of `side` may be: the other side's
    /// rows still to come (at `w` or later) meet a left row at `t` while `t + hi >= w`, a
    /// right row while `t − lo >= w`.
    fn reach(&self, side: usize) -> i64 {
        if side == 0 {
            self.hi
        } else {
            -self.lo
        }
    }

    /// The other side's times a row of `side` at `t` meets.
    fn partners(&self, side: usize, t: i64) -> (i64, i64) {
        if side == 0 {
            (t.saturating_add(self.lo), t.saturating_add(self.hi))
        } else {
            (t.saturating_sub(self.hi), t.saturating_sub(self.lo))
        }
    }
}

/// A kept row's entry in the expiry order.
struct Kept {
    key: Box<[u8]>,
    /// It has met a row of the other side (an outer join pads only those that never did).
    matched: bool,
}

/// One side's kept rows: by key and time for probes, by time alone for expiry.
#[derive(Default)]
struct Side {
    rows: Rows,
    schema: Option<SchemaRef>,
    by_key: HashMap<Box<[u8]>, BTreeMap<(i64, u64), Loc>, ahash::RandomState>,
    by_time: BTreeMap<(i64, u64), Kept>,
}

impl Side {
    fn live(&self) -> usize {
        self.by_time.len()
    }

    fn keep(&mut self, key: Box<[u8]>, at: (i64, u64), loc: Loc, matched: bool) {
        self.by_key.entry(key.clone()).or_default().insert(at, loc);
        self.by_time.insert(at, Kept { key, matched });
    }

    /// Drops the rows before time `floor`, returning those that never met a row when
    /// `unmatched` asks for them; rebuilds the kept batches once most rows are gone.
    fn expire(&mut self, floor: i64, unmatched: bool) -> Result<Option<RecordBatch>> {
        let mut lonely = Vec::new();
        while let Some(entry) = self.by_time.first_entry() {
            if entry.key().0 >= floor {
                break;
            }
            let (at, kept) = entry.remove_entry();
            if let Some(versions) = self.by_key.get_mut(&kept.key) {
                let loc = versions.remove(&at);
                if unmatched && !kept.matched {
                    lonely.extend(loc);
                }
                if versions.is_empty() {
                    self.by_key.remove(&kept.key);
                }
            }
        }
        let lonely = match &self.schema {
            Some(schema) if !lonely.is_empty() => Some(self.rows.gather(&lonely, schema)?),
            _ => None,
        };
        if self.by_time.is_empty() {
            self.rows = Rows::default();
        } else if self.rows.stored > 4096 && self.rows.stored > 2 * self.live() {
            self.compact()?;
        }
        Ok(lonely)
    }

    fn loc(&self, at: &(i64, u64), kept: &Kept) -> Loc {
        self.by_key[&kept.key][at]
    }

    /// Every kept row, oldest first, as one batch.
    fn kept(&self) -> Result<Option<RecordBatch>> {
        let Some(schema) = &self.schema else { return Ok(None) };
        if self.by_time.is_empty() {
            return Ok(None);
        }
        let locs: Vec<Loc> = self.by_time.iter().map(|(at, kept)| self.loc(at, kept)).collect();
        self.rows.gather(&locs, schema).map(Some)
    }

    fn compact(&mut self) -> Result<()> {
        let Some(batch) = self.kept()? else { return Ok(()) };
        self.rows = Rows::default();
        let id = self.rows.push(&batch)?;
        for (r, (at, kept)) in self.by_time.iter().enumerate() {
            if let Some(loc) = self.by_key.get_mut(&kept.key).and_then(|v| v.get_mut(at)) {
                *loc = (id, r as u32);
            }
        }
        Ok(())
    }
}

pub struct IntervalOperator {
    plan: Arc<IntervalPlan>,
    converter: RowConverter,
    sides: [Side; 2],
    /// Arrival order, to tell apart rows of one key at one time.
    seq: u64,
    watermark: i64,
    late: u64,
}

/// A pair found by a probe: the arriving row (by index in its batch), and the other
/// side's kept row (by time and location).
type Pair = (u32, (i64, u64), Loc);

impl IntervalOperator {
    pub fn new(plan: Arc<IntervalPlan>) -> Result<IntervalOperator> {
        let converter = RowConverter::new(plan.join.key_types.iter().map(|t| SortField::new(t.clone())).collect())?;
        Ok(IntervalOperator { plan, converter, sides: [Side::default(), Side::default()], seq: 0, watermark: i64::MIN, late: 0 })
    }

    /// Rows of `side` arrive (`matched`: restored rows, with their flags; they meet
    /// nothing again). Each meets the other side's kept rows of its key within the
    /// interval; those pairs passing the condition are emitted. Then it is kept while rows
    /// still to come can meet it; an outer side's row that can meet nothing more and met
    /// nothing goes out padded with NULLs at once (a NULL key or time meets nothing).
    fn add(&mut self, side: usize, batch: &RecordBatch, matched: Option<&[bool]>, out: &mut Collector) -> Result<()> {
        self.sides[side].schema.get_or_insert_with(|| batch.schema());
        let keys = self.plan.join.keys;
        let key_columns: Vec<ArrayRef> = batch.columns()[..keys].to_vec();
        let encoded = self.converter.convert_columns(&key_columns)?;
        let times = to_millis(batch.column(self.plan.times[side]))?;
        let id = self.sides[side].rows.push(batch)?;
        let mut arrived = Vec::with_capacity(batch.num_rows());
        let mut lonely = Vec::new();
        let mut pairs: Vec<Pair> = Vec::new();
        for r in 0..batch.num_rows() {
            if !times.is_valid(r) || !key_columns.iter().all(|c| c.is_valid(r)) {
                lonely.push(r as u32);
                continue;
            }
            let t = times.value(r);
            if matched.is_none() && t < self.watermark {
                self.late += 1;
                continue;
            }
            if matched.is_none() {
                if let Some(versions) = self.sides[1 - side].by_key.get(encoded.row(r).as_ref()) {
                    let (from, to) = self.plan.partners(side, t);
                    pairs.extend(versions.range((from, 0)..=(to, u64::MAX)).map(|(&at, &theirs)| (r as u32, at, theirs)));
                }
            }
            arrived.push((r, t));
        }
        let mut met = match matched {
            Some(flags) => flags.to_vec(),
            None => vec![false; batch.num_rows()],
        };
        let passed = self.emit(side, id, &pairs, out)?;
        if self.plan.existence == Some(Existence::Semi) {
            self.first_matches(side, id, &passed, out)?;
        }
        for (r, at) in passed {
            met[r as usize] = true;
            if let Some(kept) = self.sides[1 - side].by_time.get_mut(&at) {
                kept.matched = true;
            }
        }
        let reach = self.plan.reach(side);
        for (r, t) in arrived {
            if t.saturating_add(reach) >= self.watermark {
                self.seq += 1;
                self.sides[side].keep(encoded.row(r).as_ref().into(), (t, self.seq), (id, r as u32), met[r]);
            } else if !met[r] {
                lonely.push(r as u32);
            }
        }
        if self.plan.outer[side] && !lonely.is_empty() && matched.is_none() {
            let rows = arrow::compute::take_record_batch(batch, &UInt32Array::from(lonely))?;
            self.pad(side, &rows, out)?;
        }
        Ok(())
    }

    /// Emits the pairs passing the condition (left columns, then right, without the keys,
    /// through the residual and the `SELECT` list); returns them (the arriving row's index,
    /// the kept row's time).
    fn emit(&self, side: usize, id: u32, pairs: &[Pair], out: &mut Collector) -> Result<Vec<(u32, (i64, u64))>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let join = &self.plan.join;
        let keys = join.keys;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(join.joined_schema.fields().len());
        for s in 0..2 {
            let Some(schema) = &self.sides[s].schema else { return Err(Error::internal("an interval join paired a side it has no rows of")) };
            let locs: Vec<Loc> = pairs.iter().map(|&(mine, _, theirs)| if s == side { (id, mine) } else { theirs }).collect();
            let rows = self.sides[s].rows.gather(&locs, schema)?;
            columns.extend(rows.columns()[keys..].iter().cloned());
        }
        let mut joined = JoinPlan::conform(&join.joined_schema, columns, pairs.len())?;
        let mut passed: Vec<(u32, (i64, u64))> = pairs.iter().map(|&(mine, at, _)| (mine, at)).collect();
        if join.residual.is_some() {
            let keep = join.passing(&joined)?;
            passed = keep.iter().map(|&i| passed[i]).collect();
            joined = arrow::compute::take_record_batch(&joined, &UInt32Array::from_iter_values(keep.iter().map(|&i| i as u32)))?;
        }
        if self.plan.existence.is_none() {
            self.output(&joined, out)?;
        }
        Ok(passed)
    }

    /// A semi join's left rows among `passed` pairs that met no right row before: out.
    fn first_matches(&self, side: usize, id: u32, passed: &[(u32, (i64, u64))], out: &mut Collector) -> Result<()> {
        let mut locs: Vec<Loc> = Vec::new();
        if side == 0 {
            // Arriving left rows: each once, however many right rows it met.
            let mut seen = std::collections::HashSet::new();
            locs.extend(passed.iter().filter(|p| seen.insert(p.0)).map(|p| (id, p.0)));
        } else {
            let mut seen = std::collections::HashSet::new();
            for (_, at) in passed {
                if let Some(kept) = self.sides[0].by_time.get(at).filter(|k| !k.matched) {
                    if seen.insert(*at) {
                        locs.push(self.sides[0].loc(at, kept));
                    }
                }
            }
        }
        let Some(schema) = &self.sides[0].schema else { return Ok(()) };
        if locs.is_empty() {
            return Ok(());
        }
        let rows = self.sides[0].rows.gather(&locs, schema)?;
        self.left_rows(&rows, out)
    }

    /// Left rows (`[keys…, columns…]`) alone through the `SELECT` list (semi and anti).
    fn left_rows(&self, rows: &RecordBatch, out: &mut Collector) -> Result<()> {
        let join = &self.plan.join;
        let mine = rows.columns()[join.keys..].to_vec();
        let schema = Arc::new(join.joined_schema.project(&(0..mine.len()).collect::<Vec<_>>())?);
        let left = JoinPlan::conform(&schema, mine, rows.num_rows())?;
        self.output(&left, out)
    }

    /// Rows of `side` (`[keys…, columns…]`) that met nothing, with the other side's
    /// columns NULL, through the `SELECT` list.
    fn pad(&self, side: usize, rows: &RecordBatch, out: &mut Collector) -> Result<()> {
        if self.plan.existence == Some(Existence::Anti) {
            return self.left_rows(rows, out);
        }
        let join = &self.plan.join;
        let joined = join.padded(side, &rows.columns()[join.keys..], rows.num_rows())?;
        self.output(&joined, out)
    }

    /// Rows through the `SELECT` list, out if any.
    fn output(&self, rows: &RecordBatch, out: &mut Collector) -> Result<()> {
        let join = &self.plan.join;
        let rows = eval_branch(None, &join.output, &join.schema, rows)?;
        if rows.num_rows() > 0 {
            out.rows.push(rows);
        }
        Ok(())
    }
}

/// What `save` writes: each side's kept rows (Arrow IPC, oldest first; empty: none) and
/// whether each has met a row.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct IntervalState {
    sides: [Vec<u8>; 2],
    matched: [Vec<bool>; 2],
    watermark: i64,
    late: u64,
}

impl OperatorSpec for IntervalPlan {
    fn name(&self) -> &'static str {
        "interval join"
    }

    fn schema(&self) -> SchemaRef {
        self.join.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(IntervalOperator::new(self)?))
    }

    fn uses_watermarks(&self) -> bool {
        true
    }

    /// Never negative: `lo <= hi`, so `hi >= 0` or `−lo > 0`.
    fn watermark_delay_ms(&self) -> i64 {
        self.reach(0).max(self.reach(1))
    }
}

impl Operator for IntervalOperator {
    fn process(&mut self, port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        self.add(port, batch, None, out)
    }

    /// Drops what no row still to come can meet; an outer side's rows among them that met
    /// nothing go out padded with NULLs.
    fn on_watermark(&mut self, mark: Watermark, out: &mut Collector) -> Result<()> {
        let w = mark.ms();
        if w <= self.watermark {
            return Ok(());
        }
        self.watermark = w;
        for side in 0..2 {
            let floor = w.saturating_sub(self.plan.reach(side));
            if let Some(lonely) = self.sides[side].expire(floor, self.plan.outer[side])? {
                self.pad(side, &lonely, out)?;
            }
        }
        Ok(())
    }

    fn late_rows(&self) -> u64 {
        self.late
    }

    fn join_state(&self) -> Option<[u64; 2]> {
        Some([self.sides[0].live() as u64, self.sides[1].live() as u64])
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        let mut sides = [Vec::new(), Vec::new()];
        for (s, bytes) in sides.iter_mut().enumerate() {
            if let Some(batch) = self.sides[s].kept()? {
                *bytes = crate::ipc::to_bytes(&batch.schema(), &[batch])?;
            }
        }
        let matched = [0, 1].map(|s| self.sides[s].by_time.values().map(|k| k.matched).collect());
        let state = IntervalState { sides, matched, watermark: self.watermark, late: self.late };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&state).map_err(|e| Error::internal(format!("saving interval join state: {e}")))?;
        Ok(Some(bytes.into_vec()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let state: IntervalState = crate::checkpoint::load_state(bytes, "interval join state")?;
        let mut fresh = IntervalOperator::new(self.plan.clone())?;
        // Kept again as they were, without meeting each other a second time.
        let mut none = Collector::default();
        for (side, bytes) in state.sides.iter().enumerate() {
            if bytes.is_empty() {
                continue;
            }
            let mut flags = state.matched[side].as_slice();
            for batch in crate::ipc::read(bytes)? {
                let (these, rest) = flags.split_at(batch.num_rows().min(flags.len()));
                if these.len() != batch.num_rows() {
                    return Err(Error::checkpoint("interval join state: fewer match flags than rows"));
                }
                fresh.add(side, &batch, Some(these), &mut none)?;
                flags = rest;
            }
        }
        fresh.watermark = state.watermark;
        fresh.late = state.late;
        *self = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::physical_expr::expressions::col;

    /// orders (key0, k, ts) ⋈ fills (key0, k, ts) with fill.ts − order.ts in [−2, 5],
    /// selecting both times.
    fn plan() -> Arc<IntervalPlan> {
        let joined = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("ts", DataType::Int64, true),
            Field::new("k2", DataType::Utf8, true),
            Field::new("ts2", DataType::Int64, true),
        ]));
        let output = ["ts", "ts2"].iter().map(|c| col(c, &joined).unwrap()).collect();
        let schema = Arc::new(Schema::new(vec![Field::new("ts", DataType::Int64, true), Field::new("ts2", DataType::Int64, true)]));
        let join = JoinPlan { keys: 1, key_types: vec![DataType::Utf8], residual: None, joined_schema: joined, output, schema, state_ttl_ms: None, outer: [false, false] };
        Arc::new(IntervalPlan { join, times: [2, 2], lo: -2, hi: 5, outer: [false, false], existence: None })
    }

    fn rows(rows: &[(Option<&str>, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key0", DataType::Utf8, true),
            Field::new("k", DataType::Utf8, true),
            Field::new("ts", DataType::Int64, true),
        ]));
        let k: ArrayRef = Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()));
        let ts: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
        RecordBatch::try_new(schema, vec![k.clone(), k, ts]).unwrap()
    }

    /// The emitted (left time, right time) pairs; -1 for NULL.
    fn pairs(out: &mut Collector) -> Vec<(i64, i64)> {
        let mut v = Vec::new();
        for b in out.rows.drain(..) {
            let (l, r) = (b.column(0).as_primitive::<Int64Type>(), b.column(1).as_primitive::<Int64Type>());
            let value = |a: &Int64Array, i: usize| if a.is_valid(i) { a.value(i) } else { -1 };
            v.extend((0..b.num_rows()).map(|i| (value(l, i), value(r, i))));
        }
        v.sort();
        v
    }

    #[test]
    fn pairs_within_the_interval_meet_once_and_the_watermark_bounds_the_state() {
        let mut op = IntervalOperator::new(plan()).unwrap();
        let mut out = Collector::default();
        op.process(0, &rows(&[(Some("a"), 10), (Some("a"), 20), (Some("b"), 10), (None, 10)]), None, &mut out).unwrap();
        // a@8 meets a@10 (−2); a@15 meets a@10 (+5), not a@20 (−5); a@16 is 6 after 10 and 4
        // before 20; b@7 is 3 before b@10.
        op.process(1, &rows(&[(Some("a"), 8), (Some("a"), 15), (Some("a"), 16), (Some("b"), 7), (None, 10)]), None, &mut out).unwrap();
        assert_eq!(pairs(&mut out), vec![(10, 8), (10, 15)]);
        assert_eq!(op.join_state(), Some([3, 4]));
        // Watermark 16: left rows before 16 − 5 = 11 go; right rows before 16 − 2 = 14 go.
        op.on_watermark(Watermark::new(16), &mut out).unwrap();
        assert_eq!(op.join_state(), Some([1, 2]));
        // A row below the watermark is late; one at it still meets what is kept.
        op.process(0, &rows(&[(Some("a"), 15), (Some("a"), 18)]), None, &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        assert_eq!(pairs(&mut out), vec![(18, 16)]);
        let saved = op.save().unwrap().unwrap();
        let mut back = IntervalOperator::new(plan()).unwrap();
        back.restore(&saved).unwrap();
        assert_eq!(back.join_state(), op.join_state());
        back.process(1, &rows(&[(Some("a"), 22)]), None, &mut out).unwrap();
        assert_eq!(pairs(&mut out), vec![(18, 22), (20, 22)]);
        assert_eq!(back.late_rows(), 1);
        assert_eq!(plan().watermark_delay_ms(), 5);
    }

    #[test]
    fn a_side_fed_row_by_row_is_compacted_as_rows_expire() {
        let mut op = IntervalOperator::new(plan()).unwrap();
        let mut out = Collector::default();
        for t in 0..20_000 {
            op.process(0, &rows(&[(Some("a"), t)]), None, &mut out).unwrap();
            if t % 100 == 0 {
                op.on_watermark(Watermark::new(t), &mut out).unwrap();
            }
        }
        assert!(op.sides[0].live() <= 106, "{} rows kept", op.sides[0].live());
        assert!(op.sides[0].rows.stored <= 2 * 4096 + 100, "{} rows stored", op.sides[0].rows.stored);
        op.process(1, &rows(&[(Some("a"), 19_998)]), None, &mut out).unwrap();
        let want: Vec<(i64, i64)> = (19_993..=19_999).filter(|t| 19_998 - t >= -2 && 19_998 - t <= 5).map(|t| (t, 19_998)).collect();
        assert_eq!(pairs(&mut out), want);
    }

    #[test]
    fn an_outer_side_s_rows_that_meet_nothing_go_out_with_nulls_once_they_expire() {
        let mut full = (*plan()).clone();
        full.outer = [true, true];
        let mut op = IntervalOperator::new(Arc::new(full)).unwrap();
        let mut out = Collector::default();
        op.process(0, &rows(&[(Some("a"), 10), (Some("b"), 10), (None, 10)]), None, &mut out).unwrap();
        // The NULL key can meet nothing: out at once.
        assert_eq!(pairs(&mut out), vec![(10, -1)]);
        op.process(1, &rows(&[(Some("a"), 12), (Some("b"), 30)]), None, &mut out).unwrap();
        assert_eq!(pairs(&mut out), vec![(10, 12)]);
        // Watermark 16: left rows before 11 go (b@10 met nothing: padded), right rows
        // before 14 go (a@12 met a@10: not padded).
        op.on_watermark(Watermark::new(16), &mut out).unwrap();
        assert_eq!(pairs(&mut out), vec![(10, -1)]);
        let saved = op.save().unwrap().unwrap();
        let mut back = IntervalOperator::new(op.plan.clone()).unwrap();
        back.restore(&saved).unwrap();
        back.on_watermark(Watermark::new(100), &mut out).unwrap();
        assert_eq!(pairs(&mut out), vec![(-1, 30)]);
        assert_eq!(back.join_state(), Some([0, 0]));
    }
}
