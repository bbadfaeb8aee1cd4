//! A connector source needs its own code, nothing in the runtime: a counting connector
//! written here (three splits of the numbers 0..300, each read only up to a gate the
//! test moves) is read by the shards that own its splits, its watermark follows the
//! splits' progress, and a checkpoint records where each split was, so that reading goes
//! on from there after a reopen: every number exactly once. A connector whose splits grow
//! while it is read (as a Kafka topic given partitions) has its new splits opened by the
//! shards that own them, a shard that owned none included.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::common::ScalarValue;

use laminardb_engine::catalog::{Catalog, SourceDef, SourceKind, WatermarkSpec};
use laminardb_engine::config::EngineConfig;
use laminardb_engine::frontend::{Frontend, ShardAccess, Statement};
use laminardb_engine::source::{offset_position, read_offset_position, SourceConnector, SplitPoll, SplitReader, END_OF_INPUT};
use laminardb_engine::{Error, Result};
use laminardb_shards::Handle;

const SPLITS: u64 = 3;
const TOTAL: u64 = 300;
const DELAY_MS: i64 = 5;

/// Numbers `split, split + 3, …` below `TOTAL`, but none at or above `gate` yet.
#[derive(Debug)]
struct Counting {
    gate: Arc<AtomicU64>,
    /// A faulty connector: its rows have a column the source does not.
    wrong_columns: bool,
}

struct CountingSplit {
    next: u64,
    gate: Arc<AtomicU64>,
    wrong_columns: bool,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
}

impl SourceConnector for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn schema(&self) -> SchemaRef {
        schema()
    }
    fn splits(&self, _shards: usize) -> Result<usize> {
        Ok(SPLITS as usize)
    }
    fn open(&self, split: usize, _splits: usize, position: Option<&[u8]>) -> Result<Box<dyn SplitReader>> {
        let next = position.map_or(Ok(split as u64), |p| read_offset_position(p, "counting"))?;
        Ok(Box::new(CountingSplit { next, gate: self.gate.clone(), wrong_columns: self.wrong_columns }))
    }
}

impl SplitReader for CountingSplit {
    fn poll(&mut self) -> Result<SplitPoll> {
        if self.next >= TOTAL {
            return Ok(SplitPoll::End);
        }
        let gate = self.gate.load(Ordering::Acquire);
        let values: Vec<i64> = (self.next..gate.min(TOTAL)).step_by(SPLITS as usize).take(10).map(|v| v as i64).collect();
        let Some(&last) = values.last() else { return Ok(SplitPoll::Pending(Duration::from_millis(1))) };
        self.next = last as u64 + SPLITS;
        let columns = if self.wrong_columns {
            Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]))
        } else {
            schema()
        };
        Ok(SplitPoll::Rows(RecordBatch::try_new(columns, vec![Arc::new(Int64Array::from(values)) as ArrayRef])?))
    }
    fn position(&self) -> Vec<u8> {
        offset_position(self.next)
    }
    fn progress(&self) -> Option<i64> {
        Some(self.next as i64)
    }
}

/// Splits `0..count`, `count` growing when the test says: split `s` is the numbers
/// `1000 s .. 1000 s + 50`, ten at a time, then nothing more (as a quiet partition).
#[derive(Debug)]
struct Growing {
    count: Arc<AtomicUsize>,
}

struct GrowingSplit {
    next: u64,
    end: u64,
}

impl SourceConnector for Growing {
    fn name(&self) -> &'static str {
        "growing"
    }
    fn schema(&self) -> SchemaRef {
        schema()
    }
    fn splits(&self, _shards: usize) -> Result<usize> {
        Ok(self.count.load(Ordering::Acquire))
    }
    fn splits_now(&self) -> Option<usize> {
        Some(self.count.load(Ordering::Acquire))
    }
    fn open(&self, split: usize, _splits: usize, position: Option<&[u8]>) -> Result<Box<dyn SplitReader>> {
        let start = 1000 * split as u64;
        let next = position.map_or(Ok(start), |p| read_offset_position(p, "growing"))?;
        Ok(Box::new(GrowingSplit { next, end: start + 50 }))
    }
}

impl SplitReader for GrowingSplit {
    fn poll(&mut self) -> Result<SplitPoll> {
        if self.next >= self.end {
            return Ok(SplitPoll::Pending(Duration::from_millis(1)));
        }
        let values: Vec<i64> = (self.next..self.end.min(self.next + 10)).map(|v| v as i64).collect();
        self.next += values.len() as u64;
        Ok(SplitPoll::Rows(RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(values)) as ArrayRef])?))
    }
    fn position(&self) -> Vec<u8> {
        offset_position(self.next)
    }
}

/// Knows `create` (the source `t` over the counting connector) and `create growing` (`g`
/// over the growing one); keeps the shard access
/// it is planned with (also when reopening replays it) to read the rows back.
struct CountingFrontend {
    gate: Arc<AtomicU64>,
    count: Arc<AtomicUsize>,
    access: Arc<parking_lot::Mutex<Option<Arc<dyn ShardAccess>>>>,
}

impl Frontend for CountingFrontend {
    fn split(&self, sql: &str) -> Result<Vec<String>> {
        Ok(vec![sql.to_string()])
    }
    fn plan(&mut self, sql: &str, _: &[ScalarValue], _: &Arc<Catalog>, access: Arc<dyn ShardAccess>) -> Result<Statement> {
        *self.access.lock() = Some(access);
        let wrong_columns = sql == "create faulty";
        if sql == "create growing" {
            let def = SourceDef {
                name: "g".into(),
                kind: SourceKind::Source,
                schema: schema(),
                watermark: None,
                partition_key: vec![],
                primary_key: vec![],
                options: Default::default(),
                sql: sql.into(),
                connector: Some(Arc::new(Growing { count: self.count.clone() })),
                lookup: None,
            };
            return Ok(Statement::CreateSource { def, if_not_exists: false, or_replace: false });
        }
        match sql {
            "create" | "create faulty" => {
                let def = SourceDef {
                    name: if wrong_columns { "w".into() } else { "t".into() },
                    kind: SourceKind::Source,
                    schema: schema(),
                    watermark: Some(WatermarkSpec { column: "v".into(), delay_ms: DELAY_MS }),
                    partition_key: vec![],
                    primary_key: vec![],
                    options: Default::default(),
                    sql: sql.into(),
                    connector: Some(Arc::new(Counting { gate: self.gate.clone(), wrong_columns })),
                    lookup: None,
                };
                Ok(Statement::CreateSource { def, if_not_exists: false, or_replace: false })
            }
            other => Err(Error::parse(format!("unknown statement {other}"))),
        }
    }
    fn shutdown(&mut self) {}
}

struct Db {
    handle: Handle,
    access: Arc<parking_lot::Mutex<Option<Arc<dyn ShardAccess>>>>,
}

fn open(shards: usize, dir: &std::path::Path, gate: &Arc<AtomicU64>) -> Db {
    open_growing(shards, dir, gate, &Arc::new(AtomicUsize::new(0)))
}

fn open_growing(shards: usize, dir: &std::path::Path, gate: &Arc<AtomicU64>, count: &Arc<AtomicUsize>) -> Db {
    let config = EngineConfig { shards, pin_shards: false, storage_dir: Some(dir.display().to_string()), ..EngineConfig::default() };
    let access = Arc::new(parking_lot::Mutex::new(None));
    let frontend = CountingFrontend { gate: gate.clone(), count: count.clone(), access: access.clone() };
    let handle = Handle::open(config, Box::new(frontend)).expect("open");
    Db { handle, access }
}

impl Db {
    fn rows(&self) -> u64 {
        self.rows_of("t")
    }

    fn rows_of(&self, source: &str) -> u64 {
        self.handle.stats(source).unwrap().iter().map(|s| s.rows).sum()
    }

    fn wait_for_rows(&self, want: u64) {
        self.wait_for_rows_of("t", want)
    }

    fn wait_for_rows_of(&self, source: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.rows_of(source) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(self.rows_of(source), want);
    }

    fn watermark(&self) -> i64 {
        self.handle.output("t").unwrap().counters.watermark.load(Ordering::Acquire)
    }

    /// Every value of `t`, sorted.
    fn values(&self) -> Vec<i64> {
        self.values_of("t")
    }

    fn values_of(&self, source: &str) -> Vec<i64> {
        let access = self.access.lock().clone().expect("the front end saw the shard access");
        let mut values = Vec::new();
        for shard in 0..access.shards() {
            for batch in access.scan(source, shard).unwrap().recv().unwrap().unwrap() {
                values.extend(batch.column(0).as_primitive::<Int64Type>().values().iter().copied());
            }
        }
        values.sort();
        values
    }
}

#[test]
fn a_connector_source_goes_on_from_its_checkpointed_positions_exactly_once() {
    // 4 shards: shard 3 owns no split and holds the watermark back nowhere.
    for shards in [2, 4] {
        let dir = std::env::temp_dir().join(format!("laminardb-source-{}-{shards}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let gate = Arc::new(AtomicU64::new(100));
        let db = open(shards, &dir, &gate);
        db.handle.execute("create", vec![]).unwrap();
        db.handle.start().unwrap();
        db.wait_for_rows(100);
        // Splits next at 102, 100 and 101: the least, less the delay.
        assert_eq!(db.watermark(), 100 - DELAY_MS, "{shards} shards");
        db.handle.checkpoint().unwrap();
        gate.store(150, Ordering::Release);
        db.wait_for_rows(150);
        db.handle.close().unwrap();

        // Reopened, the splits go on where close()'s checkpoint found them.
        let db = open(shards, &dir, &gate);
        assert_eq!(db.rows(), 150);
        db.handle.start().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(db.rows(), 150, "{shards} shards: nothing read twice");
        gate.store(TOTAL, Ordering::Release);
        db.wait_for_rows(TOTAL);
        assert_eq!(db.values(), (0..TOTAL as i64).collect::<Vec<_>>(), "{shards} shards");
        let deadline = Instant::now() + Duration::from_secs(20);
        while db.watermark() < END_OF_INPUT && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(db.watermark(), END_OF_INPUT, "every split ended");
        db.handle.close().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn rows_without_the_source_columns_stop_that_source_with_an_error_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("laminardb-source-faulty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gate = Arc::new(AtomicU64::new(TOTAL));
    let db = open(2, &dir, &gate);
    db.handle.execute("create faulty", vec![]).unwrap();
    db.handle.execute("create", vec![]).unwrap();
    db.handle.start().unwrap();
    db.wait_for_rows(TOTAL);
    let faulty = db.handle.output("w").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while faulty.counters.errors.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    // One error per shard (each stops reading it); none of its rows is stored.
    assert_eq!(faulty.counters.errors.load(Ordering::Acquire), 2);
    let last = faulty.counters.last_error.lock().clone().unwrap_or_default();
    assert!(last.contains("produced the columns [\"x\"]"), "{last}");
    assert_eq!(db.handle.stats("w").unwrap().iter().map(|s| s.rows).sum::<u64>(), 0);
    db.handle.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn splits_a_source_gains_while_read_are_opened_by_their_shards_and_kept_across_a_reopen() {
    let dir = std::env::temp_dir().join(format!("laminardb-source-growing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gate = Arc::new(AtomicU64::new(0));
    let count = Arc::new(AtomicUsize::new(1));
    let expected = |splits: u64| -> Vec<i64> { (0..splits).flat_map(|s| (1000 * s..1000 * s + 50).map(|v| v as i64)).collect() };
    let db = open_growing(2, &dir, &gate, &count);
    db.handle.execute("create growing", vec![]).unwrap();
    db.handle.start().unwrap();
    // One split: shard 1 owns none yet and waits for one.
    db.wait_for_rows_of("g", 50);
    // Split 1 is shard 1's, split 2 shard 0's.
    count.store(3, Ordering::Release);
    db.wait_for_rows_of("g", 150);
    assert_eq!(db.values_of("g"), expected(3));
    db.handle.close().unwrap();

    // Reopened: the three splits go on from their positions (at their ends: nothing twice); a
    // fourth, gained later, is read from its start.
    let db = open_growing(2, &dir, &gate, &count);
    db.handle.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(db.rows_of("g"), 150, "nothing read twice");
    count.store(4, Ordering::Release);
    db.wait_for_rows_of("g", 200);
    assert_eq!(db.values_of("g"), expected(4));
    db.handle.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
