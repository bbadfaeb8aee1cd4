//! The micro-benchmarks' workloads, as plain functions: `benches/micro.rs` times them with
//! criterion at full size, and the tests below run each at a tiny size so they never rot.
//!
//! * [`Engine::round_trip`]: one command caller → coordinator → caller (the hop every
//!   Python call makes; the GIL plays no part here).
//! * [`channel_hop`]: one message to another thread and back over the channel the
//!   cross-shard exchange uses.
//! * [`Operators`]: one batch through a stream's filter/projection, a keyed aggregate and
//!   window assignment — the shard's per-batch work.
//!
//! * WAL records (`benches/micro.rs`, `wal/*`): framing, checksum and Arrow IPC of one
//!   append, and decoding it back. Disk writes and fsync are measured end to end by
//!   `perf/workloads/durability.py`.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use laminardb_engine::config::EngineConfig;
use laminardb_engine::dataflow::{Collector, TaskInfo, Watermark};

/// The operators here run as the one shard of one.
const ONE_SHARD: TaskInfo = TaskInfo { shard: 0, shards: 1 };
use laminardb_engine::stream::window::WindowKind;
use laminardb_engine::stream::StreamPlan;
use laminardb_engine::Result;
use laminardb_planner::SqlFrontend;
use laminardb_shards::Handle;

/// A running engine with one source `trades (symbol, price, ts)` and two streams over it.
pub struct Engine {
    pub handle: Handle,
}

impl Engine {
    pub fn open(shards: usize) -> Result<Engine> {
        let config = EngineConfig { shards, ..EngineConfig::default() };
        let handle = Handle::open(config, Box::new(SqlFrontend::new(shards)?))?;
        for sql in [
            "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, ts BIGINT, WATERMARK FOR ts)",
            "CREATE STREAM hot AS SELECT symbol, price * 2 AS px2, ts FROM trades WHERE price > 50",
            "CREATE STREAM bars AS SELECT symbol, window_start, MIN(price) AS low, MAX(price) AS high, \
             COUNT(*) AS n FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)",
        ] {
            handle.execute(sql, vec![])?;
        }
        Ok(Engine { handle })
    }

    /// One command to the coordinator and its answer (a watermark query).
    pub fn round_trip(&self) -> Result<i64> {
        self.handle.watermark("trades", None).map(laminardb_engine::dataflow::Watermark::encode)
    }

    /// The compiled plan of stream `name`.
    pub fn plan(&self, name: &str) -> Result<Arc<StreamPlan>> {
        Ok(self.handle.catalog().stream(name)?.plan.clone())
    }
}

/// Trades for `symbols` symbols, `rows` of them, `ts` ascending over `span_ms`.
pub fn trades(rows: usize, symbols: usize, span_ms: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("symbol", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new("ts", DataType::Int64, true),
    ]));
    let names: Vec<String> = (0..symbols).map(|s| format!("S{s:04}")).collect();
    let symbol = StringArray::from_iter_values((0..rows).map(|i| &names[(i * 7919) % symbols]));
    let price = Float64Array::from_iter_values((0..rows).map(|i| 1.0 + (i % 100) as f64));
    let ts = Int64Array::from_iter_values((0..rows).map(|i| i as i64 * span_ms / rows.max(1) as i64));
    RecordBatch::try_new(schema, vec![Arc::new(symbol), Arc::new(price), Arc::new(ts)]).expect("valid batch")
}

/// Sends `msg` to an echoing thread and waits for it to come back, `n` times.
pub struct ChannelHop {
    to: flume::Sender<u64>,
    back: flume::Receiver<u64>,
    echo: Option<std::thread::JoinHandle<()>>,
}

impl ChannelHop {
    pub fn start() -> ChannelHop {
        let (to, rx) = flume::unbounded::<u64>();
        let (tx, back) = flume::unbounded::<u64>();
        let echo = std::thread::spawn(move || {
            while let Ok(v) = rx.recv() {
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        ChannelHop { to, back, echo: Some(echo) }
    }

    pub fn hop(&self, v: u64) -> u64 {
        self.to.send(v).expect("echo thread alive");
        self.back.recv().expect("echo thread alive")
    }
}

impl Drop for ChannelHop {
    fn drop(&mut self) {
        let (closed, _) = flume::unbounded();
        self.to = closed;
        if let Some(echo) = self.echo.take() {
            let _ = echo.join();
        }
    }
}

/// One batch through the operators of the `hot` and `bars` streams.
pub struct Operators {
    pub filter: Arc<StreamPlan>,
    pub aggregate: Arc<StreamPlan>,
}

impl Operators {
    pub fn from(engine: &Engine) -> Result<Operators> {
        Ok(Operators { filter: engine.plan("hot")?, aggregate: engine.plan("bars")? })
    }

    /// Filter and projection (the stream's one operator): rows out.
    pub fn filter(&self, batch: &RecordBatch) -> Result<usize> {
        let mut map = Arc::clone(&self.filter.dag.nodes[0].spec).build(ONE_SHARD)?;
        let mut out = Collector::default();
        map.process(0, batch, None, &mut out)?;
        Ok(out.rows.iter().map(RecordBatch::num_rows).sum())
    }

    /// The keyed windowed aggregate: projection (node 0), folding into per-group state
    /// (node 1; fresh operators each time, so state does not grow across iterations),
    /// then every window closed. Returns the groups emitted.
    pub fn aggregate(&self, batch: &RecordBatch) -> Result<usize> {
        let nodes = &self.aggregate.dag.nodes;
        let (mut map, mut agg) = (Arc::clone(&nodes[0].spec).build(ONE_SHARD)?, Arc::clone(&nodes[1].spec).build(ONE_SHARD)?);
        let mut projected = Collector::default();
        map.process(0, batch, None, &mut projected)?;
        let mut out = Collector::default();
        for input in &projected.rows {
            agg.process(0, input, None, &mut out)?;
        }
        agg.on_watermark(Watermark::new(i64::MAX), &mut out)?;
        Ok(out.rows.iter().map(RecordBatch::num_rows).sum())
    }
}

/// Window assignment of `ts` values: windows produced.
pub fn assign_windows(kind: WindowKind, ts: &[i64], out: &mut Vec<(i64, i64)>) -> usize {
    out.clear();
    for &t in ts {
        kind.assign(t, out);
    }
    out.len()
}

/// `n` trades as JSON messages, one object each (what a Kafka or WebSocket source gets).
pub fn json_trades(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!(r#"{{"symbol": "S{}", "price": {}.25, "qty": {}, "ts": {}}}"#, i % 1000, 100 + i % 50, 1 + i % 9, 1_700_000_000_000u64 + i as u64).into_bytes())
        .collect()
}

/// Decodes `messages` (JSON trades) into the trades' columns; returns the rows.
pub fn decode_json(messages: &[Vec<u8>]) -> Result<usize> {
    use laminardb_connectors::decode::{PayloadDecoder, PayloadFormat};
    let mut decoder = PayloadDecoder::new(PayloadFormat::Json, trades(1, 1, 1).schema())?;
    for m in messages {
        decoder.push(m);
    }
    let (batch, rejected) = decoder.finish()?;
    assert!(rejected.is_empty(), "{rejected:?}");
    Ok(batch.map_or(0, |b| b.num_rows()))
}

/// The baseline of [`decode_json`]: arrow-json's decoder alone over the same bytes (what
/// `connectors::decode` adds on top is the gathering and the bad-message fallback).
pub fn decode_json_arrow_only(messages: &[Vec<u8>]) -> Result<usize> {
    let bytes: Vec<u8> = messages.iter().flat_map(|m| m.iter().copied().chain([b'\n'])).collect();
    let mut decoder = arrow::json::ReaderBuilder::new(trades(1, 1, 1).schema()).with_batch_size(messages.len()).build_decoder()?;
    decoder.decode(&bytes)?;
    Ok(decoder.flush()?.map_or(0, |b| b.num_rows()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_answers() {
        let engine = Engine::open(1).unwrap();
        assert_eq!(engine.round_trip().unwrap(), i64::MIN);
        engine.handle.insert("trades", &[trades(10, 2, 1000)]).unwrap();
        assert_eq!(engine.round_trip().unwrap(), 900);
    }

    #[test]
    fn json_messages_decode() {
        assert_eq!(decode_json(&json_trades(10)).unwrap(), 10);
        assert_eq!(decode_json_arrow_only(&json_trades(10)).unwrap(), 10);
    }

    #[test]
    fn channel_hop_echoes() {
        let hop = ChannelHop::start();
        assert_eq!(hop.hop(7), 7);
    }

    #[test]
    fn operators_do_their_work() {
        let engine = Engine::open(1).unwrap();
        let ops = Operators::from(&engine).unwrap();
        let batch = trades(100, 10, 2000);
        // Prices are 1..=100 cycling: 50 of the first 100 rows are above 50.
        assert_eq!(ops.filter(&batch).unwrap(), 50);
        // 10 symbols × 2 one-second windows.
        assert_eq!(ops.aggregate(&batch).unwrap(), 20);
    }

    #[test]
    fn windows_are_assigned() {
        let mut out = Vec::new();
        assert_eq!(assign_windows(WindowKind::Tumble { size: 1000 }, &[1, 999, 1000], &mut out), 3);
        assert_eq!(assign_windows(WindowKind::Hop { slide: 500, size: 1000 }, &[1, 999, 1000], &mut out), 6);
    }
}
