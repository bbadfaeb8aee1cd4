//! A new kind of operator needs its own code and a plan that uses it, nothing in the
//! runtime: a dedupe-by-key operator written here (the first row of each key passes,
//! later ones are dropped), put in a stream's DAG behind an exchange by key, runs on
//! every shard with exact results.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ScalarValue;

use laminardb_engine::catalog::{Catalog, SourceDef, SourceKind, StreamDef};
use laminardb_engine::config::EngineConfig;
use laminardb_engine::dataflow::{Collector, Dag, Operator, OperatorSpec, Port, Route, TaskInfo, Upstream};
use laminardb_engine::frontend::{Frontend, ShardAccess, Statement};
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::{Error, Result};
use laminardb_shards::Handle;

#[derive(Debug)]
struct DedupeSpec {
    schema: SchemaRef,
}

/// Keeps the keys (column 0, text) it has seen on this shard.
struct Dedupe {
    seen: HashSet<String>,
}

impl OperatorSpec for DedupeSpec {
    fn name(&self) -> &'static str {
        "dedupe"
    }
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(Dedupe { seen: HashSet::new() }))
    }
}

impl Operator for Dedupe {
    fn process(&mut self, _port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        let keys = batch.column(0).as_string::<i32>();
        let first: BooleanArray = (0..batch.num_rows()).map(|i| Some(keys.is_valid(i) && self.seen.insert(keys.value(i).to_string()))).collect();
        let rows = filter_record_batch(batch, &first)?;
        if rows.num_rows() > 0 {
            out.rows.push(rows);
        }
        Ok(())
    }

    fn save(&self) -> Result<Option<Vec<u8>>> {
        Ok(Some(self.seen.iter().cloned().collect::<Vec<_>>().join("\n").into_bytes()))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let text = std::str::from_utf8(bytes).map_err(|e| Error::internal(e.to_string()))?;
        self.seen = text.lines().map(String::from).collect();
        Ok(())
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("sym", DataType::Utf8, true), Field::new("v", DataType::Int64, true)]))
}

/// Knows `create` (a source `t (sym, v)`) and `dedupe` (the stream `firsts` over it).
struct DedupeFrontend;

impl Frontend for DedupeFrontend {
    fn split(&self, sql: &str) -> Result<Vec<String>> {
        Ok(vec![sql.to_string()])
    }
    fn plan(&mut self, sql: &str, _: &[ScalarValue], _: &Arc<Catalog>, _: Arc<dyn ShardAccess>) -> Result<Statement> {
        match sql {
            "create" => {
                let mut def = SourceDef {
                    name: "t".into(),
                    kind: SourceKind::Source,
                    schema: schema(),
                    watermark: None,
                    partition_key: vec![],
                    primary_key: vec![],
                    // Each key's rows on one shard, in order: "first" is then the same on
                    // any number of shards.
                    options: [("partition_key".to_string(), "sym".to_string())].into_iter().collect(),
                    sql: sql.into(),
                    connector: None,
                    lookup: None,
                };
                def.choose_partition_key()?;
                Ok(Statement::CreateSource { def, if_not_exists: false, or_replace: false })
            }
            "dedupe" => {
                let mut dag = Dag::default();
                let spec = Arc::new(DedupeSpec { schema: schema() });
                dag.add(spec, vec![Port { from: Upstream::Input("t".into()), route: Route::Key(1) }]);
                let plan = StreamPlan { name: "firsts".into(), sql: sql.into(), dag, schema: schema(), materialized: false, backfill: true, functions: Vec::new(), changes_asked: false };
                let def = StreamDef { name: "firsts".into(), sql: sql.into(), plan: Arc::new(plan), table_schema: schema() };
                Ok(Statement::CreateStream { def, if_not_exists: false, or_replace: false })
            }
            other => Err(Error::parse(format!("unknown statement {other}"))),
        }
    }
    fn shutdown(&mut self) {}
}

fn rows(from: i64, n: i64) -> RecordBatch {
    RecordBatch::try_from_iter(vec![
        ("sym", Arc::new(StringArray::from_iter_values((from..from + n).map(|i| format!("S{}", i % 7)))) as ArrayRef),
        ("v", Arc::new(Int64Array::from_iter_values(from..from + n)) as ArrayRef),
    ])
    .unwrap()
}

#[test]
fn a_dedupe_operator_written_outside_the_runtime_runs_on_every_shard() {
    for shards in [1, 3] {
        let config = EngineConfig { shards, pin_shards: false, ..EngineConfig::default() };
        let db = Handle::open(config, Box::new(DedupeFrontend)).expect("open");
        db.execute("create", vec![]).unwrap();
        db.execute("dedupe", vec![]).unwrap();
        let sub = db.output("firsts").unwrap().subscribe(64, u64::MAX);
        db.insert("t", &[rows(0, 100)]).unwrap();
        db.insert("t", &[rows(100, 50), rows(150, 3)]).unwrap();
        let mut firsts: Vec<(String, i64)> = Vec::new();
        while let Ok(batch) = sub.batches.try_recv() {
            let sym = batch.column(0).as_string::<i32>();
            let v = batch.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            firsts.extend((0..batch.num_rows()).map(|i| (sym.value(i).to_string(), v.value(i))));
        }
        firsts.sort();
        let want: Vec<(String, i64)> = (0..7).map(|i| (format!("S{i}"), i)).collect();
        assert_eq!(firsts, want, "{shards} shards");
        db.close().unwrap();
    }
}
