//! The inner equi-join of two append-only inputs, on the shard that owns the key.
//!
//! Each side keeps every row it has received (its branch output minus the key columns)
//! and an index from the row-encoded key to its rows, as a chain through `next` so one
//! key with many rows costs no per-key allocation. A batch arriving on one side probes
//! the other side's index, then joins its own: every matching pair is emitted exactly
//! once, when the later of its two rows arrives. Rows with a NULL key never match (SQL
//! equality). The residual condition and the `SELECT` list run over the joined rows.
//!
//! A join whose condition bounds the rows' times runs as an interval join instead
//! (`stream::interval`). This one keeps each row for the stream's life, or, with
//! `WITH (state_ttl = …)`, for that long of processing time after it arrived: rows
//! arrive in id order, so the expired rows are the ids below a `base`, which probes stop
//! at; once they are most of the side, the side is rebuilt from its live rows.
//!
//! LEFT/RIGHT/FULL (`JoinPlan::outer`, with `state_ttl`): the output is a changelog. A
//! preserved side's row that meets no row goes out at once padded with NULLs (`+I`); when
//! its first partner arrives, the padded row is retracted (`-D`) before the pair goes out.
//! Each kept row counts its partners (`Side::matched`). Rows with a NULL key are kept
//! (never indexed) so a query of the stream sees them padded. Expiry forgets rows without
//! retracting what they produced: a query of the stream then joins the rows still held.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array};
use arrow::compute::{interleave, take};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};

use super::op::eval_branch;
use super::time::now_ms;
use super::JoinPlan;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo};
use crate::error::{Error, Result};

const NONE: u32 = u32::MAX;
/// A received batch smaller than this joins the side's unmerged tail.
const SMALL_ROWS: usize = 1024;
/// The tail is merged into one batch once it holds this many, so a side fed row by row
/// keeps few batches (a probe gathers from all of them).
const TAIL_MAX: usize = 64;

#[derive(Default)]
struct Side {
    /// Received rows without their key columns.
    batches: Vec<RecordBatch>,
    /// `batches[tail..]` are small batches not merged yet, holding the row ids from `tail_id`.
    tail: usize,
    tail_id: usize,
    /// Row id → (batch, row).
    locs: Vec<(u32, u32)>,
    /// Row id → the previous row id with the same key.
    next: Vec<u32>,
    /// Key → the latest row id with it.
    heads: HashMap<Box<[u8]>, u32, ahash::RandomState>,
    /// Row ids below this have expired (`state_ttl`).
    base: u32,
    /// With `state_ttl`: (processing time, the row ids below which had arrived by then),
    /// oldest first.
    arrivals: VecDeque<(i64, u32)>,
    /// A preserved side of an outer join: row id → how many rows it has been paired with.
    matched: Vec<u32>,
}

impl Side {
    /// Rows arrive (`now`: their processing time, when the join expires rows).
    /// `matched`: a preserved side's rows' partner counts (every row is kept then, a NULL
    /// key's unindexed).
    fn insert(&mut self, keys: &Rows, valid: &[bool], payload: RecordBatch, now: Option<i64>, matched: Option<&[u32]>) -> Result<()> {
        let batch = u32::try_from(self.batches.len()).map_err(|_| Error::internal("join side holds too many batches"))?;
        for (row, key) in keys.iter().enumerate() {
            if let Some(counts) = matched {
                self.matched.push(counts[row]);
            }
            if !valid[row] {
                if matched.is_some() {
                    self.locs.push((batch, row as u32));
                    self.next.push(NONE);
                }
                continue;
            }
            let id = u32::try_from(self.locs.len()).map_err(|_| Error::internal("join side holds too many rows"))?;
            self.locs.push((batch, row as u32));
            let head = self.heads.entry(key.as_ref().into()).or_insert(NONE);
            self.next.push(*head);
            *head = id;
        }
        if let Some(now) = now {
            let end = self.locs.len() as u32;
            match self.arrivals.back_mut() {
                Some(last) if last.0 == now => last.1 = end,
                _ => self.arrivals.push_back((now, end)),
            }
        }
        let big = payload.num_rows() >= SMALL_ROWS;
        self.batches.push(payload);
        if big && self.tail == self.batches.len() - 1 {
            self.seal();
        } else if self.batches.len() - self.tail >= TAIL_MAX {
            self.merge_tail()?;
        }
        Ok(())
    }

    /// Everything received so far is out of the tail.
    fn seal(&mut self) {
        self.tail = self.batches.len();
        self.tail_id = self.locs.len();
    }

    /// Concatenates the tail's batches into one and points their rows' locations at it.
    fn merge_tail(&mut self) -> Result<()> {
        let tail = &self.batches[self.tail..];
        let mut offsets = Vec::with_capacity(tail.len());
        let mut rows = 0u32;
        for b in tail {
            offsets.push(rows);
            rows += b.num_rows() as u32;
        }
        let merged = arrow::compute::concat_batches(&tail[0].schema(), tail)?;
        let first = self.tail as u32;
        for loc in &mut self.locs[self.tail_id..] {
            *loc = (first, offsets[(loc.0 - first) as usize] + loc.1);
        }
        self.batches.truncate(self.tail);
        self.batches.push(merged);
        self.seal();
        Ok(())
    }

    /// Every live row with `key`, oldest last: (id, (batch, row)).
    fn matches<'a>(&'a self, key: &[u8]) -> impl Iterator<Item = (u32, (usize, usize))> + 'a {
        let mut id = self.heads.get(key).copied().unwrap_or(NONE);
        std::iter::from_fn(move || {
            if id == NONE || id < self.base {
                return None;
            }
            let (b, r) = self.locs[id as usize];
            let this = id;
            id = self.next[id as usize];
            Some((this, (b as usize, r as usize)))
        })
    }

    /// The rows with these ids, as one batch.
    fn gather(&self, ids: &[u32]) -> Result<Option<RecordBatch>> {
        let Some(first) = self.batches.first() else { return Ok(None) };
        let indices: Vec<(usize, usize)> = ids.iter().map(|&id| { let (b, r) = self.locs[id as usize]; (b as usize, r as usize) }).collect();
        let columns = (0..first.num_columns())
            .map(|c| {
                let arrays: Vec<&dyn Array> = self.batches.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &indices)
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(ids.len()));
        Ok(Some(RecordBatch::try_new_with_options(first.schema(), columns, &options)?))
    }

    fn rows(&self) -> usize {
        self.locs.len() - self.base as usize
    }

    /// The rows that arrived before `before` expire; the side is rebuilt once they are
    /// most of it.
    fn expire(&mut self, before: i64) -> Result<()> {
        while let Some(&(at, end)) = self.arrivals.front() {
            if at >= before {
                break;
            }
            self.base = self.base.max(end);
            self.arrivals.pop_front();
        }
        if self.base as usize >= SMALL_ROWS && self.base as usize * 2 >= self.locs.len() {
            *self = self.live()?;
        }
        Ok(())
    }

    /// The same side without its expired rows: one batch, ids from 0.
    fn live(&self) -> Result<Side> {
        let base = self.base;
        let live = &self.locs[base as usize..];
        if live.is_empty() {
            return Ok(Side::default());
        }
        let Some(batch) = self.gather(&(base..self.locs.len() as u32).collect::<Vec<_>>())? else { return Ok(Side::default()) };
        let shift = |id: u32| if id != NONE && id >= base { id - base } else { NONE };
        Ok(Side {
            batches: vec![batch],
            tail: 1,
            tail_id: live.len(),
            locs: (0..live.len() as u32).map(|r| (0, r)).collect(),
            next: self.next[base as usize..].iter().map(|&n| shift(n)).collect(),
            heads: self.heads.iter().filter(|(_, &id)| id >= base).map(|(k, &id)| (k.clone(), id - base)).collect(),
            base: 0,
            arrivals: self.arrivals.iter().map(|&(at, end)| (at, end - base)).collect(),
            matched: self.matched.get(base as usize..).map_or_else(Vec::new, <[u32]>::to_vec),
        })
    }

    fn save(&self) -> Result<SideState> {
        let batches = match self.batches.first() {
            Some(first) => crate::ipc::to_bytes(&first.schema(), &self.batches)?,
            None => Vec::new(),
        };
        Ok(SideState {
            batches,
            tail: self.tail as u64,
            tail_id: self.tail_id as u64,
            locs: self.locs.clone(),
            next: self.next.clone(),
            heads: self.heads.iter().map(|(k, id)| (k.to_vec(), *id)).collect(),
        })
    }

    fn restore(state: SideState) -> Result<Side> {
        let batches = if state.batches.is_empty() { Vec::new() } else { crate::ipc::read(&state.batches)? };
        Ok(Side {
            batches,
            tail: state.tail as usize,
            tail_id: state.tail_id as usize,
            locs: state.locs,
            next: state.next,
            heads: state.heads.into_iter().map(|(k, id)| (k.into_boxed_slice(), id)).collect(),
            base: 0,
            arrivals: VecDeque::new(),
            matched: Vec::new(),
        })
    }
}

/// With `state_ttl`, a checkpoint holds this after [`TTL_STATE_MAGIC`]: the sides without
/// their expired rows, and when their rows arrived.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TtlState {
    sides: [SideState; 2],
    arrivals: [Vec<(i64, u32)>; 2],
}

/// Marks a checkpoint of a join with `state_ttl`; one without is the two `SideState`s
/// alone, as before the option existed.
const TTL_STATE_MAGIC: &[u8; 8] = b"LDBJTTL1";

/// An outer join's checkpoint (after [`OUTER_STATE_MAGIC`]): [`TtlState`]'s parts and each
/// kept row's partner count.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct OuterState {
    sides: [SideState; 2],
    arrivals: [Vec<(i64, u32)>; 2],
    matched: [Vec<u32>; 2],
}

const OUTER_STATE_MAGIC: &[u8; 8] = b"LDBJOUT1";

/// One side's state in a checkpoint: its rows as Arrow IPC, its index as is.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SideState {
    batches: Vec<u8>,
    tail: u64,
    tail_id: u64,
    locs: Vec<(u32, u32)>,
    next: Vec<u32>,
    heads: Vec<(Vec<u8>, u32)>,
}

pub struct JoinOperator {
    plan: Arc<JoinPlan>,
    converter: RowConverter,
    sides: [Side; 2],
}

impl JoinOperator {
    pub fn new(plan: Arc<JoinPlan>) -> Result<JoinOperator> {
        let fields = plan.key_types.iter().map(|t| SortField::new(t.clone()));
        let converter = RowConverter::new(fields.collect())?;
        Ok(JoinOperator { plan, converter, sides: [Side::default(), Side::default()] })
    }

    fn join(&self) -> &JoinPlan {
        &self.plan
    }

    /// Both sides' rows and indexes, for a checkpoint.
    pub fn save(&self) -> Result<Vec<u8>> {
        let fail = |e: rkyv::rancor::Error| Error::internal(format!("saving join state: {e}"));
        if self.plan.state_ttl_ms.is_none() && !self.plan.is_outer() {
            let sides = [self.sides[0].save()?, self.sides[1].save()?];
            return Ok(rkyv::to_bytes::<rkyv::rancor::Error>(&sides).map_err(fail)?.into_vec());
        }
        let live = [self.sides[0].live()?, self.sides[1].live()?];
        if self.plan.is_outer() {
            let state = OuterState {
                sides: [live[0].save()?, live[1].save()?],
                arrivals: [live[0].arrivals.iter().copied().collect(), live[1].arrivals.iter().copied().collect()],
                matched: [live[0].matched.clone(), live[1].matched.clone()],
            };
            let mut bytes = OUTER_STATE_MAGIC.to_vec();
            bytes.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(&state).map_err(fail)?);
            return Ok(bytes);
        }
        let state = TtlState {
            sides: [live[0].save()?, live[1].save()?],
            arrivals: [live[0].arrivals.iter().copied().collect(), live[1].arrivals.iter().copied().collect()],
        };
        let mut bytes = TTL_STATE_MAGIC.to_vec();
        bytes.extend_from_slice(&rkyv::to_bytes::<rkyv::rancor::Error>(&state).map_err(fail)?);
        Ok(bytes)
    }

    pub fn restore(plan: Arc<JoinPlan>, bytes: &[u8]) -> Result<JoinOperator> {
        let mut op = JoinOperator::new(plan)?;
        if let Some(rest) = bytes.strip_prefix(OUTER_STATE_MAGIC.as_slice()) {
            let OuterState { sides: [left, right], arrivals: [la, ra], matched: [lm, rm] } =
                crate::checkpoint::load_state(rest, "outer join state")?;
            op.sides = [Side::restore(left)?, Side::restore(right)?];
            op.sides[0].arrivals = la.into();
            op.sides[1].arrivals = ra.into();
            op.sides[0].matched = lm;
            op.sides[1].matched = rm;
            return Ok(op);
        }
        match bytes.strip_prefix(TTL_STATE_MAGIC.as_slice()) {
            Some(rest) => {
                let TtlState { sides: [left, right], arrivals: [la, ra] } = crate::checkpoint::load_state(rest, "join state")?;
                op.sides = [Side::restore(left)?, Side::restore(right)?];
                op.sides[0].arrivals = la.into();
                op.sides[1].arrivals = ra.into();
            }
            None => {
                let [left, right]: [SideState; 2] = crate::checkpoint::load_state(bytes, "join state")?;
                op.sides = [Side::restore(left)?, Side::restore(right)?];
            }
        }
        Ok(op)
    }

    /// With `state_ttl`: the rows that arrived longer ago than it expire.
    fn expire(&mut self, now: i64) -> Result<()> {
        if let Some(ttl) = self.plan.state_ttl_ms {
            for side in &mut self.sides {
                side.expire(now.saturating_sub(ttl))?;
            }
        }
        Ok(())
    }

    /// Rows held, per side.
    pub fn state_rows(&self) -> [usize; 2] {
        [self.sides[0].rows(), self.sides[1].rows()]
    }

    /// A batch of `side`'s branch output (keys first) arrives; returns the joined rows it
    /// completes, as the stream's output.
    pub fn apply(&mut self, side: usize, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        if self.plan.is_outer() {
            return self.apply_outer(side, batch);
        }
        let (now, rows, valid, payload) = self.arrive(batch)?;
        let other = &self.sides[1 - side];
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (row, key) in rows.iter().enumerate() {
            if !valid[row] {
                continue;
            }
            for (_, loc) in other.matches(key.as_ref()) {
                mine.push(row as u32);
                theirs.push(loc);
            }
        }
        let joined = if mine.is_empty() { None } else { Some(self.pairs(side, &payload, &mine, &theirs)?) };
        self.sides[side].insert(&rows, &valid, payload, now, None)?;
        match joined {
            Some(joined) => self.finish(joined),
            None => Ok(None),
        }
    }

    /// The joined rows (left columns, then right) of `payload`'s rows `mine` with the
    /// other side's rows `theirs`.
    fn pairs(&self, side: usize, payload: &RecordBatch, mine: &[u32], theirs: &[(usize, usize)]) -> Result<RecordBatch> {
        let indices = UInt32Array::from(mine.to_vec());
        let own: Vec<ArrayRef> = payload.columns().iter().map(|c| take(c, &indices, None)).collect::<Result<_, _>>()?;
        let other = &self.sides[1 - side];
        let width = other.batches.first().map_or(0, |b| b.num_columns());
        let mut far = Vec::with_capacity(width);
        for col in 0..width {
            let arrays: Vec<&dyn Array> = other.batches.iter().map(|b| b.column(col).as_ref()).collect();
            far.push(interleave(&arrays, theirs)?);
        }
        let columns = if side == 0 { [own, far].concat() } else { [far, own].concat() };
        JoinPlan::conform(&self.join().joined_schema, columns, mine.len())
    }

    /// What every batch starts with: expiry (with `state_ttl`: returns now), then the
    /// batch's keys as rows, which of them are not NULL, and its rows without the keys.
    fn arrive(&mut self, batch: &RecordBatch) -> Result<(Option<i64>, Rows, Vec<bool>, RecordBatch)> {
        let now = self.plan.state_ttl_ms.map(|_| now_ms());
        if let Some(now) = now {
            self.expire(now)?;
        }
        let keys = self.join().keys;
        let key_columns: Vec<ArrayRef> = batch.columns()[..keys].to_vec();
        let rows = self.converter.convert_columns(&key_columns)?;
        let valid: Vec<bool> = (0..batch.num_rows()).map(|r| key_columns.iter().all(|c| c.is_valid(r))).collect();
        let payload = batch.project(&(keys..batch.num_columns()).collect::<Vec<_>>())?;
        Ok((now, rows, valid, payload))
    }

    /// An outer join's batch of `side`: `-D` for the other side's padded rows meeting their
    /// first partner, then `+I` for the pairs, then `+I` for this side's rows (if preserved)
    /// that met none, padded.
    fn apply_outer(&mut self, side: usize, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        let (now, rows, valid, payload) = self.arrive(batch)?;
        let (mut mine, mut theirs, mut their_ids) = (Vec::new(), Vec::new(), Vec::new());
        for (row, key) in rows.iter().enumerate() {
            if valid[row] {
                for (id, loc) in self.sides[1 - side].matches(key.as_ref()) {
                    mine.push(row as u32);
                    theirs.push(loc);
                    their_ids.push(id);
                }
            }
        }
        let mut changes: Vec<(RecordBatch, &'static str)> = Vec::new();
        let mut counts = vec![0u32; batch.num_rows()];
        let mut pairs = None;
        if !mine.is_empty() {
            let joined = self.pairs(side, &payload, &mine, &theirs)?;
            let pass = self.join().passing(&joined)?;
            let kept = take_pairs(&joined, &pass)?;
            if self.plan.outer[1 - side] {
                // The other side's rows meeting their first partner: their padded rows go.
                let mut first = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for &i in &pass {
                    let id = their_ids[i];
                    if self.sides[1 - side].matched[id as usize] == 0 && seen.insert(id) {
                        first.push(id);
                    }
                }
                if let Some(rows) = self.sides[1 - side].gather(&first)? {
                    changes.push((self.join().padded(1 - side, rows.columns(), rows.num_rows())?, "-D"));
                }
                for &i in &pass {
                    self.sides[1 - side].matched[their_ids[i] as usize] += 1;
                }
            }
            for &i in &pass {
                counts[mine[i] as usize] += 1;
            }
            pairs = Some(kept);
        }
        if let Some(joined) = pairs {
            changes.push((joined, "+I"));
        }
        if self.plan.outer[side] {
            let lonely: Vec<u32> = (0..batch.num_rows() as u32).filter(|&r| counts[r as usize] == 0).collect();
            if !lonely.is_empty() {
                let rows = arrow::compute::take_record_batch(&payload, &UInt32Array::from(lonely))?;
                changes.push((self.join().padded(side, rows.columns(), rows.num_rows())?, "+I"));
            }
            self.sides[side].insert(&rows, &valid, payload, now, Some(&counts))?;
        } else {
            self.sides[side].insert(&rows, &valid, payload, now, None)?;
        }
        self.changelog(changes)
    }

    /// Joined rows with their change types, through the `SELECT` list, as one batch
    /// ending with the change column.
    fn changelog(&self, changes: Vec<(RecordBatch, &'static str)>) -> Result<Option<RecordBatch>> {
        let join = self.join();
        let fields = &join.schema.fields()[..join.schema.fields().len() - 1];
        let rows_schema = Arc::new(arrow::datatypes::Schema::new(fields.to_vec()));
        let mut parts = Vec::with_capacity(changes.len());
        let mut ops: Vec<&str> = Vec::new();
        for (joined, op) in changes {
            let rows = eval_branch(None, &join.output, &rows_schema, &joined)?;
            ops.extend(std::iter::repeat_n(op, rows.num_rows()));
            parts.push(rows);
        }
        if ops.is_empty() {
            return Ok(None);
        }
        let rows = arrow::compute::concat_batches(&rows_schema, &parts)?;
        let mut columns = rows.columns().to_vec();
        columns.push(Arc::new(arrow::array::StringArray::from(ops)));
        Ok(Some(RecordBatch::try_new(join.schema.clone(), columns)?))
    }

    /// An outer join's current result: the pairs among the rows held, and the preserved
    /// rows held that met none, padded.
    fn current(&self) -> Result<Vec<RecordBatch>> {
        let mut changes = Vec::new();
        let (left, right) = (&self.sides[0], &self.sides[1]);
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for key in left.heads.keys() {
            for (lid, _) in left.matches(key) {
                for (rid, _) in right.matches(key) {
                    mine.push(lid);
                    theirs.push(rid);
                }
            }
        }
        if let (Some(l), Some(r)) = (left.gather(&mine)?, right.gather(&theirs)?) {
            let joined = JoinPlan::conform(&self.join().joined_schema, [l.columns(), r.columns()].concat(), mine.len())?;
            let pass = self.join().passing(&joined)?;
            changes.push((take_pairs(&joined, &pass)?, "+I"));
        }
        for side in 0..2 {
            if self.plan.outer[side] {
                let s = &self.sides[side];
                let lonely: Vec<u32> = (s.base..s.locs.len() as u32).filter(|&id| s.matched[id as usize] == 0).collect();
                if let Some(rows) = s.gather(&lonely)? {
                    changes.push((self.join().padded(side, rows.columns(), rows.num_rows())?, "+I"));
                }
            }
        }
        let Some(all) = self.changelog(changes)? else { return Ok(Vec::new()) };
        Ok(vec![all.project(&(0..all.num_columns() - 1).collect::<Vec<_>>())?])
    }

    /// Residual condition, then the `SELECT` list: a branch's filter and projection.
    fn finish(&self, joined: RecordBatch) -> Result<Option<RecordBatch>> {
        let join = self.join();
        let out = eval_branch(join.residual.as_ref(), &join.output, &join.schema, &joined)?;
        Ok((out.num_rows() > 0).then_some(out))
    }
}

/// The joined rows at `indices`.
fn take_pairs(joined: &RecordBatch, indices: &[usize]) -> Result<RecordBatch> {
    Ok(arrow::compute::take_record_batch(joined, &UInt32Array::from_iter_values(indices.iter().map(|&i| i as u32)))?)
}

impl OperatorSpec for JoinPlan {
    fn name(&self) -> &'static str {
        "join"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(JoinOperator::new(self)?))
    }

    /// With `state_ttl`, rows expire on a timer too, while no rows come.
    fn tick_ms(&self) -> Option<i64> {
        self.state_ttl_ms.map(|ttl| (ttl / 4).clamp(10, 1_000))
    }

    fn changelog(&self) -> bool {
        self.is_outer()
    }
}

impl Operator for JoinOperator {
    fn process(&mut self, port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        out.rows.extend(self.apply(port, batch)?);
        Ok(())
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        JoinOperator::save(self).map(Some)
    }

    fn on_tick(&mut self, _out: &mut Collector) -> Result<()> {
        self.expire(now_ms())
    }

    fn join_state(&self) -> Option<[u64; 2]> {
        Some([self.sides[0].rows() as u64, self.sides[1].rows() as u64])
    }

    fn scan(&self, _global: bool) -> Result<Option<Vec<RecordBatch>>> {
        match self.plan.is_outer() {
            true => self.current().map(Some),
            false => Ok(None),
        }
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        *self = JoinOperator::restore(self.plan.clone(), bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::{col, BinaryExpr};
    use datafusion::logical_expr::Operator;

    /// left (k, a) ⋈ right (k, b) on k, keeping rows with a < b when `residual`, and
    /// selecting k, a, b.
    fn plan(residual: bool) -> Arc<JoinPlan> {
        let joined = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("a", DataType::Int64, true),
            Field::new("k2", DataType::Utf8, true),
            Field::new("b", DataType::Int64, true),
        ]));
        let cond = residual.then(|| {
            Arc::new(BinaryExpr::new(col("a", &joined).unwrap(), Operator::Lt, col("b", &joined).unwrap())) as _
        });
        let output = vec![col("k", &joined).unwrap(), col("a", &joined).unwrap(), col("b", &joined).unwrap()];
        let out_schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
        ]));
        Arc::new(JoinPlan { keys: 1, key_types: vec![DataType::Utf8], residual: cond, joined_schema: joined, output, schema: out_schema, state_ttl_ms: None, outer: [false, false] })
    }

    fn rows(keys: &[Option<&str>], v: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key0", DataType::Utf8, true),
            Field::new("k", DataType::Utf8, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let k = Arc::new(StringArray::from(keys.to_vec()));
        RecordBatch::try_new(schema, vec![k.clone(), k, Arc::new(Int64Array::from(v.to_vec()))]).unwrap()
    }

    fn triples(b: Option<RecordBatch>) -> Vec<(String, i64, i64)> {
        let Some(b) = b else { return vec![] };
        let k = b.column(0).as_string::<i32>();
        let a = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let v = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        let mut out: Vec<_> = (0..b.num_rows()).map(|i| (k.value(i).to_string(), a.value(i), v.value(i))).collect();
        out.sort();
        out
    }

    #[test]
    fn each_pair_is_emitted_once_when_its_later_row_arrives() {
        let mut j = JoinOperator::new(plan(false)).unwrap();
        assert_eq!(triples(j.apply(0, &rows(&[Some("x"), Some("y")], &[1, 2])).unwrap()), vec![]);
        let out = j.apply(1, &rows(&[Some("x"), Some("x"), Some("z")], &[10, 11, 12])).unwrap();
        assert_eq!(triples(out), vec![("x".into(), 1, 10), ("x".into(), 1, 11)]);
        // A second left x meets both right x rows; nothing is repeated.
        let out = j.apply(0, &rows(&[Some("x"), Some("z")], &[3, 4])).unwrap();
        assert_eq!(triples(out), vec![("x".into(), 3, 10), ("x".into(), 3, 11), ("z".into(), 4, 12)]);
        assert_eq!(j.state_rows(), [4, 3]);
    }

    #[test]
    fn a_side_fed_row_by_row_keeps_few_batches_and_every_match() {
        let mut j = JoinOperator::new(plan(false)).unwrap();
        for i in 0..200 {
            j.apply(0, &rows(&[Some(if i % 2 == 0 { "x" } else { "y" })], &[i])).unwrap();
        }
        assert!(j.sides[0].batches.len() <= TAIL_MAX, "{} batches", j.sides[0].batches.len());
        let out = triples(j.apply(1, &rows(&[Some("x")], &[1000])).unwrap());
        let want: Vec<_> = (0..200).step_by(2).map(|i| ("x".to_string(), i, 1000)).collect();
        assert_eq!(out, want);
    }

    /// `plan`'s join as LEFT/RIGHT/FULL: its output gets the change column.
    fn outer(preserved: [bool; 2]) -> Arc<JoinPlan> {
        let mut plan = (*plan(false)).clone();
        plan.outer = preserved;
        let mut fields = plan.schema.fields().to_vec();
        fields.push(Arc::new(Field::new(crate::stream::OP_COLUMN, DataType::Utf8, false)));
        plan.schema = Arc::new(Schema::new(fields));
        Arc::new(plan)
    }

    fn changes(b: Option<RecordBatch>) -> Vec<String> {
        let Some(b) = b else { return vec![] };
        let k = b.column(0).as_string::<i32>();
        let a = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let v = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        let op = b.column(3).as_string::<i32>();
        let cell = |c: &dyn Array, i: usize, s: String| if c.is_valid(i) { s } else { "_".to_string() };
        (0..b.num_rows())
            .map(|i| format!("{} {} {} {}", cell(k, i, k.value(i).to_string()), cell(a, i, a.value(i).to_string()), cell(v, i, v.value(i).to_string()), op.value(i)))
            .collect()
    }

    #[test]
    fn an_outer_join_pads_then_retracts_when_the_first_partner_arrives() {
        let mut j = JoinOperator::new(outer([true, true])).unwrap();
        assert_eq!(changes(j.apply(0, &rows(&[Some("x"), None], &[1, 2])).unwrap()), vec!["x 1 _ +I", "_ 2 _ +I"]);
        // x's first partner: its padded row goes, the pair comes; z meets nothing.
        assert_eq!(changes(j.apply(1, &rows(&[Some("x"), Some("z")], &[10, 11])).unwrap()), vec!["x 1 _ -D", "x 1 10 +I", "_ _ 11 +I"]);
        // A second partner retracts nothing.
        assert_eq!(changes(j.apply(1, &rows(&[Some("x")], &[12])).unwrap()), vec!["x 1 12 +I"]);
        // z's right row now meets a left z: retracted, paired.
        assert_eq!(changes(j.apply(0, &rows(&[Some("z")], &[3])).unwrap()), vec!["_ _ 11 -D", "z 3 11 +I"]);
        let mut now: Vec<String> = changes(j.current().unwrap().pop().map(|b| {
            let mut cols = b.columns().to_vec();
            cols.push(Arc::new(arrow::array::StringArray::from(vec!["="; b.num_rows()])));
            RecordBatch::try_new(j.plan.schema.clone(), cols).unwrap()
        }));
        now.sort();
        assert_eq!(now, vec!["_ 2 _ =", "x 1 10 =", "x 1 12 =", "z 3 11 ="]);
        // A checkpoint keeps the counts: x's later partner retracts nothing.
        let mut back = JoinOperator::restore(j.plan.clone(), &j.save().unwrap()).unwrap();
        assert_eq!(changes(back.apply(1, &rows(&[Some("x")], &[13])).unwrap()), vec!["x 1 13 +I"]);
    }

    #[test]
    fn null_keys_never_match_and_the_residual_filters_pairs() {
        let mut j = JoinOperator::new(plan(true)).unwrap();
        j.apply(0, &rows(&[None, Some("x"), Some("x")], &[1, 5, 50])).unwrap();
        let out = j.apply(1, &rows(&[None, Some("x")], &[7, 10])).unwrap();
        // x: a=5 < b=10 passes, a=50 does not; the NULL keys meet nothing.
        assert_eq!(triples(out), vec![("x".into(), 5, 10)]);
        assert_eq!(j.state_rows(), [2, 1]);
    }

    /// `n` rows of key `key` arriving at processing time `now` into `side`.
    fn arrive(j: &mut JoinOperator, side: usize, key: &str, v: std::ops::Range<i64>, now: i64) {
        let b = rows(&vec![Some(key); v.clone().count()], &v.collect::<Vec<_>>());
        let keys = j.converter.convert_columns(&b.columns()[..1]).unwrap();
        let valid = vec![true; b.num_rows()];
        j.sides[side].insert(&keys, &valid, b.project(&[1, 2]).unwrap(), Some(now), None).unwrap();
    }

    #[test]
    fn with_a_ttl_rows_expire_in_arrival_order_and_the_side_is_rebuilt_without_them() {
        let mut plan = (*plan(false)).clone();
        plan.state_ttl_ms = Some(1_000);
        let mut j = JoinOperator::new(Arc::new(plan)).unwrap();
        arrive(&mut j, 0, "x", 0..3, 100);
        arrive(&mut j, 0, "y", 3..5, 200);
        arrive(&mut j, 0, "x", 5..6, 300);
        // At 1,250 what arrived before 250 has expired: x's 0..3 and y's 3..5.
        j.expire(1_250).unwrap();
        assert_eq!(j.state_rows(), [1, 0]);
        let out = j.apply(1, &rows(&[Some("x"), Some("y")], &[10, 11])).unwrap();
        // The right rows arrive now (wall clock), long after 1,300: the left x at 300 is gone too.
        assert_eq!(triples(out), vec![]);
        // Many rows, most expired: the side is rebuilt from the live ones, which still match.
        let mut j = JoinOperator::new(j.plan.clone()).unwrap();
        for t in 0..3_000 {
            arrive(&mut j, 0, if t % 2 == 0 { "x" } else { "y" }, t..t + 1, t);
        }
        j.expire(2_990).unwrap();
        assert_eq!(j.sides[0].rows(), 1_010);
        assert_eq!(j.sides[0].base, 0, "rebuilt");
        assert_eq!(j.sides[0].locs.len(), 1_010);
        let x: Vec<i64> = j.sides[0].matches(j.converter.convert_columns(&[Arc::new(StringArray::from(vec!["x"])) as ArrayRef]).unwrap().row(0).as_ref())
            .map(|(_, (b, r))| j.sides[0].batches[b].column(1).as_primitive::<arrow::datatypes::Int64Type>().value(r))
            .collect();
        assert_eq!(x, (1_990..3_000).rev().filter(|t| t % 2 == 0).collect::<Vec<_>>());
        // The checkpoint keeps the live rows and when they arrived.
        let back = JoinOperator::restore(j.plan.clone(), &j.save().unwrap()).unwrap();
        assert_eq!(back.state_rows(), [1_010, 0]);
        assert_eq!(back.sides[0].arrivals.front(), Some(&(1_990, 1)));
    }
}
