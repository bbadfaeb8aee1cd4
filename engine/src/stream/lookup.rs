//! The lookup join: each row of a stream joins the rows of a lookup table
//! ([`crate::lookup`]) with its key, as the table is when the row is processed.
//!
//! The stream's rows stay on their shard (no exchange: the table is the same from every
//! shard). Each batch's keys that the shard's cache does not hold, or holds from longer
//! ago than `cache.ttl`, are fetched in one [`LookupSource::fetch`]; what comes back is
//! cached per key (a key without rows too, so a miss is not asked again within the TTL),
//! oldest entries evicted beyond `cache.max_rows`. A fetch blocks the shard for its round
//! trip; a fetch that fails rejects the batch's rows (counted in the stream's
//! `rejected_rows`, with the error) and the stream goes on. The cache is not part of
//! checkpoints: after a restart it fills again.
//!
//! INNER: a row without a match goes nowhere; LEFT: it goes out once, padded with NULLs.
//! The residual (`ON` conditions beyond the key equalities) decides a match, then the
//! `SELECT` list runs over the joined rows, which keep the stream's row order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array};
use arrow::compute::{interleave, take};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};

use super::isolate::Rejected;
use super::op::eval_branch;
use super::time::now_ms;
use super::JoinPlan;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo};
use crate::error::Result;
use crate::lookup::{CacheBounds, LookupSource};

/// A stream joining a lookup table.
#[derive(Debug)]
pub struct LookupPlan {
    /// The keys (the stream side's branch output starts with them), residual, joined row
    /// and `SELECT` list, as for a stream join.
    pub join: JoinPlan,
    /// The lookup table's name (what the stream reads besides its inputs).
    pub table: String,
    pub source: Arc<dyn LookupSource>,
    /// The table's key columns, in the keys' order.
    pub key_columns: Vec<usize>,
    /// The stream is the joined row's left side (else the right: `FROM table JOIN stream`).
    pub stream_left: bool,
    /// A stream row without a match goes out padded with NULLs (`LEFT JOIN`).
    pub outer: bool,
    pub cache: CacheBounds,
}

/// A cached key's rows: rows `rows` of slab batch `slab`, fetched at `at`.
struct Entry {
    slab: u32,
    rows: Vec<u32>,
    at: i64,
    generation: u64,
}

pub struct LookupOperator {
    plan: Arc<LookupPlan>,
    converter: RowConverter,
    cache: HashMap<Box<[u8]>, Entry, ahash::RandomState>,
    /// Cache entries by age: (fetched at, generation, key); an entry refetched since has a
    /// newer generation and its old place here is skipped.
    order: VecDeque<(i64, u64, Box<[u8]>)>,
    /// Fetched batches and how many entries point into each.
    slabs: HashMap<u32, (RecordBatch, usize)>,
    next_slab: u32,
    next_generation: u64,
    /// Keys plus rows cached (a key without rows counts one).
    cached: usize,
    /// One all-NULL row of the table (LEFT padding).
    nulls: RecordBatch,
}

impl LookupOperator {
    pub fn new(plan: Arc<LookupPlan>) -> Result<LookupOperator> {
        let converter = RowConverter::new(plan.join.key_types.iter().map(|t| SortField::new(t.clone())).collect())?;
        let schema = plan.source.schema();
        let columns = schema.fields().iter().map(|f| new_null_array(f.data_type(), 1)).collect();
        let nulls = RecordBatch::try_new_with_options(
            Arc::new(arrow::datatypes::Schema::new(
                schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
            )),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(1)),
        )?;
        Ok(LookupOperator {
            plan,
            converter,
            cache: HashMap::default(),
            order: VecDeque::new(),
            slabs: HashMap::new(),
            next_slab: 0,
            next_generation: 0,
            cached: 0,
            nulls,
        })
    }

    /// Keys plus rows in the cache.
    pub fn cached_rows(&self) -> usize {
        self.cached
    }

    /// The keys of `columns` (the table's key columns cast to the compared types) as rows.
    fn table_keys(&self, batch: &RecordBatch) -> Result<Rows> {
        let columns = self
            .plan
            .key_columns
            .iter()
            .zip(&self.plan.join.key_types)
            .map(|(&c, t)| {
                let a = batch.column(c);
                if a.data_type() == t { Ok(a.clone()) } else { arrow::compute::cast(a, t) }
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        Ok(self.converter.convert_columns(&columns)?)
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(entry) = self.cache.remove(key) {
            self.cached -= entry.rows.len().max(1);
            if let Some(slab) = self.slabs.get_mut(&entry.slab) {
                slab.1 -= 1;
                if slab.1 == 0 {
                    self.slabs.remove(&entry.slab);
                }
            }
        }
    }

    /// Drops entries older than the TTL, then the oldest beyond the row bound.
    fn evict(&mut self, now: i64) {
        let stale = now.saturating_sub(self.plan.cache.ttl_ms);
        while let Some((at, generation, _)) = self.order.front() {
            let (at, generation) = (*at, *generation);
            if at > stale && self.cached <= self.plan.cache.max_rows {
                break;
            }
            let (_, _, key) = self.order.pop_front().expect("front exists");
            if self.cache.get(&key).is_some_and(|e| e.generation == generation) {
                self.remove(&key);
            }
        }
    }

    /// Fetches the keys of `batch`'s rows `rows` (distinct keys); returns the fetched
    /// batch and each key's rows in it.
    fn fetch(&self, batch: &RecordBatch, rows: &[usize]) -> Result<(RecordBatch, HashMap<Box<[u8]>, Vec<u32>, ahash::RandomState>)> {
        let keys = self.plan.join.keys;
        let indices = UInt32Array::from(rows.iter().map(|&r| r as u32).collect::<Vec<_>>());
        let columns: Vec<ArrayRef> = batch.columns()[..keys].iter().map(|c| take(c, &indices, None)).collect::<Result<_, _>>()?;
        let fields: Vec<_> = batch.schema().fields()[..keys].iter().cloned().collect();
        let key_batch = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)?;
        let fetched = self.plan.source.fetch(&self.plan.key_columns, &key_batch)?;
        let found = self.table_keys(&fetched)?;
        let mut by_key: HashMap<Box<[u8]>, Vec<u32>, ahash::RandomState> = HashMap::default();
        for (row, key) in found.iter().enumerate() {
            by_key.entry(key.as_ref().into()).or_default().push(row as u32);
        }
        Ok((fetched, by_key))
    }

    /// The joined rows of `batch` (the stream side's branch output, keys first).
    fn apply(&mut self, batch: &RecordBatch, out: &mut Collector) -> Result<()> {
        let now = now_ms();
        let keys = self.plan.join.keys;
        let key_columns: Vec<ArrayRef> = batch.columns()[..keys].to_vec();
        let rows = self.converter.convert_columns(&key_columns)?;
        let valid: Vec<bool> = (0..batch.num_rows()).map(|r| key_columns.iter().all(|c| c.is_valid(r))).collect();
        let use_cache = self.plan.source.cached();
        let stale = now.saturating_sub(self.plan.cache.ttl_ms);
        // The first row of each key to fetch.
        let mut missing: Vec<usize> = Vec::new();
        let mut asked: HashMap<&[u8], (), ahash::RandomState> = HashMap::default();
        for (r, key) in rows.iter().enumerate() {
            let fresh = use_cache && self.cache.get(key.as_ref()).is_some_and(|e| e.at > stale);
            if valid[r] && !fresh && asked.insert(key.data(), ()).is_none() {
                missing.push(r);
            }
        }
        // Batches the pairs point into: slot 0 is the NULL row, slot 1 this fetch's rows.
        let mut used: Vec<RecordBatch> = vec![self.nulls.clone()];
        let mut fetched_rows = HashMap::default();
        if !missing.is_empty() {
            let (fetched, by_key) = match self.fetch(batch, &missing) {
                Ok(f) => f,
                Err(error) => {
                    out.rejected = Some(Rejected { rows: (0..batch.num_rows()).collect(), error });
                    return Ok(());
                }
            };
            used.push(fetched.clone());
            if use_cache {
                let slab = self.next_slab;
                self.next_slab = self.next_slab.wrapping_add(1);
                let mut refs = 0;
                for &r in &missing {
                    let key: Box<[u8]> = rows.row(r).as_ref().into();
                    self.remove(&key);
                    let found = by_key.get(&key).cloned().unwrap_or_default();
                    self.cached += found.len().max(1);
                    refs += 1;
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    self.order.push_back((now, generation, key.clone()));
                    self.cache.insert(key, Entry { slab, rows: found, at: now, generation });
                }
                self.slabs.insert(slab, (fetched, refs));
            }
            fetched_rows = by_key;
        }
        // Each stream row's candidate pairs, in row order: (row, (batch slot, table row)).
        let mut slots: HashMap<u32, usize> = HashMap::new();
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (r, key) in rows.iter().enumerate() {
            if !valid[r] {
                continue;
            }
            if let Some(found) = fetched_rows.get(key.as_ref()) {
                for &t in found {
                    mine.push(r as u32);
                    theirs.push((1, t as usize));
                }
            } else if let Some(entry) = self.cache.get(key.as_ref()) {
                let slot = *slots.entry(entry.slab).or_insert_with(|| {
                    used.push(self.slabs[&entry.slab].0.clone());
                    used.len() - 1
                });
                for &t in &entry.rows {
                    mine.push(r as u32);
                    theirs.push((slot, t as usize));
                }
            }
        }
        let payload = batch.project(&(keys..batch.num_columns()).collect::<Vec<_>>())?;
        // The residual decides which candidates match.
        if self.plan.join.residual.is_some() && !mine.is_empty() {
            let keep = self.plan.join.passing(&self.joined(&payload, &mine, &theirs, &used)?)?;
            mine = keep.iter().map(|&i| mine[i]).collect();
            theirs = keep.iter().map(|&i| theirs[i]).collect();
        }
        if self.plan.outer {
            // Stream rows without a match, padded, in their place.
            let (mut m, mut t) = (Vec::with_capacity(batch.num_rows()), Vec::with_capacity(batch.num_rows()));
            let mut next = 0;
            for r in 0..batch.num_rows() as u32 {
                let start = next;
                while next < mine.len() && mine[next] == r {
                    next += 1;
                }
                if start == next {
                    m.push(r);
                    t.push((0, 0));
                } else {
                    m.extend_from_slice(&mine[start..next]);
                    t.extend_from_slice(&theirs[start..next]);
                }
            }
            (mine, theirs) = (m, t);
        }
        if !mine.is_empty() {
            let joined = self.joined(&payload, &mine, &theirs, &used)?;
            let join = &self.plan.join;
            let rows = eval_branch(None, &join.output, &join.schema, &joined)?;
            if rows.num_rows() > 0 {
                out.rows.push(rows);
            }
        }
        if use_cache {
            self.evict(now);
        }
        Ok(())
    }

    /// The joined rows (in the joined schema's column order) of stream rows `mine` with
    /// table rows `theirs` (slot in `used`, row).
    fn joined(&self, payload: &RecordBatch, mine: &[u32], theirs: &[(usize, usize)], used: &[RecordBatch]) -> Result<RecordBatch> {
        let indices = UInt32Array::from(mine.to_vec());
        let own: Vec<ArrayRef> = payload.columns().iter().map(|c| take(c, &indices, None)).collect::<Result<_, _>>()?;
        let width = self.nulls.num_columns();
        let mut far = Vec::with_capacity(width);
        for col in 0..width {
            let arrays: Vec<&dyn Array> = used.iter().map(|b| b.column(col).as_ref()).collect();
            far.push(interleave(&arrays, theirs)?);
        }
        let columns = if self.plan.stream_left { [own, far].concat() } else { [far, own].concat() };
        JoinPlan::conform(&self.plan.join.joined_schema, columns, mine.len())
    }
}

impl OperatorSpec for LookupPlan {
    fn name(&self) -> &'static str {
        "lookup_join"
    }

    fn schema(&self) -> SchemaRef {
        self.join.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(LookupOperator::new(self)?))
    }

    fn lookup_table(&self) -> Option<&str> {
        Some(&self.table)
    }
}

impl Operator for LookupOperator {
    fn process(&mut self, _port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        self.apply(batch, out)
    }

    fn join_state(&self) -> Option<[u64; 2]> {
        let cached = self.cached as u64;
        Some(if self.plan.stream_left { [0, cached] } else { [cached, 0] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::Column;
    use parking_lot::Mutex;

    /// A table in memory that counts the keys it is asked for.
    #[derive(Debug)]
    struct Table {
        rows: RecordBatch,
        asked: Mutex<Vec<usize>>,
        fail: Mutex<bool>,
    }

    impl LookupSource for Table {
        fn name(&self) -> &'static str {
            "test"
        }
        fn schema(&self) -> SchemaRef {
            self.rows.schema()
        }
        fn fetch(&self, columns: &[usize], keys: &RecordBatch) -> Result<RecordBatch> {
            if *self.fail.lock() {
                return Err(crate::Error::connector("the table is down"));
            }
            self.asked.lock().push(keys.num_rows());
            let wanted: Vec<i64> = keys.column(0).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec();
            let ids = self.rows.column(columns[0]).as_primitive::<arrow::datatypes::Int64Type>();
            let mask: arrow::array::BooleanArray = ids.iter().map(|v| Some(v.is_some_and(|v| wanted.contains(&v)))).collect();
            Ok(arrow::compute::filter_record_batch(&self.rows, &mask)?)
        }
        fn scan(&self) -> Result<Vec<RecordBatch>> {
            Ok(vec![self.rows.clone()])
        }
    }

    fn plan(outer: bool, max_rows: usize, ttl_ms: i64) -> (Arc<LookupPlan>, Arc<Table>) {
        let table_schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("name", DataType::Utf8, true)]));
        let rows = RecordBatch::try_new(
            table_schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2, 2])), Arc::new(StringArray::from(vec!["one", "two", "deux"]))],
        )
        .unwrap();
        let table = Arc::new(Table { rows, asked: Mutex::new(Vec::new()), fail: Mutex::new(false) });
        // Joined row: the stream's (v), then the table's (id, name); output: v, name.
        let joined = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true), Field::new("name", DataType::Utf8, true)]));
        let join = JoinPlan {
            keys: 1,
            key_types: vec![DataType::Int64],
            residual: None,
            joined_schema: joined,
            output: vec![Arc::new(Column::new("v", 0)), Arc::new(Column::new("name", 2))],
            schema,
            state_ttl_ms: None,
            outer: [false, false],
        };
        let plan = LookupPlan {
            join,
            table: "t".into(),
            source: table.clone(),
            key_columns: vec![0],
            stream_left: true,
            outer,
            cache: CacheBounds { max_rows, ttl_ms },
        };
        (Arc::new(plan), table)
    }

    /// Stream rows: (key, v).
    fn feed(op: &mut LookupOperator, rows: &[(Option<i64>, i64)]) -> Vec<(i64, Option<String>)> {
        let schema = Arc::new(Schema::new(vec![Field::new("key0", DataType::Int64, true), Field::new("v", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            ],
        )
        .unwrap();
        let mut out = Collector::default();
        op.process(0, &batch, None, &mut out).unwrap();
        let mut got = Vec::new();
        for b in out.rows {
            let v = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let n = b.column(1).as_string::<i32>();
            for i in 0..b.num_rows() {
                got.push((v.value(i), n.is_valid(i).then(|| n.value(i).to_string())));
            }
        }
        got
    }

    #[test]
    fn rows_join_their_keys_rows_in_order_and_the_cache_saves_fetches() {
        let (plan, table) = plan(false, 100, 60_000);
        let mut op = LookupOperator::new(plan).unwrap();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(feed(&mut op, &[(Some(2), 10), (Some(3), 11), (Some(1), 12), (None, 13)]), vec![(10, s("two")), (10, s("deux")), (12, s("one"))]);
        // Keys 1, 2, 3 (3 without rows) in one fetch; then all from the cache.
        assert_eq!(*table.asked.lock(), vec![3]);
        assert_eq!(feed(&mut op, &[(Some(1), 20), (Some(3), 21)]), vec![(20, s("one"))]);
        assert_eq!(*table.asked.lock(), vec![3]);
        assert_eq!(op.cached_rows(), 4);
    }

    #[test]
    fn left_pads_misses_and_the_cache_stays_under_its_bound() {
        let (plan, table) = plan(true, 2, 60_000);
        let mut op = LookupOperator::new(plan).unwrap();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(feed(&mut op, &[(Some(3), 1), (None, 2), (Some(1), 3)]), vec![(1, None), (2, None), (3, s("one"))]);
        assert!(op.cached_rows() <= 2);
        assert_eq!(feed(&mut op, &[(Some(2), 4)]), vec![(4, s("two")), (4, s("deux"))]);
        assert!(op.cached_rows() <= 2, "{}", op.cached_rows());
        // A failing table rejects the batch; the next batch joins again.
        *table.fail.lock() = true;
        let mut out = Collector::default();
        let schema = Arc::new(Schema::new(vec![Field::new("key0", DataType::Int64, true), Field::new("v", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![7])), Arc::new(Int64Array::from(vec![5]))]).unwrap();
        op.process(0, &batch, None, &mut out).unwrap();
        assert!(out.rows.is_empty());
        assert!(out.rejected.unwrap().error.message.contains("the table is down"));
        *table.fail.lock() = false;
        assert_eq!(feed(&mut op, &[(Some(1), 6)]), vec![(6, s("one"))]);
    }

    #[test]
    fn entries_older_than_the_ttl_are_fetched_again() {
        let (plan, table) = plan(false, 100, 1);
        let mut op = LookupOperator::new(plan).unwrap();
        feed(&mut op, &[(Some(1), 1)]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        feed(&mut op, &[(Some(1), 2)]);
        assert_eq!(*table.asked.lock(), vec![1, 1]);
    }
}
