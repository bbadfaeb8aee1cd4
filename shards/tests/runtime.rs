//! The runtime without SQL: a front end that only knows one DDL statement, so these tests
//! exercise threads, channels, inserts and panics directly.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::ScalarValue;

use laminardb_engine::catalog::{Catalog, SourceDef, SourceKind};
use laminardb_engine::config::EngineConfig;
use laminardb_engine::frontend::{Frontend, ShardAccess, Statement};
use laminardb_engine::{Error, ErrorCode, Result};
use laminardb_shards::command::PanicSite;
use laminardb_shards::{Handle, Outcome};

/// Knows `create`: a source `t (sym VARCHAR, v BIGINT)` partitioned by `sym`.
struct TinyFrontend;

impl Frontend for TinyFrontend {
    fn split(&self, sql: &str) -> Result<Vec<String>> {
        Ok(vec![sql.to_string()])
    }
    fn plan(&mut self, sql: &str, _: &[ScalarValue], _: &Arc<Catalog>, _: Arc<dyn ShardAccess>) -> Result<Statement> {
        if sql != "create" {
            return Err(Error::parse(format!("unknown statement {sql}")));
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("sym", DataType::Utf8, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let mut def = SourceDef {
            name: "t".into(),
            kind: SourceKind::Source,
            schema,
            watermark: None,
            partition_key: vec![],
            primary_key: vec![],
            options: Default::default(),
            sql: sql.into(),
            connector: None,
            lookup: None,
        };
        def.choose_partition_key()?;
        Ok(Statement::CreateSource { def, if_not_exists: false, or_replace: false })
    }
    fn shutdown(&mut self) {}
}

/// The descriptor-count test must not overlap the others (they share the process).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn open(shards: usize) -> Handle {
    let config = EngineConfig { shards, pin_shards: false, ..EngineConfig::default() };
    Handle::open(config, Box::new(TinyFrontend)).expect("open")
}

fn batch(n: i64) -> RecordBatch {
    RecordBatch::try_from_iter(vec![
        ("sym", Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("S{}", i % 5)))) as ArrayRef),
        ("v", Arc::new(Int64Array::from_iter_values(0..n)) as ArrayRef),
    ])
    .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn fd_kinds() -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).map(|p| p.display().to_string()).unwrap_or_default();
        let kind = target.split(':').take(2).collect::<Vec<_>>().join(":");
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

#[test]
fn inserts_are_split_across_shards_and_all_stored() {
    let _serial = serial();
    let db = open(3);
    assert!(matches!(db.execute("create", vec![]).unwrap().as_slice(), [Outcome::Ddl { .. }]));
    assert_eq!(db.insert("t", &[batch(1000)]).unwrap(), 1000);
    let per_shard = db.stats("t").unwrap();
    assert_eq!(per_shard.iter().map(|s| s.rows).sum::<u64>(), 1000);
    assert!(per_shard.iter().filter(|s| s.rows > 0).count() >= 2, "{per_shard:?}");
    assert_eq!(db.insert("nope", &[batch(1)]).unwrap_err().code, ErrorCode::TableNotFound);
    db.close().unwrap();
    assert_eq!(db.insert("t", &[batch(1)]).unwrap_err().code, ErrorCode::ConnectionClosed);
}

#[test]
fn panics_fail_one_command_and_the_engine_keeps_running() {
    let _serial = serial();
    let db = open(2);
    db.execute("create", vec![]).unwrap();
    for site in [PanicSite::Shard, PanicSite::Coordinator] {
        let err = db.inject_panic(site).unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal, "{err}");
        assert!(err.message.contains("injected panic"), "{err}");
    }
    assert_eq!(db.insert("t", &[batch(10)]).unwrap(), 10);
}

#[test]
fn open_and_close_leak_no_threads_or_descriptors() {
    let _serial = serial();
    let cycle = |n: usize| {
        for _ in 0..n {
            let db = open(2);
            db.execute("create", vec![]).unwrap();
            db.insert("t", &[batch(10)]).unwrap();
            db.close().unwrap();
        }
        // Blocking-pool threads of glommio exit asynchronously after their executor.
        std::thread::sleep(std::time::Duration::from_millis(200));
        open_fds()
    };
    // The first cycles open one-time globals (glommio's disconnected-reactor notifier…).
    let warm = cycle(10);
    let after = cycle(40);
    // A leak would show as one descriptor per cycle; allow for threads still exiting.
    assert!(after <= warm + 3, "descriptors grew from {warm} to {after} over 40 open/close cycles: {:?}", fd_kinds());
}
