//! The ASOF join of a stream of events (left: trades) with a stream of versions (right:
//! quotes), on the shard that owns their key: each left row joins the right row of its
//! key with the latest time at or before its own (`MATCH_CONDITION(t.ts >= q.ts)`; `>`:
//! strictly before), or, forward (`t.ts <= q.ts`, `<`), the earliest at or after it, or
//! the nearest of those two (`MATCH_CONDITION(NEAREST(t.ts, q.ts))`; a tie goes to the one
//! before, as in `pandas.merge_asof(direction='nearest')`).
//! Inner: a left row with no such right row is dropped.
//!
//! Forward, a left row's match is final once a right row at or after it is known and the
//! watermark has passed that row (no earlier one can come); a left row of a key no later
//! right row reaches waits until the end of input.
//!
//! A left row is emitted exactly once, when its match is final: when the watermark (the
//! least of both inputs') passes its time, no right row at or before it can still come
//! (one behind the watermark is late, dropped and counted). Until then it waits. Right
//! rows are kept per key in time order; once the watermark passes, only the latest right
//! row before it can still be anyone's match, so every older one is dropped: the state is
//! bounded by the keys and what arrives within the watermark's delay.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::{interleave, take};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};

use super::op::eval_branch;
use super::time::to_millis;
use super::JoinPlan;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo, Watermark};
use crate::error::{Error, Result};

/// An ASOF join: `JoinPlan`'s keys, residual and output, and each side's time column.
#[derive(Clone, Debug)]
pub struct AsofPlan {
    pub join: JoinPlan,
    /// The time column in each side's input (`[keys…, columns…]`).
    pub left_time: usize,
    pub right_time: usize,
    /// `>` (`<` forward): the right row's time must differ from the left one's.
    pub strict: bool,
    /// Match the earliest right row at or after the left one (`t.ts <= q.ts`).
    pub forward: bool,
    /// Match the nearer of the backward and the forward match (`NEAREST(t.ts, q.ts)`).
    pub nearest: bool,
    /// `LEFT ASOF JOIN`: a left row without a match (or whose match fails the residual
    /// condition) is emitted with NULL right columns.
    pub left_outer: bool,
}

/// A row of a kept batch.
pub(super) type Loc = (u32, u32);

/// Rows kept in batches, addressed by `Loc`; rebuilt when most are dropped.
#[derive(Default)]
pub(super) struct Rows {
    batches: Vec<RecordBatch>,
    pub(super) stored: usize,
}

impl Rows {
    pub(super) fn push(&mut self, batch: &RecordBatch) -> Result<u32> {
        let id = u32::try_from(self.batches.len()).map_err(|_| Error::internal("a join holds too many batches"))?;
        self.stored += batch.num_rows();
        self.batches.push(batch.clone());
        Ok(id)
    }

    /// The rows at `locs`, as one batch.
    pub(super) fn gather(&self, locs: &[Loc], schema: &SchemaRef) -> Result<RecordBatch> {
        if locs.is_empty() {
            return Ok(RecordBatch::new_empty(schema.clone()));
        }
        let indices: Vec<(usize, usize)> = locs.iter().map(|&(b, r)| (b as usize, r as usize)).collect();
        let columns = (0..schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> = self.batches.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &indices)
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

pub struct AsofOperator {
    plan: Arc<AsofPlan>,
    converter: RowConverter,
    /// Right rows per key, by time (the last to arrive at a time wins, as in
    /// `pandas.merge_asof`).
    quotes: HashMap<Box<[u8]>, BTreeMap<i64, Loc>, ahash::RandomState>,
    right: Rows,
    right_live: usize,
    /// Left rows waiting for their match to be final, by (time, arrival).
    pending: BTreeMap<(i64, u64), (Box<[u8]>, Loc)>,
    left: Rows,
    arrivals: u64,
    watermark: i64,
    late: u64,
    /// The inputs' schemas (`[keys…, columns…]`), known from the first batch of each.
    schemas: [Option<SchemaRef>; 2],
}

impl AsofOperator {
    pub fn new(plan: Arc<AsofPlan>) -> Result<AsofOperator> {
        let converter = RowConverter::new(plan.join.key_types.iter().map(|t| SortField::new(t.clone())).collect())?;
        Ok(AsofOperator {
            plan,
            converter,
            quotes: HashMap::default(),
            right: Rows::default(),
            right_live: 0,
            pending: BTreeMap::new(),
            left: Rows::default(),
            arrivals: 0,
            watermark: i64::MIN,
            late: 0,
            schemas: [None, None],
        })
    }

    /// A left row's match under watermark `w` once it is final (`Some(None)`: final, none).
    fn settle(&self, key: &[u8], ts: i64, w: i64) -> Option<Option<Loc>> {
        if self.plan.nearest {
            return self.settle_nearest(key, ts, w);
        }
        if !self.plan.forward {
            let fin = if self.plan.strict { ts <= w } else { ts < w };
            return fin.then(|| self.probe(key, ts));
        }
        let next = self.probe(key, ts);
        let time = next.and_then(|_| {
            let versions = self.quotes.get(key)?;
            let lower = if self.plan.strict { Bound::Excluded(ts) } else { Bound::Included(ts) };
            versions.range((lower, Bound::Unbounded)).next().map(|(&t, _)| t)
        });
        match time {
            Some(t) if t < w => Some(next),
            _ if w == i64::MAX => Some(next),
            _ => None,
        }
    }

    /// Nearest: the backward match is final once the watermark passes the left row; a
    /// forward one wins only if strictly nearer, so before `ts + (ts − backward)`: the
    /// choice is final once the watermark is there, or once the earliest right row at or
    /// after `ts` is behind it.
    fn settle_nearest(&self, key: &[u8], ts: i64, w: i64) -> Option<Option<Loc>> {
        if ts >= w && w != i64::MAX {
            return None;
        }
        let versions = self.quotes.get(key);
        let back = versions.and_then(|v| v.range(..=ts).next_back()).map(|(&t, &loc)| (t, loc));
        let next = versions.and_then(|v| v.range(ts..).next()).map(|(&t, &loc)| (t, loc));
        let nearer_before = back.map_or(i64::MAX, |(t, _)| ts.saturating_add(ts - t));
        if w != i64::MAX && w < nearer_before && !next.is_some_and(|(t, _)| t < w) {
            return None;
        }
        Some(match (back, next) {
            (Some((b, bl)), Some((f, fl))) => Some(if f - ts < ts - b { fl } else { bl }),
            (Some((_, bl)), None) => Some(bl),
            (None, next) => next.map(|(_, fl)| fl),
        })
    }

    /// Each row's key (`None` with a NULL in it) and time (`None` if NULL).
    fn keys_and_times(&self, batch: &RecordBatch, time: usize) -> Result<Vec<Option<(Box<[u8]>, i64)>>> {
        let keys = self.plan.join.keys;
        let key_columns: Vec<ArrayRef> = batch.columns()[..keys].to_vec();
        let rows = self.converter.convert_columns(&key_columns)?;
        let times = to_millis(batch.column(time))?;
        Ok((0..batch.num_rows())
            .map(|r| {
                let valid = key_columns.iter().all(|c| c.is_valid(r)) && times.is_valid(r);
                valid.then(|| (Box::<[u8]>::from(rows.row(r).as_ref()), times.value(r)))
            })
            .collect())
    }

    fn add_left(&mut self, batch: &RecordBatch) -> Result<Vec<(Loc, Option<Loc>)>> {
        self.schemas[0].get_or_insert_with(|| batch.schema());
        let rows = self.keys_and_times(batch, self.plan.left_time)?;
        let id = self.left.push(batch)?;
        let mut now = Vec::new();
        for (r, row) in rows.into_iter().enumerate() {
            let loc = (id, r as u32);
            // A NULL key or time matches nothing: LEFT, it goes out at once with NULLs.
            let Some((key, ts)) = row else {
                if self.plan.left_outer {
                    now.push((loc, None));
                }
                continue;
            };
            if let Some(found) = self.settle(&key, ts, self.watermark) {
                now.push((loc, found));
            } else {
                self.arrivals += 1;
                self.pending.insert((ts, self.arrivals), (key, loc));
            }
        }
        Ok(now)
    }

    fn add_right(&mut self, batch: &RecordBatch) -> Result<()> {
        self.schemas[1].get_or_insert_with(|| batch.schema());
        let rows = self.keys_and_times(batch, self.plan.right_time)?;
        let id = self.right.push(batch)?;
        for (r, row) in rows.into_iter().enumerate() {
            let Some((key, ts)) = row else { continue };
            if ts < self.watermark {
                self.late += 1;
                continue;
            }
            if self.quotes.entry(key).or_default().insert(ts, (id, r as u32)).is_none() {
                self.right_live += 1;
            }
        }
        Ok(())
    }

    /// The right row a left row of `key` at `ts` joins, of those kept now.
    fn probe(&self, key: &[u8], ts: i64) -> Option<Loc> {
        let versions = self.quotes.get(key)?;
        let found = match (self.plan.forward, self.plan.strict) {
            (false, false) => versions.range(..=ts).next_back(),
            (false, true) => versions.range(..ts).next_back(),
            (true, false) => versions.range(ts..).next(),
            (true, true) => versions.range((Bound::Excluded(ts), Bound::Unbounded)).next(),
        };
        found.map(|(_, &loc)| loc)
    }

    /// The joined rows (left columns, then right) of `pairs`; `None` on the right: NULLs.
    fn joined(&self, pairs: &[(Loc, Option<Loc>)]) -> Result<RecordBatch> {
        let Some(left_schema) = &self.schemas[0] else { return Err(Error::internal("an ASOF join emitted before a left row")) };
        let keys = self.plan.join.keys;
        let join = &self.plan.join;
        let lefts = self.left.gather(&pairs.iter().map(|p| p.0).collect::<Vec<_>>(), left_schema)?;
        let mut columns: Vec<ArrayRef> = lefts.columns()[keys..].to_vec();
        let right_fields = &join.joined_schema.fields()[columns.len()..];
        let matched: Vec<Loc> = pairs.iter().filter_map(|p| p.1).collect();
        match &self.schemas[1] {
            Some(right_schema) if !matched.is_empty() => {
                let rights = self.right.gather(&matched, right_schema)?;
                let mut next = 0u32;
                let indices: UInt32Array = pairs
                    .iter()
                    .map(|p| {
                        p.1.map(|_| {
                            next += 1;
                            next - 1
                        })
                    })
                    .collect();
                for c in &rights.columns()[keys..] {
                    columns.push(take(c.as_ref(), &indices, None)?);
                }
            }
            _ => columns.extend(right_fields.iter().map(|f| new_null_array(f.data_type(), pairs.len()))),
        }
        Ok(RecordBatch::try_new(join.joined_schema.clone(), columns)?)
    }

    /// Emits `pairs` through the residual condition and the `SELECT` list: inner, the
    /// matched pairs passing it; left outer, every left row, NULL-padded where its match is
    /// missing or fails it.
    fn emit(&self, pairs: &[(Loc, Option<Loc>)], out: &mut Collector) -> Result<()> {
        let join = &self.plan.join;
        let mut pairs: Vec<(Loc, Option<Loc>)> =
            if self.plan.left_outer { pairs.to_vec() } else { pairs.iter().copied().filter(|p| p.1.is_some()).collect() };
        if pairs.is_empty() {
            return Ok(());
        }
        if join.residual.is_some() {
            let matched: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].1.is_some()).collect();
            if !matched.is_empty() {
                let candidates: Vec<(Loc, Option<Loc>)> = matched.iter().map(|&i| pairs[i]).collect();
                let mut keep = join.passing(&self.joined(&candidates)?)?.into_iter().peekable();
                for (k, &i) in matched.iter().enumerate() {
                    if keep.next_if_eq(&k).is_none() {
                        pairs[i].1 = None;
                    }
                }
            }
            if !self.plan.left_outer {
                pairs.retain(|p| p.1.is_some());
                if pairs.is_empty() {
                    return Ok(());
                }
            }
        }
        let rows = eval_branch(None, &join.output, &join.schema, &self.joined(&pairs)?)?;
        if rows.num_rows() > 0 {
            out.rows.push(rows);
        }
        Ok(())
    }

    /// Drops, per key, the right rows older than the latest one before `w`: no left row
    /// still to come (at `w` or later) can match them. Rebuilds the kept batches once
    /// most of their rows are gone.
    fn prune(&mut self, w: i64) -> Result<()> {
        let mut dropped = 0;
        let forward = self.plan.forward;
        self.quotes.retain(|_, versions| {
            // Backward, the latest before `w` stays (a left row at `w` or later may join it);
            // forward, a right row before `w` matches no left row still to come (the waiting
            // ones it would match were final at this watermark).
            let floor = if forward { Some(w) } else { versions.range(..w).next_back().map(|(&t, _)| t) };
            if let Some(floor) = floor {
                let keep = versions.split_off(&floor);
                dropped += versions.len();
                *versions = keep;
            }
            true
        });
        self.right_live -= dropped;
        if self.right.stored > 4096 && self.right.stored > 2 * self.right_live {
            self.compact_right()?;
        }
        if self.pending.is_empty() {
            self.left = Rows::default();
        } else if self.left.stored > 4096 && self.left.stored > 2 * self.pending.len() {
            self.compact_left()?;
        }
        Ok(())
    }

    /// The waiting left rows into one batch: the batches of rows already emitted go (a
    /// feed that never lets every left row out at once would keep them all otherwise).
    fn compact_left(&mut self) -> Result<()> {
        let Some(schema) = self.schemas[0].clone() else { return Ok(()) };
        let locs: Vec<Loc> = self.pending.values().map(|(_, loc)| *loc).collect();
        let batch = self.left.gather(&locs, &schema)?;
        self.left = Rows::default();
        let id = self.left.push(&batch)?;
        for (r, (_, loc)) in self.pending.values_mut().enumerate() {
            *loc = (id, r as u32);
        }
        Ok(())
    }

    fn compact_right(&mut self) -> Result<()> {
        let Some(schema) = self.schemas[1].clone() else { return Ok(()) };
        let mut entries: Vec<(&[u8], i64, Loc)> = Vec::with_capacity(self.right_live);
        for (key, versions) in &self.quotes {
            entries.extend(versions.iter().map(|(&ts, &loc)| (key.as_ref(), ts, loc)));
        }
        let batch = self.right.gather(&entries.iter().map(|e| e.2).collect::<Vec<_>>(), &schema)?;
        let moved: Vec<(Box<[u8]>, i64)> = entries.iter().map(|&(k, ts, _)| (k.into(), ts)).collect();
        self.right = Rows::default();
        let id = self.right.push(&batch)?;
        for (r, (key, ts)) in moved.into_iter().enumerate() {
            if let Some(versions) = self.quotes.get_mut(&key) {
                versions.insert(ts, (id, r as u32));
            }
        }
        Ok(())
    }
}

/// What `save` writes.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct AsofState {
    /// Waiting left rows and kept right rows, each as Arrow IPC (empty: none).
    left: Vec<u8>,
    right: Vec<u8>,
    watermark: i64,
    late: u64,
}

impl OperatorSpec for AsofPlan {
    fn name(&self) -> &'static str {
        "asof join"
    }

    fn schema(&self) -> SchemaRef {
        self.join.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(AsofOperator::new(self)?))
    }

    fn uses_watermarks(&self) -> bool {
        true
    }
}

impl Operator for AsofOperator {
    fn process(&mut self, port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        if port == 0 {
            let now = self.add_left(batch)?;
            self.emit(&now, out)
        } else {
            self.add_right(batch)
        }
    }

    fn on_watermark(&mut self, mark: Watermark, out: &mut Collector) -> Result<()> {
        let w = mark.ms();
        if w <= self.watermark {
            return Ok(());
        }
        self.watermark = w;
        let mut ready = Vec::new();
        if self.plan.forward || self.plan.nearest {
            // Any waiting row may have become final: those whose next right row is behind `w`.
            let mut done = Vec::new();
            for (&at, (key, loc)) in &self.pending {
                if let Some(found) = self.settle(key, at.0, w) {
                    ready.push((*loc, found));
                    done.push(at);
                }
            }
            for at in done {
                self.pending.remove(&at);
            }
        } else {
            // Backward, rows become final in time order.
            loop {
                let settled = match self.pending.first_key_value() {
                    Some((&(ts, _), (key, _))) => self.settle(key, ts, w),
                    None => None,
                };
                let Some(found) = settled else { break };
                let (_, (_, loc)) = self.pending.pop_first().expect("looked at above");
                ready.push((loc, found));
            }
        }
        self.emit(&ready, out)?;
        self.prune(w)
    }

    fn late_rows(&self) -> u64 {
        self.late
    }

    fn join_state(&self) -> Option<[u64; 2]> {
        Some([self.pending.len() as u64, self.right_live as u64])
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        let ipc = |rows: &Rows, locs: Vec<Loc>, schema: &Option<SchemaRef>| -> Result<Vec<u8>> {
            match schema {
                Some(schema) if !locs.is_empty() => {
                    let batch = rows.gather(&locs, schema)?;
                    crate::ipc::to_bytes(schema, &[batch])
                }
                _ => Ok(Vec::new()),
            }
        };
        let left_locs = self.pending.values().map(|(_, loc)| *loc).collect();
        let right_locs = self.quotes.values().flat_map(|v| v.values().copied()).collect();
        let state = AsofState {
            left: ipc(&self.left, left_locs, &self.schemas[0])?,
            right: ipc(&self.right, right_locs, &self.schemas[1])?,
            watermark: self.watermark,
            late: self.late,
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&state).map_err(|e| Error::internal(format!("saving ASOF join state: {e}")))?;
        Ok(Some(bytes.into_vec()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let state: AsofState = crate::checkpoint::load_state(bytes, "ASOF join state")?;
        let mut fresh = AsofOperator::new(self.plan.clone())?;
        // Fed back under no watermark: every left row waits again, every right row is kept.
        for (side, bytes) in [(1, &state.right), (0, &state.left)] {
            if bytes.is_empty() {
                continue;
            }
            for batch in crate::ipc::read(bytes)? {
                if side == 0 {
                    fresh.add_left(&batch)?;
                } else {
                    fresh.add_right(&batch)?;
                }
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
    use arrow::array::AsArray;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
    use datafusion::physical_expr::expressions::col;

    /// trades (key0, sym, ts, qty) ASOF quotes (key0, sym, ts, bid), selecting ts, qty, bid.
    fn plan() -> Arc<AsofPlan> {
        let joined = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, true),
            Field::new("ts", DataType::Int64, true),
            Field::new("qty", DataType::Int64, true),
            Field::new("qsym", DataType::Utf8, true),
            Field::new("qts", DataType::Int64, true),
            Field::new("bid", DataType::Float64, true),
        ]));
        let output = ["ts", "qty", "bid"].iter().map(|c| col(c, &joined).unwrap()).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Int64, true),
            Field::new("qty", DataType::Int64, true),
            Field::new("bid", DataType::Float64, true),
        ]));
        let join = JoinPlan { keys: 1, key_types: vec![DataType::Utf8], residual: None, joined_schema: joined, output, schema, state_ttl_ms: None, outer: [false, false] };
        Arc::new(AsofPlan { join, left_time: 2, right_time: 2, strict: false, forward: false, nearest: false, left_outer: false })
    }

    fn side(value: &str, rows: &[(&str, i64, f64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key0", DataType::Utf8, true),
            Field::new("sym", DataType::Utf8, true),
            Field::new("ts", DataType::Int64, true),
            Field::new(value, if value == "bid" { DataType::Float64 } else { DataType::Int64 }, true),
        ]));
        let syms: ArrayRef = Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()));
        let ts: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
        let value: ArrayRef = if value == "bid" {
            Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()))
        } else {
            Arc::new(Int64Array::from(rows.iter().map(|r| r.2 as i64).collect::<Vec<_>>()))
        };
        RecordBatch::try_new(schema, vec![syms.clone(), syms, ts, value]).unwrap()
    }

    fn triples(out: &Collector) -> Vec<(i64, i64, f64)> {
        let mut v = Vec::new();
        for b in &out.rows {
            let (ts, qty, bid) = (b.column(0).as_primitive::<Int64Type>(), b.column(1).as_primitive::<Int64Type>(), b.column(2).as_primitive::<Float64Type>());
            v.extend((0..b.num_rows()).map(|r| (ts.value(r), qty.value(r), bid.value(r))));
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }

    #[test]
    fn a_trade_joins_the_latest_quote_at_or_before_it_once_the_watermark_passes() {
        let mut op = AsofOperator::new(plan()).unwrap();
        let mut out = Collector::default();
        op.process(1, &side("bid", &[("A", 10, 1.0), ("A", 20, 2.0), ("B", 5, 9.0), ("A", 20, 2.5)]), None, &mut out).unwrap();
        op.process(0, &side("qty", &[("A", 20, 100.0), ("A", 15, 200.0), ("A", 5, 300.0), ("B", 30, 400.0)]), None, &mut out).unwrap();
        assert!(out.rows.is_empty(), "nothing is final before the watermark");
        op.on_watermark(Watermark::new(21), &mut out).unwrap();
        // ts 20 → the later of the two quotes at 20; 15 → the quote at 10; 5 → none (inner).
        assert_eq!(triples(&out), vec![(15, 200, 1.0), (20, 100, 2.5)]);
        // A quote behind the watermark is late; B's trade at 30 waits for the watermark.
        op.process(1, &side("bid", &[("B", 3, 7.0), ("B", 25, 8.0)]), None, &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        let saved = op.save().unwrap().unwrap();
        let mut back = AsofOperator::new(plan()).unwrap();
        back.restore(&saved).unwrap();
        let mut out = Collector::default();
        back.on_watermark(Watermark::new(31), &mut out).unwrap();
        assert_eq!(triples(&out), vec![(30, 400, 8.0)]);
        // Only the latest quote before the watermark is left per key.
        assert_eq!(back.join_state(), Some([0, 2]));
    }

    #[test]
    fn left_rows_already_emitted_do_not_pile_up_while_others_wait() {
        let mut op = AsofOperator::new(plan()).unwrap();
        let mut out = Collector::default();
        op.process(1, &side("bid", &[("A", 0, 1.0)]), None, &mut out).unwrap();
        for t in 1..20_000i64 {
            op.process(0, &side("qty", &[("A", t, t as f64)]), None, &mut out).unwrap();
            if t % 100 == 0 {
                // Some left rows always wait: the watermark trails the newest by 50.
                op.on_watermark(Watermark::new(t - 50), &mut out).unwrap();
            }
        }
        assert!(op.left.stored <= 2 * 4096 + 200, "{} left rows stored", op.left.stored);
        op.on_watermark(Watermark::new(i64::MAX), &mut out).unwrap();
        assert_eq!(triples(&out).len(), 19_999);
    }
}
