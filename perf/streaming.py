"""Streaming latency and throughput, end to end through the public Python API.

    python perf/streaming.py [--quick] [--json out.json]

Workloads (each checks its own results):
  latency   single-row Writer.insert -> filter stream -> subscribe_stream(...).next();
            percentiles of the whole round trip, from perf_counter_ns
  arrow_1m  one 1,000,000-row Arrow batch through the same filter stream, timed until the
            subscriber has seen every row
  ohlc      trades for 1,000 symbols through a TUMBLE(1 s) OHLC stream; rows/s until the
            last bar has been delivered

Run the same script under .venv-perf (this build) and .venv-upstream (laminardb 0.17.0):
perf/compare.py does both, alternating, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import pyarrow as pa

import laminardb

FILTER = "CREATE STREAM hot AS SELECT symbol, price, ts FROM trades WHERE price > 0"
OHLC = (
    "CREATE STREAM ohlc AS SELECT symbol, window_start, "
    "FIRST_VALUE(price) AS open, MAX(price) AS high, MIN(price) AS low, LAST_VALUE(price) AS close, "
    "COUNT(*) AS trades FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)"
)


def fresh():
    db = laminardb.open(":memory:")
    db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, ts BIGINT, "
        "WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)"
    )
    return db


def started(db):
    """Streams are declared; start the pipeline (the upstream wheel needs this)."""
    if hasattr(db, "start"):
        db.start()
    return db


def rows_of(batch) -> int:
    if batch is None:
        return 0
    return batch.num_rows if hasattr(batch, "num_rows") else len(batch)


def next_batch(sub, timeout_s: float):
    """The next batch, or None if nothing arrived within timeout_s."""
    try:
        return sub.next_timeout(int(timeout_s * 1000))
    except laminardb.LaminarError:
        return None


def percentiles(ns: list[int]) -> dict:
    a = np.array(ns, dtype=np.float64) / 1000.0
    return {
        "n": len(ns),
        "p50_us": float(np.percentile(a, 50)),
        "p90_us": float(np.percentile(a, 90)),
        "p99_us": float(np.percentile(a, 99)),
        "p999_us": float(np.percentile(a, 99.9)),
        "max_us": float(a.max()),
    }


def latency(n: int, warmup: int) -> dict:
    db = fresh()
    db.execute(FILTER)
    started(db)
    sub = db.subscribe_stream("hot")
    writer = db.writer("trades")
    samples = []
    missing = 0
    deadline = time.perf_counter() + 30.0  # a slow implementation gets fewer samples, not hours
    for i in range(warmup + n):
        if time.perf_counter() > deadline and len(samples) >= 100:
            break
        row = {"symbol": "AAPL", "price": 100.0 + (i % 7), "ts": i}
        t0 = time.perf_counter_ns()
        writer.insert(row)
        if hasattr(writer, "flush"):
            writer.flush()
        batch = next_batch(sub, 2.0)
        t1 = time.perf_counter_ns()
        if rows_of(batch) != 1:
            missing += 1
            if missing > 3:
                break
            continue
        if i >= warmup:
            samples.append(t1 - t0)
    db.close()
    out = percentiles(samples) if samples else {"n": 0}
    out["missing"] = missing
    return out


def arrow_1m(rows: int) -> dict:
    db = fresh()
    db.execute(FILTER)
    started(db)
    sub = db.subscribe_stream("hot")
    table = pa.table(
        {
            "symbol": pa.array(np.array(["AAPL", "MSFT", "GOOG", "AMZN"], dtype=object)[np.arange(rows) % 4], pa.string()),
            "price": pa.array(np.full(rows, 101.5)),
            "ts": pa.array(np.arange(rows, dtype=np.int64)),
        }
    )
    t0 = time.perf_counter()
    db.insert("trades", table)
    seen = 0
    while seen < rows:
        batch = next_batch(sub, 10.0)
        if batch is None:
            break
        seen += rows_of(batch)
    elapsed = time.perf_counter() - t0
    db.close()
    return {"rows": rows, "seen": seen, "ok": seen == rows, "seconds": elapsed, "ms": elapsed * 1000}


def ohlc(rows: int, symbols: int, batch_rows: int) -> dict:
    db = fresh()
    db.execute(OHLC)
    started(db)
    sub = db.subscribe_stream("ohlc")
    rng = np.random.default_rng(3)
    names = np.array([f"S{i:04d}" for i in range(symbols)], dtype=object)
    ts = np.arange(rows, dtype=np.int64) * 10_000 // rows  # 10 s of event time
    sym = names[rng.integers(0, symbols, rows)]
    price = rng.uniform(50, 250, rows)
    batches = [
        pa.table({"symbol": pa.array(sym[i : i + batch_rows], pa.string()), "price": price[i : i + batch_rows], "ts": ts[i : i + batch_rows]})
        for i in range(0, rows, batch_rows)
    ]
    # One closing row moves the watermark past the last window.
    closer = pa.table({"symbol": ["ZZZZ"], "price": [1.0], "ts": [20_000]})
    t0 = time.perf_counter()
    for b in batches:
        db.insert("trades", b)
    db.insert("trades", closer)
    bars = 0
    counted = 0
    last = time.perf_counter()
    while counted < rows:
        batch = next_batch(sub, 5.0)
        if batch is None:
            break
        last = time.perf_counter()
        bars += rows_of(batch)
        counted += int(pa.compute.sum(batch.to_arrow().column("trades")).as_py() or 0)
    elapsed = last - t0  # until the last bar arrived
    db.close()
    return {
        "rows": rows,
        "bars": bars,
        "trades_in_bars": counted,
        "ok": counted == rows,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    n = 2_000 if args.quick else 20_000
    result = {
        "impl": f"laminardb {getattr(laminardb, '__version__', '?')}",
        "python": sys.version.split()[0],
        "latency": latency(n, warmup=200),
        "arrow_1m": arrow_1m(1_000_000),
        "ohlc": ohlc(1_000_000 if args.quick else 5_000_000, 1_000, 100_000),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
