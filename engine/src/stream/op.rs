//! The operators of a stream: the stateless [`eval_branch`] and the keyed, windowed
//! [`AggOperator`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use hashbrown::HashTable;

use super::agg::{Acc, Values};
use super::time::{from_millis, to_millis};
use super::{AggPlan, Emit, GroupCol, PhysExpr, WindowKind, OP_DELETE, OP_INSERT, OP_RETRACT, OP_UPDATE};
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo, Watermark};
use crate::error::{Error, Result};
use crate::partition;

/// Filter then project one input batch.
pub fn eval_branch(filter: Option<&PhysExpr>, exprs: &[PhysExpr], schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    let batch = match filter {
        Some(f) => {
            let mask = f.evaluate(batch)?.into_array(batch.num_rows())?;
            let mask = mask
                .as_boolean_opt()
                .ok_or_else(|| Error::query(format!("WHERE must be boolean, not {}", mask.data_type())))?;
            // Every row passing (a single row that passes, say) needs no copy; none
            // passing, no projection.
            match mask.true_count() {
                0 => return Ok(RecordBatch::new_empty(schema.clone())),
                n if n == batch.num_rows() => batch.clone(),
                _ => filter_record_batch(batch, mask)?,
            }
        }
        None => batch.clone(),
    };
    project(exprs, schema, &batch)
}

fn project(exprs: &[PhysExpr], schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut columns = Vec::with_capacity(exprs.len());
    for (e, field) in exprs.iter().zip(schema.fields()) {
        let array = e.evaluate(batch)?.into_array(n)?;
        columns.push(if array.data_type() == field.data_type() { array } else { arrow::compute::cast(&array, field.data_type())? });
    }
    Ok(RecordBatch::try_new_with_options(schema.clone(), columns, &RecordBatchOptions::new().with_row_count(Some(n)))?)
}

/// +1 for a row a changelog adds (`+I`, `+U`), -1 for one it takes back (`-U`, `-D`);
/// any other value (or a null) is an error.
pub fn change_signs(ops: &ArrayRef) -> Result<Vec<i64>> {
    let ops = ops.as_string_opt::<i32>().ok_or_else(|| Error::internal("a change-type column that is not text"))?;
    ops.iter()
        .map(|op| match op {
            Some("+I" | "+U") => Ok(1),
            Some("-U" | "-D") => Ok(-1),
            other => Err(Error::query(format!("unknown change type {other:?} in a changelog"))),
        })
        .collect()
}

/// Makes every field nullable: emitted rows may hold nulls DataFusion's static schema
/// did not foresee (an empty group's SUM).
pub fn nullable(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema.fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true)).collect::<Vec<_>>(),
    ))
}

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Group {
    key: Box<[u8]>,
    start: i64,
    end: i64,
    live: bool,
    /// Emitted at least once (its row is out, or it has produced a `+I`).
    emitted: bool,
}

/// What [`AggOperator::save`] writes: every field of the operator's state.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct AggState {
    index: Vec<(Vec<u8>, u32)>,
    sessions: Vec<(Vec<u8>, Vec<u32>)>,
    groups: Vec<Group>,
    free: Vec<u32>,
    closing: Vec<(i64, u32)>,
    accs: Vec<Acc>,
    watermark: i64,
    arrivals: i64,
    late_rows: u64,
    dirty: Vec<u32>,
    last_rows: Vec<(u32, Vec<u8>)>,
    net: Vec<i64>,
}

/// Begins `AggOperator::save`'s bytes when the stream has user aggregates: then follow
/// the length of the rkyv `AggState`, the state, the number of user aggregates and each
/// one's groups as Arrow IPC, length first (`u64`s and `u32` little-endian). Without
/// user aggregates the bytes are the `AggState` alone, as before there were any.
const USER_STATE_MAGIC: &[u8; 8] = b"LDBUAGG1";

/// `AggState`'s bytes and the user aggregates' states, from what `save` wrote.
fn split_user_state(bytes: &[u8]) -> Result<(&[u8], Vec<&[u8]>)> {
    let Some(mut rest) = bytes.strip_prefix(USER_STATE_MAGIC.as_slice()) else { return Ok((bytes, Vec::new())) };
    let bad = || Error::checkpoint("restoring aggregate state: the user aggregates' section is cut short");
    let mut take = |n: usize| -> Result<&[u8]> {
        let (head, tail) = rest.split_at_checked(n).ok_or_else(bad)?;
        rest = tail;
        Ok(head)
    };
    let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
    let state = take(len)?;
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let mut users = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
        users.push(take(len)?);
    }
    Ok((state, users))
}

/// Keyed aggregation, optionally over windows, on one shard: every group whose key this
/// shard owns.
pub struct AggOperator {
    plan: Arc<AggPlan>,
    converter: RowConverter,
    /// `(start, end, key)` → group, for tumbling, hopping, cumulating and unwindowed
    /// groups. The table holds group ids; a group's hash is `hashes[g]`, made from its
    /// key's hash (the partitioning's, computed a batch at a time) and its window.
    index: HashTable<u32>,
    hashes: Vec<u64>,
    /// Key → its open sessions.
    sessions: HashMap<Box<[u8]>, Vec<u32>, ahash::RandomState>,
    groups: Vec<Group>,
    free: Vec<u32>,
    /// Open windows by end.
    closing: BTreeSet<(i64, u32)>,
    accs: Vec<Acc>,
    watermark: i64,
    /// Arrival order, the "time" of FIRST/LAST without a window.
    arrivals: i64,
    pub late_rows: u64,
    /// `EMIT EVERY`: groups changed since the last tick, and each group's last emitted row.
    dirty: Vec<u32>,
    last_rows: HashMap<u32, RecordBatch>,
    /// Over a changelog input: each group's rows added minus rows taken back. A group
    /// whose count returns to zero is deleted (`-D`).
    net: Vec<i64>,
    /// Groups made by the batch being applied (freed again if it is refused).
    fresh: Vec<u32>,
    /// Changelog mode, sessions: the rows emitted for sessions the batch being applied
    /// changed, saved before the change, with the change type that takes each back.
    stashed: Vec<(u32, RecordBatch, &'static str)>,
    /// Changelog modes: the final rows of windows that closed (past their lateness)
    /// since `take_closed`; they leave the state but stay queryable (the runtime keeps
    /// them with the stream's retained rows).
    closed: Vec<RecordBatch>,
}

impl AggOperator {
    pub fn new(plan: Arc<AggPlan>) -> Result<AggOperator> {
        let agg = &plan;
        let key_fields = plan.input.fields()[..agg.keys].iter().map(|f| SortField::new(f.data_type().clone()));
        let converter = RowConverter::new(key_fields.collect())?;
        let accs = agg.calls.iter().map(Acc::new).collect::<Result<Vec<_>>>()?;
        let key_types: Vec<DataType> = plan.input.fields()[..agg.keys].iter().map(|f| f.data_type().clone()).collect();
        check_hashable(&key_types)?;
        Ok(AggOperator {
            plan,
            converter,
            index: HashTable::new(),
            hashes: Vec::new(),
            sessions: HashMap::default(),
            groups: Vec::new(),
            free: Vec::new(),
            closing: BTreeSet::new(),
            accs,
            watermark: i64::MIN,
            arrivals: 0,
            late_rows: 0,
            dirty: Vec::new(),
            last_rows: HashMap::new(),
            net: Vec::new(),
            fresh: Vec::new(),
            stashed: Vec::new(),
            closed: Vec::new(),
        })
    }

    fn agg(&self) -> &AggPlan {
        &self.plan
    }

    pub fn group_count(&self) -> usize {
        self.groups.len() - self.free.len()
    }

    fn new_group(&mut self, key: &[u8], start: i64, end: i64) -> u32 {
        let group = Group { key: key.into(), start, end, live: true, emitted: false };
        let g = match self.free.pop() {
            Some(g) => {
                for acc in &mut self.accs {
                    acc.reset(g as usize);
                }
                self.groups[g as usize] = group;
                g
            }
            None => {
                self.groups.push(group);
                let n = self.groups.len();
                for acc in &mut self.accs {
                    acc.resize(n);
                }
                (n - 1) as u32
            }
        };
        if self.agg().window.is_some() {
            self.closing.insert((end, g));
        }
        self.fresh.push(g);
        g
    }

    fn free_group(&mut self, g: u32) {
        self.last_rows.remove(&g);
        self.dirty.retain(|&d| d != g);
        let group = &mut self.groups[g as usize];
        group.live = false;
        let (end, key) = (group.end, group.key.clone());
        self.closing.remove(&(end, g));
        if matches!(self.agg().window, Some(WindowKind::Session { .. })) {
            if let Some(open) = self.sessions.get_mut(&key) {
                open.retain(|&s| s != g);
                if open.is_empty() {
                    self.sessions.remove(&key);
                }
            }
        } else {
            let hash = self.hashes[g as usize];
            if let Ok(entry) = self.index.find_entry(hash, |&x| x == g) {
                entry.remove();
            }
        }
        self.free.push(g);
    }

    fn lateness(&self) -> i64 {
        self.plan.lateness_ms
    }

    /// Folds a batch of branch output into the state. Returns what to emit now: the
    /// changes, in changelog mode; nothing in append mode (windows emit on close).
    pub fn apply(&mut self, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        self.apply_hashed(batch, None)
    }

    /// `apply`, given the rows' key hashes if the batch was partitioned by key on its way
    /// here (`partition::partition_by_key`); computed here otherwise.
    pub fn apply_hashed(&mut self, batch: &RecordBatch, key_hashes: Option<Vec<u64>>) -> Result<Vec<RecordBatch>> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(vec![]);
        }
        let (keys, window) = (self.agg().keys, self.agg().window);
        // Without keys every row is in the one global group (empty key).
        let rows = if keys > 0 { Some(self.converter.convert_columns(&batch.columns()[..keys])?) } else { None };
        let key_hashes = match key_hashes {
            _ if keys == 0 => vec![0; n],
            Some(given) => {
                debug_assert_eq!(given.len(), n, "one key hash per row");
                given
            }
            None => partition::key_hashes(&batch.columns()[..keys], n)?,
        };
        let times: Vec<i64> = match window {
            Some(_) => {
                let t = to_millis(batch.column(keys))?;
                (0..n).map(|i| if t.is_valid(i) { t.value(i) } else { i64::MIN }).collect()
            }
            None => {
                let first = self.arrivals;
                self.arrivals += n as i64;
                (first..first + n as i64).collect()
            }
        };
        let (mut pair_rows, mut pair_groups) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut assigned = Vec::new();
        let lateness = self.lateness();
        let late_before = self.late_rows;
        self.fresh.clear();
        self.stashed.clear();
        let assigned_ok = (|| -> Result<()> {
            for i in 0..n {
                let row = rows.as_ref().map(|r| r.row(i));
                let key: &[u8] = row.as_ref().map_or(&[], |r| r.as_ref());
                match window {
                    None => {
                        let g = self.lookup(key, key_hashes[i], i64::MIN, i64::MAX);
                        pair_rows.push(i as u32);
                        pair_groups.push(g);
                    }
                    Some(_) if times[i] == i64::MIN => self.late_rows += 1, // no event time: cannot be windowed
                    Some(WindowKind::Session { gap }) => match self.session(key, times[i], gap, lateness, &mut pair_groups)? {
                        Some(g) => {
                            pair_rows.push(i as u32);
                            pair_groups.push(g);
                        }
                        None => self.late_rows += 1,
                    },
                    Some(kind) => {
                        assigned.clear();
                        kind.assign(times[i], &mut assigned);
                        let mut placed = false;
                        for &(start, end) in &assigned {
                            if end.saturating_add(lateness) <= self.watermark {
                                continue;
                            }
                            let g = self.lookup(key, key_hashes[i], start, end);
                            pair_rows.push(i as u32);
                            pair_groups.push(g);
                            placed = true;
                        }
                        if !placed {
                            self.late_rows += 1;
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = assigned_ok {
            self.reject(late_before);
            return Err(e);
        }
        let changelog = self.plan.emit == Emit::Changes;
        // Only changelog modes need the set of changed groups (append mode emits on close).
        let mut touched: Vec<u32> = Vec::new();
        if matches!(self.plan.emit, Emit::Changes | Emit::Every(_)) {
            touched = pair_groups.clone();
            touched.sort_unstable();
            touched.dedup();
        }
        // The rows to take back: those of groups emitted before this batch, as they were
        // then. Sessions this batch extended or merged were saved before they changed
        // (`stashed`); every other group is unchanged so far.
        let before = if changelog {
            let stashed = std::mem::take(&mut self.stashed);
            let old: Vec<usize> = touched
                .iter()
                .filter(|&&g| self.groups[g as usize].emitted && !stashed.iter().any(|s| s.0 == g))
                .map(|&g| g as usize)
                .collect();
            Some((self.finish(&old)?, old, stashed))
        } else {
            None
        };
        let agg = &self.plan;
        let signs = agg.retract.map(|col| change_signs(batch.column(col))).transpose()?;
        let values = agg
            .calls
            .iter()
            .map(|call| match &call.user {
                Some(user) => Ok(Values::Columns(user.args.iter().map(|&c| batch.column(c).clone()).collect())),
                None => Values::of(call.arg.map(|c| batch.column(c)), call.domain),
            })
            .collect::<Result<Vec<_>>>()?;
        // A SUM of integers can overflow: those run first, and if one fails, those done
        // are taken back and the batch is refused whole (nothing of it stays).
        let fallible: Vec<usize> = (0..self.accs.len()).filter(|&i| self.accs[i].fallible()).collect();
        let users: Vec<usize> = (0..self.accs.len()).filter(|&i| matches!(self.accs[i], Acc::User(_))).collect();
        let saved: Vec<Vec<bool>> = if fallible.len() > 1 || (!fallible.is_empty() && !users.is_empty()) {
            fallible.iter().map(|&i| self.accs[i].seen_flags(&pair_groups)).collect()
        } else {
            vec![]
        };
        for (k, &i) in fallible.iter().enumerate() {
            let result = match &signs {
                Some(signs) => self.accs[i].update_signed(&values[i], &pair_rows, &pair_groups, signs),
                None => self.accs[i].update(&values[i], &pair_rows, &pair_groups, &times),
            };
            if let Err(e) = result {
                for (j, &done) in fallible[..k].iter().enumerate() {
                    self.accs[done].revert(&values[done], &pair_rows, &pair_groups, signs.as_deref(), &saved[j]);
                }
                self.reject(late_before);
                return Err(e);
            }
        }
        // Then the user's functions (Python may raise): a failure takes the sums back and
        // refuses the batch; the user functions before it in the call list keep its rows.
        for &i in &users {
            if let Err(e) = self.accs[i].update(&values[i], &pair_rows, &pair_groups, &times) {
                for (j, &done) in fallible.iter().enumerate() {
                    self.accs[done].revert(&values[done], &pair_rows, &pair_groups, signs.as_deref(), &saved[j]);
                }
                self.reject(late_before);
                return Err(e);
            }
        }
        for i in (0..self.accs.len()).filter(|i| !fallible.contains(i) && !users.contains(i)) {
            match &signs {
                Some(signs) => self.accs[i].update_signed(&values[i], &pair_rows, &pair_groups, signs)?,
                None => self.accs[i].update(&values[i], &pair_rows, &pair_groups, &times)?,
            }
        }
        // Groups a changelog input has emptied: their row is deleted, the group freed.
        let mut dead: Vec<u32> = Vec::new();
        if let Some(signs) = &signs {
            self.net.resize(self.groups.len(), 0);
            for (&r, &g) in pair_rows.iter().zip(&pair_groups) {
                self.net[g as usize] += signs[r as usize];
            }
            dead = touched.iter().copied().filter(|&g| self.net[g as usize] <= 0).collect();
            touched.retain(|&g| self.net[g as usize] > 0);
        }
        let mut out = Vec::new();
        if matches!(self.plan.emit, Emit::Every(_)) {
            for &g in &touched {
                if !self.groups[g as usize].emitted {
                    self.groups[g as usize].emitted = true; // marks "in the dirty list"
                    self.dirty.push(g);
                }
            }
        }
        if let Some((before, old, stashed)) = before {
            for (_, row, op) in stashed {
                out.push(with_ops(&self.plan.schema, row, |_| op)?);
            }
            let had: Vec<bool> = touched.iter().map(|&g| self.groups[g as usize].emitted).collect();
            let now: Vec<usize> = touched.iter().map(|&g| g as usize).collect();
            let after = self.finish(&now)?;
            // A group a changelog input emptied (net rows back to zero) is deleted.
            let deleted: Vec<bool> = old.iter().map(|&g| signs.is_some() && self.net[g] <= 0).collect();
            let whole = before.num_rows() == old.len();
            out.push(with_ops(&self.plan.schema, before, |i| if whole && deleted[i] { OP_DELETE } else { OP_RETRACT })?);
            // `finish` keeps row order, but HAVING may drop rows: label by group only when
            // no row was dropped, else call every row an update of whatever it replaces.
            let labels: Vec<&str> = if after.num_rows() == now.len() {
                had.iter().map(|&h| if h { OP_UPDATE } else { OP_INSERT }).collect()
            } else {
                vec![OP_UPDATE; after.num_rows()]
            };
            out.push(with_ops(&self.plan.schema, after, |i| labels[i])?);
            for &g in &touched {
                self.groups[g as usize].emitted = true;
            }
        }
        for g in dead {
            self.net[g as usize] = 0;
            self.free_group(g);
        }
        out.retain(|b| b.num_rows() > 0);
        Ok(out)
    }

    /// A batch was refused: the groups it made are freed again and its late rows are not
    /// counted. (Sessions it already extended or merged stay so: see `session`.)
    fn reject(&mut self, late_before: u64) {
        self.late_rows = late_before;
        self.stashed.clear();
        for g in std::mem::take(&mut self.fresh) {
            if self.groups[g as usize].live {
                self.free_group(g);
            }
        }
    }

    /// In changelog mode, keeps the row emitted for session `g` before this batch changes
    /// it (`op` is how it is taken back), once per batch.
    fn stash(&mut self, g: u32, op: &'static str) -> Result<()> {
        if self.plan.emit != Emit::Changes || !self.groups[g as usize].emitted || self.stashed.iter().any(|s| s.0 == g) {
            return Ok(());
        }
        let row = self.finish(&[g as usize])?;
        self.stashed.push((g, row, op));
        Ok(())
    }

    /// The group of `key` (whose hash is `key_hash`) in window `[start, end)`, made if new.
    fn lookup(&mut self, key: &[u8], key_hash: u64, start: i64, end: i64) -> u32 {
        let hash = window_hash(key_hash, start, end);
        let groups = &self.groups;
        let same = |&g: &u32| {
            let group = &groups[g as usize];
            group.start == start && group.end == end && *group.key == *key
        };
        if let Some(&g) = self.index.find(hash, same) {
            return g;
        }
        let g = self.new_group(key, start, end);
        self.index_group(g, hash);
        g
    }

    fn index_group(&mut self, g: u32, hash: u64) {
        if self.hashes.len() < self.groups.len() {
            self.hashes.resize(self.groups.len(), 0);
        }
        self.hashes[g as usize] = hash;
        let hashes = &self.hashes;
        self.index.insert_unique(hash, g, |&g| hashes[g as usize]);
    }

    /// The session `ts` joins (merging sessions it bridges), or `None` when it is too late.
    /// `pair_groups` (this batch's rows' groups so far) follows the merges. In changelog
    /// mode the rows emitted for the sessions it changes are kept first (`stash`), so that
    /// what is taken back is what was emitted: the old bounds and aggregates, and both
    /// sessions of a merge (the absorbed one as `-D`).
    fn session(&mut self, key: &[u8], ts: i64, gap: i64, lateness: i64, pair_groups: &mut [u32]) -> Result<Option<u32>> {
        let (lo, hi) = (ts, ts.saturating_add(gap));
        let open = self.sessions.get(key).cloned().unwrap_or_default();
        let mut hits: Vec<u32> =
            open.into_iter().filter(|&g| self.groups[g as usize].start < hi && lo < self.groups[g as usize].end).collect();
        if hits.is_empty() {
            if hi.saturating_add(lateness) <= self.watermark {
                return Ok(None);
            }
            let g = self.new_group(key, lo, hi);
            self.sessions.entry(key.into()).or_default().push(g);
            return Ok(Some(g));
        }
        hits.sort_by_key(|&g| self.groups[g as usize].start);
        let keep = hits[0];
        let (mut start, mut end) = (lo, hi);
        for &g in &hits {
            start = start.min(self.groups[g as usize].start);
            end = end.max(self.groups[g as usize].end);
        }
        for &g in &hits[1..] {
            if self.accs.iter().any(|acc| acc.merge_overflows(keep as usize, g as usize)) {
                return Err(Error::query("SUM overflowed the BIGINT range (merging two sessions); cast the argument to DOUBLE or DECIMAL to sum larger values"));
            }
        }
        let group = &self.groups[keep as usize];
        if (group.start, group.end) != (start, end) || hits.len() > 1 {
            self.stash(keep, OP_RETRACT)?;
        }
        for &g in &hits[1..] {
            self.stash(g, OP_DELETE)?;
            for acc in &mut self.accs {
                acc.merge(keep as usize, g as usize)?;
            }
            // `EMIT EVERY`: the absorbed session's last emitted row is taken back with the
            // kept one's at the next tick.
            if let Some(old) = self.last_rows.remove(&g) {
                let rows = match self.last_rows.remove(&keep) {
                    Some(mine) => arrow::compute::concat_batches(&mine.schema(), &[mine, old])?,
                    None => old,
                };
                self.last_rows.insert(keep, rows);
            }
            for p in pair_groups.iter_mut().filter(|p| **p == g) {
                *p = keep;
            }
            self.free_group(g);
        }
        let group = &mut self.groups[keep as usize];
        self.closing.remove(&(group.end, keep));
        group.start = start;
        group.end = end;
        self.closing.insert((end, keep));
        Ok(Some(keep))
    }

    /// `EMIT EVERY`: the changes since the last tick — for each changed group a `-U` of the
    /// row last emitted for it (if any) and its new row (`+U`, or `+I` the first time).
    pub fn tick(&mut self) -> Result<Vec<RecordBatch>> {
        let dirty = std::mem::take(&mut self.dirty);
        self.emit_changes(&dirty)
    }

    fn emit_changes(&mut self, groups: &[u32]) -> Result<Vec<RecordBatch>> {
        if groups.is_empty() {
            return Ok(vec![]);
        }
        let mut retract = Vec::new();
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for &g in groups {
            self.groups[g as usize].emitted = false;
            let row = self.finish(&[g as usize])?;
            let old = self.last_rows.remove(&g);
            labels.extend(std::iter::repeat_n(if old.is_some() { OP_UPDATE } else { OP_INSERT }, row.num_rows()));
            if let Some(old) = old {
                retract.push(old);
            }
            if row.num_rows() > 0 {
                self.last_rows.insert(g, row.clone());
            }
            rows.push(row);
        }
        let mut out = Vec::new();
        if !retract.is_empty() {
            let old = arrow::compute::concat_batches(&retract[0].schema(), &retract)?;
            out.push(with_ops(&self.plan.schema, old, |_| OP_RETRACT)?);
        }
        let new = arrow::compute::concat_batches(&rows[0].schema(), &rows)?;
        out.push(with_ops(&self.plan.schema, new, |i| labels[i])?);
        out.retain(|b| b.num_rows() > 0);
        Ok(out)
    }

    /// Moves event time to `watermark`: emits the windows it closes (per the emit mode)
    /// and frees those past their allowed lateness.
    pub fn advance(&mut self, watermark: i64) -> Result<Vec<RecordBatch>> {
        if watermark <= self.watermark {
            return Ok(vec![]);
        }
        self.watermark = watermark;
        let lateness = self.lateness();
        let mut emit = Vec::new();
        let mut expired = Vec::new();
        for &(end, g) in self.closing.iter() {
            if end > watermark {
                break;
            }
            let past = end.saturating_add(lateness) <= watermark;
            let group = &self.groups[g as usize];
            if matches!(self.plan.emit, Emit::AfterWatermark | Emit::OnWindowClose) && past && !group.emitted {
                emit.push(g as usize);
            }
            if past {
                expired.push(g);
            }
        }
        let mut out = if emit.is_empty() { vec![] } else { vec![self.finish(&emit)?] };
        for &g in &emit {
            self.groups[g].emitted = true;
        }
        if matches!(self.plan.emit, Emit::Every(_)) {
            // Changes of expiring windows go out now, before their state is gone.
            let pending: Vec<u32> = expired.iter().copied().filter(|g| self.dirty.contains(g)).collect();
            self.dirty.retain(|g| !pending.contains(g));
            out.extend(self.emit_changes(&pending)?);
        }
        if self.plan.is_changelog() && !expired.is_empty() {
            // The final rows of closed windows stay queryable once their state is gone.
            let done: Vec<usize> = expired.iter().map(|&g| g as usize).collect();
            let rows = self.finish(&done)?;
            if rows.num_rows() > 0 {
                self.closed.push(rows);
            }
        }
        for g in expired {
            self.free_group(g);
        }
        out.retain(|b| b.num_rows() > 0);
        Ok(out)
    }

    /// The final rows of the windows closed since the last call (changelog modes), on the
    /// stream's table schema: the runtime keeps them with the stream's retained rows right
    /// after `advance`, so a checkpoint never finds any here.
    pub fn take_closed(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.closed)
    }

    /// What a checkpoint stores for an indexed group: `start`, `end` (big-endian), key.
    fn index_key(&self, g: u32) -> Vec<u8> {
        let group = &self.groups[g as usize];
        [&group.start.to_be_bytes()[..], &group.end.to_be_bytes()[..], &group.key[..]].concat()
    }

    /// The key columns of `groups`, in the declared types (the row format gives a
    /// dictionary back as its values).
    fn key_columns(&self, groups: impl Iterator<Item = usize>) -> Result<Vec<ArrayRef>> {
        let parser = self.converter.parser();
        let columns = self.converter.convert_rows(groups.map(|g| parser.parse(&self.groups[g].key)))?;
        let fields = self.plan.input.fields();
        let cast = |(c, f): (ArrayRef, &Arc<Field>)| {
            if c.data_type() == f.data_type() { Ok(c) } else { arrow::compute::cast(&c, f.data_type()) }
        };
        Ok(columns.into_iter().zip(fields.iter()).map(cast).collect::<std::result::Result<Vec<_>, _>>()?)
    }

    /// Puts restored groups back into the index, hashing their keys as `apply` does: the
    /// key columns rebuilt from the stored rows, in the declared types.
    fn rebuild_index(&mut self, indexed: &[u32]) -> Result<()> {
        let keys = self.agg().keys;
        let key_hashes = if keys == 0 || indexed.is_empty() {
            vec![0; indexed.len()]
        } else {
            let columns = self.key_columns(indexed.iter().map(|&g| g as usize))?;
            partition::key_hashes(&columns, indexed.len())?
        };
        for (&g, key_hash) in indexed.iter().zip(key_hashes) {
            let group = &self.groups[g as usize];
            let hash = window_hash(key_hash, group.start, group.end);
            self.index_group(g, hash);
        }
        Ok(())
    }

    /// The current row of every live group (the state `SELECT … FROM stream` reads for a
    /// changelog stream), without the change column.
    /// The whole state, for a checkpoint (rkyv; emitted rows kept for `EMIT EVERY` as
    /// Arrow IPC).
    pub fn save(&self) -> Result<Vec<u8>> {
        let mut last_rows = Vec::with_capacity(self.last_rows.len());
        for (g, row) in &self.last_rows {
            last_rows.push((*g, crate::ipc::to_bytes(&row.schema(), std::slice::from_ref(row))?));
        }
        let state = AggState {
            index: self.index.iter().map(|&g| (self.index_key(g), g)).collect(),
            sessions: self.sessions.iter().map(|(k, s)| (k.to_vec(), s.clone())).collect(),
            groups: self.groups.clone(),
            free: self.free.clone(),
            closing: self.closing.iter().copied().collect(),
            accs: self.accs.clone(),
            watermark: self.watermark,
            arrivals: self.arrivals,
            late_rows: self.late_rows,
            dirty: self.dirty.clone(),
            last_rows,
            net: self.net.clone(),
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&state).map_err(|e| Error::internal(format!("saving aggregate state: {e}")))?;
        let users = self
            .accs
            .iter()
            .filter_map(|acc| match acc {
                Acc::User(user) => Some(user.lock().save()),
                _ => None,
            })
            .collect::<Result<Vec<_>>>()?;
        if users.is_empty() {
            return Ok(bytes.into_vec());
        }
        let mut out = Vec::with_capacity(bytes.len() + 24 + users.iter().map(|u| u.len() + 8).sum::<usize>());
        out.extend_from_slice(USER_STATE_MAGIC);
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
        out.extend_from_slice(&(users.len() as u32).to_le_bytes());
        for user in users {
            out.extend_from_slice(&(user.len() as u64).to_le_bytes());
            out.extend_from_slice(&user);
        }
        Ok(out)
    }

    /// The operator of `plan` with the state `save` wrote.
    pub fn restore(plan: Arc<AggPlan>, bytes: &[u8]) -> Result<AggOperator> {
        let mut op = AggOperator::new(plan)?;
        let (bytes, users) = split_user_state(bytes)?;
        let state: AggState = crate::checkpoint::load_state(bytes, "aggregate state")?;
        if state.accs.len() != op.accs.len() {
            return Err(Error::internal("restoring aggregate state: the stream's aggregates changed"));
        }
        op.sessions = state.sessions.into_iter().map(|(k, s)| (k.into_boxed_slice(), s)).collect();
        op.groups = state.groups;
        op.free = state.free;
        op.closing = state.closing.into_iter().collect();
        op.accs = state.accs;
        let mut users = users.into_iter();
        for (acc, call) in op.accs.iter_mut().zip(&op.plan.calls) {
            if let Some(user) = &call.user {
                let bytes = users.next().ok_or_else(|| Error::internal("restoring aggregate state: a user aggregate's state is missing"))?;
                *acc = Acc::User(Arc::new(parking_lot::Mutex::new(crate::stream::user_agg::UserAcc::restore(user, bytes)?)));
            }
        }
        op.watermark = state.watermark;
        op.arrivals = state.arrivals;
        op.late_rows = state.late_rows;
        op.dirty = state.dirty;
        for (g, row) in state.last_rows {
            if let Some(row) = crate::ipc::read(&row)?.pop() {
                op.last_rows.insert(g, row);
            }
        }
        op.net = state.net;
        let indexed: Vec<u32> = state.index.iter().map(|&(_, g)| g).collect();
        op.rebuild_index(&indexed)?;
        Ok(op)
    }

    /// A global aggregate (no keys, no window) that holds no row yet reads as SQL's one
    /// row over no input (COUNT 0, SUM NULL, through HAVING), as the same query ad hoc
    /// does; `None` otherwise. Its one group lives on shard 0, so only shard 0 asks.
    pub fn empty_global_row(&self) -> Result<Option<RecordBatch>> {
        let agg = self.agg();
        if agg.keys > 0 || agg.window.is_some() || self.group_count() > 0 {
            return Ok(None);
        }
        let mut empty = AggOperator::new(self.plan.clone())?;
        let g = empty.new_group(&[], i64::MIN, i64::MAX);
        Ok(Some(empty.finish(&[g as usize])?))
    }

    pub fn snapshot(&self) -> Result<RecordBatch> {
        let live: Vec<usize> = (0..self.groups.len()).filter(|&g| self.groups[g].live).collect();
        self.finish(&live)
    }

    /// The aggregate rows of `groups`, through HAVING and the SELECT list.
    fn finish(&self, groups: &[usize]) -> Result<RecordBatch> {
        let agg = self.agg();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(agg.agg_schema.fields().len());
        let keys = if agg.keys > 0 { self.key_columns(groups.iter().copied())? } else { vec![] };
        for col in &agg.layout {
            columns.push(match *col {
                GroupCol::Key(k) => keys[k].clone(),
                GroupCol::WindowStart => from_millis(groups.iter().map(|&g| self.groups[g].start).collect(), &agg.window_type)?,
                GroupCol::WindowEnd => from_millis(groups.iter().map(|&g| self.groups[g].end).collect(), &agg.window_type)?,
            });
        }
        for (acc, call) in self.accs.iter().zip(&agg.calls) {
            columns.push(acc.evaluate(groups, &call.out_type)?);
        }
        let batch = RecordBatch::try_new_with_options(
            agg.agg_schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(groups.len())),
        )?;
        let batch = match &agg.having {
            Some(h) => {
                let mask = h.evaluate(&batch)?.into_array(batch.num_rows())?;
                let mask: &BooleanArray =
                    mask.as_boolean_opt().ok_or_else(|| Error::query("HAVING must be boolean"))?;
                filter_record_batch(&batch, mask)?
            }
            None => batch,
        };
        let schema = if self.plan.is_changelog() { without_last(&self.plan.schema) } else { self.plan.schema.clone() };
        project(&agg.output, &schema, &batch)
    }
}

fn without_last(schema: &SchemaRef) -> SchemaRef {
    let fields = schema.fields();
    Arc::new(Schema::new(fields[..fields.len() - 1].to_vec()))
}

/// Appends the change column to `batch`.
fn with_ops<'a>(schema: &SchemaRef, batch: RecordBatch, op: impl Fn(usize) -> &'a str) -> Result<RecordBatch> {
    let ops: StringArray = (0..batch.num_rows()).map(|i| Some(op(i))).collect();
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(ops));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

/// Fails for group key types DataFusion cannot hash. Groups are found by the
/// partitioning's hash of their key (`partition::key_hashes`, which rows routed by key
/// arrive with). A shard holds only the keys whose hash falls in its range, so those
/// hashes are not spread over all values: `window_hash` mixes them before they index
/// anything.
fn check_hashable(types: &[DataType]) -> Result<()> {
    let empty: Vec<ArrayRef> = types.iter().map(arrow::array::new_empty_array).collect();
    partition::key_hashes(&empty, 0).map_err(|e| Error::unsupported(format!("GROUP BY over these key types ({types:?}): {e}")))?;
    Ok(())
}

/// The index hash of a group: its key's hash mixed with its window (a folded multiply,
/// so that windows of one key spread over the table).
fn window_hash(key_hash: u64, start: i64, end: i64) -> u64 {
    let x = key_hash ^ (start as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (end as u64).rotate_left(32);
    let m = x as u128 * 0xa076_1d64_78bd_642f_u128;
    (m as u64) ^ ((m >> 64) as u64)
}

impl OperatorSpec for AggPlan {
    fn name(&self) -> &'static str {
        "aggregate"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(AggOperator::new(self)?))
    }

    fn changelog(&self) -> bool {
        self.is_changelog()
    }

    fn uses_watermarks(&self) -> bool {
        self.window.is_some()
    }

    fn tick_ms(&self) -> Option<i64> {
        match self.emit {
            Emit::Every(ms) => Some(ms),
            _ => None,
        }
    }
}

impl Operator for AggOperator {
    fn process(&mut self, _port: usize, batch: &RecordBatch, hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        out.rows.extend(self.apply_hashed(batch, hashes)?);
        Ok(())
    }

    fn on_watermark(&mut self, mark: Watermark, out: &mut Collector) -> Result<()> {
        let emitted = self.advance(mark.ms());
        // A changelog's closed windows leave the state; their final rows stay queryable
        // as the stream's retained rows.
        out.retired.extend(self.take_closed());
        out.rows.extend(emitted?);
        Ok(())
    }

    fn on_tick(&mut self, out: &mut Collector) -> Result<()> {
        out.rows.extend(self.tick()?);
        Ok(())
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        AggOperator::save(self).map(Some)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        *self = AggOperator::restore(self.plan.clone(), bytes)?;
        Ok(())
    }

    fn scan(&self, global: bool) -> Result<Option<Vec<RecordBatch>>> {
        if !self.plan.is_changelog() {
            return Ok(None);
        }
        let mut rows = vec![self.snapshot()?];
        // The global group of an aggregate without keys lives on one shard.
        if global {
            rows.extend(self.empty_global_row()?);
        }
        Ok(Some(rows))
    }

    fn late_rows(&self) -> u64 {
        self.late_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{AggCall, AggKind, Domain};
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::DataType;
    use datafusion::physical_expr::expressions::Column;

    /// `SELECT v + 1 AS w FROM t WHERE v > 10` over `[v: Int64]`: every row passing (taken
    /// as is), some (filtered) and none (the output's empty batch).
    #[test]
    fn filter_then_project_whether_all_some_or_no_rows_pass() {
        use datafusion::logical_expr::Operator;
        use datafusion::physical_expr::expressions::{binary, lit};
        let input = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let v: PhysExpr = Arc::new(Column::new("v", 0));
        let filter = binary(v.clone(), Operator::Gt, lit(10i64), &input).unwrap();
        let plus_one = binary(v, Operator::Plus, lit(1i64), &input).unwrap();
        let out = Arc::new(Schema::new(vec![Field::new("w", DataType::Int64, true)]));
        let run = |values: Vec<i64>| {
            let batch = RecordBatch::try_new(input.clone(), vec![Arc::new(Int64Array::from(values))]).unwrap();
            let got = eval_branch(Some(&filter), std::slice::from_ref(&plus_one), &out, &batch).unwrap();
            assert_eq!(got.schema(), out);
            got.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
        };
        assert_eq!(run(vec![11, 20]), vec![12, 21]);
        assert_eq!(run(vec![11]), vec![12]);
        assert_eq!(run(vec![5, 11, 7, 30]), vec![12, 31]);
        assert_eq!(run(vec![1, 2]), Vec::<i64>::new());
    }

    /// `SELECT k, window_start, window_end, COUNT(*), SUM(v) … GROUP BY k, <window>` over
    /// branch rows `[k: Utf8, ts: Int64, v: Int64]`.
    fn plan(window: Option<WindowKind>, emit: Emit, lateness_ms: i64) -> Arc<AggPlan> {
        plan_keyed(window, emit, lateness_ms, DataType::Utf8)
    }

    /// [`plan`] with `k` of type `key_type`.
    fn plan_keyed(window: Option<WindowKind>, emit: Emit, lateness_ms: i64, key_type: DataType) -> Arc<AggPlan> {
        let branch_schema = Arc::new(Schema::new(vec![
            Field::new("k", key_type.clone(), true),
            Field::new("ts", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let mut agg_fields = vec![Field::new("k", key_type, true)];
        let mut layout = vec![GroupCol::Key(0)];
        if window.is_some() {
            agg_fields.push(Field::new("window_start", DataType::Int64, true));
            agg_fields.push(Field::new("window_end", DataType::Int64, true));
            layout.extend([GroupCol::WindowStart, GroupCol::WindowEnd]);
        }
        agg_fields.push(Field::new("n", DataType::Int64, true));
        agg_fields.push(Field::new("s", DataType::Int64, true));
        let agg_schema = Arc::new(Schema::new(agg_fields.clone()));
        let output: Vec<PhysExpr> =
            agg_fields.iter().enumerate().map(|(i, f)| Arc::new(Column::new(f.name(), i)) as PhysExpr).collect();
        let mut out_fields = agg_fields.clone();
        if matches!(emit, Emit::Changes | Emit::Every(_)) {
            out_fields.push(Field::new(super::super::OP_COLUMN, DataType::Utf8, false));
        }
        let calls = vec![
            AggCall { kind: AggKind::Count, arg: None, domain: Domain::Int, out_type: DataType::Int64, user: None },
            AggCall { kind: AggKind::Sum, arg: Some(2), domain: Domain::Int, out_type: DataType::Int64, user: None },
        ];
        Arc::new(AggPlan {
            input: branch_schema,
            keys: 1,
            window,
            window_type: DataType::Int64,
            calls,
            agg_schema,
            layout,
            having: None,
            output,
            retract: None,
            emit,
            lateness_ms,
            schema: Arc::new(Schema::new(out_fields)),
        })
    }

    fn rows(k: &[&str], ts: &[i64], v: &[i64]) -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            ("k", Arc::new(StringArray::from(k.to_vec())) as ArrayRef),
            ("ts", Arc::new(Int64Array::from(ts.to_vec())) as ArrayRef),
            ("v", Arc::new(Int64Array::from(v.to_vec())) as ArrayRef),
        ])
        .unwrap()
    }

    /// Every emitted row as text, sorted.
    fn text(batches: &[RecordBatch]) -> Vec<String> {
        let mut out = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                    .collect();
                out.push(cells.join(","));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn tumbling_windows_emit_once_when_the_watermark_passes_their_end() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Tumble { size: 1000 }), Emit::AfterWatermark, 0)).unwrap();
        assert!(op.apply(&rows(&["a", "a", "b"], &[100, 900, 1500], &[1, 2, 4])).unwrap().is_empty());
        assert!(op.advance(999).unwrap().is_empty());
        assert_eq!(text(&op.advance(1000).unwrap()), vec!["a,0,1000,2,3"]);
        assert!(op.advance(1500).unwrap().is_empty(), "a window is emitted once");
        // A row for the closed window is late: dropped and counted.
        assert!(op.apply(&rows(&["a"], &[10], &[8])).unwrap().is_empty());
        assert_eq!(op.late_rows, 1);
        assert_eq!(text(&op.advance(i64::MAX).unwrap()), vec!["b,1000,2000,1,4"]);
        assert_eq!(op.group_count(), 0, "closed windows free their state");
    }

    #[test]
    fn a_row_bridging_two_sessions_merges_them() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Session { gap: 100 }), Emit::AfterWatermark, 0)).unwrap();
        op.apply(&rows(&["a", "a"], &[0, 150], &[1, 2])).unwrap();
        assert_eq!(op.group_count(), 2);
        op.apply(&rows(&["a"], &[80], &[4])).unwrap(); // within 100 of both
        assert_eq!(op.group_count(), 1);
        assert_eq!(text(&op.advance(i64::MAX).unwrap()), vec!["a,0,250,3,7"]);
    }

    /// Every emitted row folded into the current state: `+I`/`+U` add a row, `-U`/`-D`
    /// take back one equal row, which must be there.
    fn fold(batches: &[RecordBatch]) -> Vec<String> {
        let mut state: Vec<String> = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                let cells: Vec<String> =
                    b.columns().iter().map(|c| arrow::util::display::array_value_to_string(c, r).unwrap()).collect();
                let (row, op) = (cells[..cells.len() - 1].join(","), cells[cells.len() - 1].clone());
                if op.starts_with('+') {
                    state.push(row);
                } else {
                    let at = state.iter().position(|s| *s == row).unwrap_or_else(|| panic!("{op} of {row}, never emitted: {state:?}"));
                    state.remove(at);
                }
            }
        }
        state.sort();
        state
    }

    /// A row extending an emitted session takes back the row emitted before, with its
    /// old bounds and aggregates (it used to carry the new bounds, leaving the old row
    /// standing downstream); a row bridging two sessions takes back both.
    #[test]
    fn session_changes_retract_exactly_the_rows_emitted_before() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Session { gap: 100 }), Emit::Changes, 0)).unwrap();
        let mut all = Vec::new();
        let first = op.apply(&rows(&["a", "a"], &[0, 150], &[1, 2])).unwrap();
        assert_eq!(text(&first), vec!["a,0,100,1,1,+I", "a,150,250,1,2,+I"]);
        all.extend(first);
        // Extends [150, 250) to [150, 300).
        let extend = op.apply(&rows(&["a"], &[200], &[3])).unwrap();
        assert_eq!(text(&extend), vec!["a,150,250,1,2,-U", "a,150,300,2,5,+U"]);
        all.extend(extend);
        // Bridges [0, 100) and [150, 300): both rows are taken back, one merged row added.
        let bridge = op.apply(&rows(&["a"], &[90], &[4])).unwrap();
        assert_eq!(text(&bridge), vec!["a,0,100,1,1,-U", "a,0,300,4,10,+U", "a,150,300,2,5,-D"]);
        all.extend(bridge);
        assert_eq!(fold(&all), vec!["a,0,300,4,10"]);
        assert_eq!(text(&[op.snapshot().unwrap()]), vec!["a,0,300,4,10"]);
    }

    /// In one batch: a row opens a session, a later row extends it, another bridges it
    /// with an emitted one. Every row counts once, in the merged session.
    #[test]
    fn rows_of_a_session_merged_later_in_the_same_batch_are_kept() {
        for emit in [Emit::Changes, Emit::AfterWatermark] {
            let mut op = AggOperator::new(plan(Some(WindowKind::Session { gap: 100 }), emit, 0)).unwrap();
            let mut all = op.apply(&rows(&["a"], &[0], &[1])).unwrap();
            // 200 opens a session, 150 extends it back, 90 bridges it with [0, 100).
            all.extend(op.apply(&rows(&["a", "a", "a"], &[200, 150, 90], &[2, 3, 4])).unwrap());
            assert_eq!(op.group_count(), 1, "{emit:?}");
            all.extend(op.advance(i64::MAX).unwrap());
            match emit {
                Emit::Changes => assert_eq!(fold(&all), vec!["a,0,300,4,10"]),
                _ => assert_eq!(text(&all), vec!["a,0,300,4,10"]),
            }
        }
    }

    /// `EMIT EVERY`: a tick after two emitted sessions merged takes both back.
    #[test]
    fn emit_every_takes_back_both_rows_of_merged_sessions() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Session { gap: 100 }), Emit::Every(1000), 0)).unwrap();
        op.apply(&rows(&["a", "a"], &[0, 150], &[1, 2])).unwrap();
        let mut all = op.tick().unwrap();
        op.apply(&rows(&["a"], &[90], &[4])).unwrap();
        let tick = op.tick().unwrap();
        assert_eq!(text(&tick), vec!["a,0,100,1,1,-U", "a,0,250,3,7,+U", "a,150,250,1,2,-U"]);
        all.extend(tick);
        assert_eq!(fold(&all), vec!["a,0,250,3,7"]);
    }

    /// Changelog windows that close leave the state, and their final rows come out of
    /// `take_closed` (to be kept queryable); open ones stay in the snapshot.
    #[test]
    fn closed_changelog_windows_hand_over_their_final_rows() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Tumble { size: 1000 }), Emit::Changes, 0)).unwrap();
        op.apply(&rows(&["a", "a", "b"], &[100, 900, 1500], &[1, 2, 4])).unwrap();
        assert!(op.take_closed().is_empty());
        op.advance(1000).unwrap();
        assert_eq!(text(&op.take_closed()), vec!["a,0,1000,2,3"]);
        assert_eq!(text(&[op.snapshot().unwrap()]), vec!["b,1000,2000,1,4"]);
        assert!(op.take_closed().is_empty(), "handed over once");
    }

    /// Two sessions whose SUMs together leave the BIGINT range cannot merge: the bridging
    /// batch fails before anything merges, and both sessions stay as they were.
    #[test]
    fn sessions_whose_sums_would_overflow_do_not_merge() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Session { gap: 100 }), Emit::AfterWatermark, 0)).unwrap();
        op.apply(&rows(&["a", "a"], &[0, 150], &[i64::MAX - 1, 5])).unwrap();
        let err = op.apply(&rows(&["b", "a"], &[0, 90], &[1, 0])).unwrap_err();
        assert!(err.to_string().contains("SUM overflowed the BIGINT range"), "{err}");
        assert_eq!(op.group_count(), 2, "no merge, and b's new session is gone");
        assert_eq!(text(&op.advance(i64::MAX).unwrap()), vec![format!("a,0,100,1,{}", i64::MAX - 1), "a,150,250,1,5".to_string()]);
    }

    /// A global aggregate with no row yet reads as one row over no input, as ad hoc;
    /// one with rows, or a keyed one, has no such row.
    #[test]
    fn a_global_aggregate_without_rows_reads_as_one_row_over_no_input() {
        let mut p = plan(None, Emit::Changes, 0);
        let agg = Arc::get_mut(&mut p).unwrap();
        agg.keys = 0;
        agg.layout.clear();
        let fields: Vec<Field> = agg.agg_schema.fields()[1..].iter().map(|f| f.as_ref().clone()).collect();
        agg.agg_schema = Arc::new(Schema::new(fields.clone()));
        agg.output = fields.iter().enumerate().map(|(i, f)| Arc::new(Column::new(f.name(), i)) as PhysExpr).collect();
        let mut out_fields = fields;
        out_fields.push(Field::new(super::super::OP_COLUMN, DataType::Utf8, false));
        agg.schema = Arc::new(Schema::new(out_fields));
        agg.input = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        agg.calls[1].arg = Some(0);
        let mut op = AggOperator::new(p).unwrap();
        assert_eq!(text(&[op.empty_global_row().unwrap().unwrap()]), vec!["0,"]);
        let batch = RecordBatch::try_from_iter(vec![("v", Arc::new(Int64Array::from(vec![4])) as ArrayRef)]).unwrap();
        op.apply(&batch).unwrap();
        assert!(op.empty_global_row().unwrap().is_none());
        let keyed = AggOperator::new(plan(None, Emit::Changes, 0)).unwrap();
        assert!(keyed.empty_global_row().unwrap().is_none());
    }

    /// A SUM of BIGINT leaving the range fails the batch whole: nothing of it stays (no
    /// group made, no other aggregate updated), and the state goes on from before it.
    #[test]
    fn an_overflowing_sum_refuses_the_batch_and_keeps_the_state() {
        for emit in [Emit::Changes, Emit::AfterWatermark] {
            let mut op = AggOperator::new(plan(Some(WindowKind::Tumble { size: 1000 }), emit, 0)).unwrap();
            op.apply(&rows(&["a"], &[0], &[i64::MAX - 1])).unwrap();
            let err = op.apply(&rows(&["b", "a", "c"], &[0, 10, 20], &[5, 2, 6])).unwrap_err();
            assert!(err.to_string().contains("SUM overflowed the BIGINT range"), "{err}");
            assert_eq!(op.group_count(), 1, "the refused batch's groups are gone");
            op.apply(&rows(&["a", "b"], &[10, 10], &[1, 5])).unwrap();
            let out = op.advance(i64::MAX).unwrap();
            let got = if emit == Emit::Changes { text(&op.take_closed()) } else { text(&out) };
            assert_eq!(got, vec![format!("a,0,1000,2,{}", i64::MAX), "b,0,1000,1,5".to_string()], "{emit:?}");
        }
    }

    #[test]
    fn changelog_retracts_the_previous_row_of_a_key() {
        let mut op = AggOperator::new(plan(None, Emit::Changes, 0)).unwrap();
        assert_eq!(text(&op.apply(&rows(&["a"], &[0], &[5])).unwrap()), vec!["a,1,5,+I"]);
        assert_eq!(text(&op.apply(&rows(&["a", "b"], &[0, 0], &[1, 7])).unwrap()), vec!["a,1,5,-U", "a,2,6,+U", "b,1,7,+I"]);
        assert_eq!(text(&[op.snapshot().unwrap()]), vec!["a,2,6", "b,1,7"]);
    }

    #[test]
    fn allowed_lateness_keeps_a_window_open_past_its_end() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Tumble { size: 1000 }), Emit::AfterWatermark, 500)).unwrap();
        op.apply(&rows(&["a"], &[100], &[1])).unwrap();
        assert!(op.advance(1200).unwrap().is_empty());
        op.apply(&rows(&["a"], &[200], &[2])).unwrap(); // late, but within lateness
        assert_eq!(op.late_rows, 0);
        assert_eq!(text(&op.advance(1500).unwrap()), vec!["a,0,1000,2,3"]);
    }

    /// An operator saved at any point and restored produces exactly what the original does
    /// from there on: for every window kind, in append and changelog mode.
    #[test]
    fn saved_and_restored_state_continues_identically() {
        let windows = [
            None,
            Some(WindowKind::Tumble { size: 1000 }),
            Some(WindowKind::Hop { size: 1000, slide: 500 }),
            Some(WindowKind::Session { gap: 100 }),
        ];
        let before = [rows(&["a", "b", "a"], &[0, 150, 900], &[1, 2, 3]), rows(&["a", "c"], &[80, 1100], &[4, 5])];
        let after = [rows(&["a", "b"], &[1200, 1210], &[6, 7]), rows(&["c", "a"], &[1150, 2500], &[8, 9])];
        for window in windows {
            for emit in [Emit::AfterWatermark, Emit::Changes] {
                let p = plan(window, emit, 0);
                let mut original = AggOperator::new(p.clone()).unwrap();
                for b in &before {
                    original.apply(b).unwrap();
                }
                original.advance(1000).unwrap();
                let mut restored = AggOperator::restore(p, &original.save().unwrap()).unwrap();
                let run = |op: &mut AggOperator| {
                    let mut out = Vec::new();
                    for b in &after {
                        out.extend(op.apply(b).unwrap());
                    }
                    out.extend(op.advance(i64::MAX).unwrap());
                    (text(&out), text(&[op.snapshot().unwrap()]), op.late_rows)
                };
                assert_eq!(run(&mut original), run(&mut restored), "{window:?} {emit:?}");
            }
        }
    }

    /// Many groups (the index grows and rehashes), windows closing and their groups
    /// reused: every group's count is exact and nothing is left behind.
    #[test]
    fn ten_thousand_keys_over_three_windows_each_count_exactly() {
        let mut op = AggOperator::new(plan(Some(WindowKind::Tumble { size: 1000 }), Emit::AfterWatermark, 0)).unwrap();
        let keys: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
        for window in 0..3i64 {
            // Each key twice in its window, in two batches, with values 1 and 2.
            for v in [1, 2] {
                let k: Vec<&str> = keys.iter().map(String::as_str).collect();
                let ts = vec![window * 1000 + v * 100; k.len()];
                op.apply(&rows(&k, &ts, &vec![v; k.len()])).unwrap();
            }
            assert_eq!(op.group_count(), 10_000);
            let out = op.advance(window * 1000 + 1000).unwrap();
            let got = text(&out);
            assert_eq!(got.len(), 10_000);
            let (start, end) = (window * 1000, window * 1000 + 1000);
            assert!(got.iter().all(|r| r.ends_with(&format!(",{start},{end},2,3"))), "{:?}", &got[..3]);
            assert_eq!(op.group_count(), 0);
        }
    }

    /// A restored operator finds the groups of still-open windows whatever the key's type:
    /// a dictionary key comes back from its stored rows as plain text and is hashed as
    /// the dictionary column of a new batch is.
    #[test]
    fn restored_groups_of_a_dictionary_key_are_found_again() {
        use arrow::array::DictionaryArray;
        use arrow::datatypes::Int32Type;
        let key_type = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let p = plan_keyed(Some(WindowKind::Tumble { size: 1000 }), Emit::AfterWatermark, 0, key_type);
        let batch = |k: &[&str], ts: &[i64], v: &[i64]| {
            let k: DictionaryArray<Int32Type> = k.iter().copied().collect();
            RecordBatch::try_from_iter(vec![
                ("k", Arc::new(k) as ArrayRef),
                ("ts", Arc::new(Int64Array::from(ts.to_vec())) as ArrayRef),
                ("v", Arc::new(Int64Array::from(v.to_vec())) as ArrayRef),
            ])
            .unwrap()
        };
        let mut original = AggOperator::new(p.clone()).unwrap();
        original.apply(&batch(&["a", "b", "a"], &[0, 100, 200], &[1, 2, 3])).unwrap();
        original.advance(500).unwrap();
        let mut restored = AggOperator::restore(p, &original.save().unwrap()).unwrap();
        restored.apply(&batch(&["b", "a"], &[300, 400], &[4, 5])).unwrap();
        assert_eq!(restored.group_count(), 2, "the restored groups are found, not made again");
        assert_eq!(text(&restored.advance(1000).unwrap()), vec!["a,0,1000,3,9", "b,0,1000,2,6"]);
    }
}
