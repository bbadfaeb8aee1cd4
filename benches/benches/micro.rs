//! Criterion micro-benchmarks: `cargo bench -p laminardb-benches` (release build).
//! Workloads live in `laminardb_benches`, where tests run each at a tiny size.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use laminardb_benches::{assign_windows, trades, ChannelHop, Engine, Operators};
use laminardb_engine::stream::window::WindowKind;

const BATCH_ROWS: usize = 8192;

fn hops(c: &mut Criterion) {
    let engine = Engine::open(1).expect("engine opens");
    c.bench_function("hop/caller_to_coordinator_and_back", |b| b.iter(|| engine.round_trip().expect("answer")));
    // One single-row insert, answered once the shard has stored it and run both streams.
    let row = one_passing_row();
    c.bench_function("hop/insert_one_row", |b| b.iter(|| engine.handle.insert("trades", std::slice::from_ref(&row)).expect("stored")));
    let hop = ChannelHop::start();
    c.bench_function("hop/exchange_channel_round_trip", |b| b.iter(|| hop.hop(black_box(1))));
}

fn operators(c: &mut Criterion) {
    let engine = Engine::open(1).expect("engine opens");
    let ops = Operators::from(&engine).expect("plans");
    let batch = trades(BATCH_ROWS, 1000, 1000);
    let mut group = c.benchmark_group("operator");
    group.throughput(Throughput::Elements(BATCH_ROWS as u64));
    group.bench_function("filter_project_8192", |b| b.iter(|| ops.filter(black_box(&batch)).expect("filter")));
    let one = one_passing_row();
    group.throughput(Throughput::Elements(1));
    group.bench_function("filter_project_1", |b| b.iter(|| ops.filter(black_box(&one)).expect("filter")));
    group.throughput(Throughput::Elements(BATCH_ROWS as u64));
    group.bench_function("keyed_tumble_aggregate_8192", |b| {
        b.iter_batched(|| batch.clone(), |batch| ops.aggregate(&batch).expect("aggregate"), BatchSize::SmallInput)
    });
    let ts: Vec<i64> = (0..BATCH_ROWS as i64).map(|i| i * 7).collect();
    let mut out = Vec::with_capacity(BATCH_ROWS * 4);
    group.bench_function("window_assign_tumble_8192", |b| {
        b.iter(|| assign_windows(WindowKind::Tumble { size: 1000 }, black_box(&ts), &mut out))
    });
    group.bench_function("window_assign_hop4_8192", |b| {
        b.iter(|| assign_windows(WindowKind::Hop { slide: 250, size: 1000 }, black_box(&ts), &mut out))
    });
    group.finish();
}

/// The WAL's CPU cost per record: framing + checksum + Arrow IPC, and decoding it back.
fn wal(c: &mut Criterion) {
    use laminardb_engine::wal::{decode_all, encode, Record};
    let mut group = c.benchmark_group("wal");
    for rows in [1, BATCH_ROWS] {
        let record = Record::Append { lsn: 1, parts: 1, source: "trades".into(), batches: vec![trades(rows, 1000, 1000)] };
        let mut frame = Vec::new();
        encode(&record, &mut frame).expect("encodes");
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(format!("encode_append_{rows}"), |b| {
            b.iter(|| {
                frame.clear();
                encode(black_box(&record), &mut frame).expect("encodes")
            })
        });
        group.bench_function(format!("decode_append_{rows}"), |b| b.iter(|| decode_all(black_box(&frame)).0.len()));
    }
    group.finish();
}

/// Connector payloads into Arrow: JSON trades, one object per message.
fn decode(c: &mut Criterion) {
    use laminardb_benches::{decode_json, decode_json_arrow_only, json_trades};
    let mut group = c.benchmark_group("decode");
    let messages = json_trades(BATCH_ROWS);
    group.throughput(Throughput::Elements(BATCH_ROWS as u64));
    group.bench_function(format!("json_trades_{BATCH_ROWS}"), |b| b.iter(|| decode_json(black_box(&messages)).expect("decodes")));
    group.bench_function(format!("json_trades_arrow_only_{BATCH_ROWS}"), |b| {
        b.iter(|| decode_json_arrow_only(black_box(&messages)).expect("decodes"))
    });
    group.finish();
}

/// One trade that passes the `hot` stream's filter (price 99).
fn one_passing_row() -> arrow::array::RecordBatch {
    trades(100, 1, 100).slice(98, 1)
}

criterion_group!(benches, hops, operators, wal, decode);
criterion_main!(benches);
