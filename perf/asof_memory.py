"""Memory of a streaming ASOF join over a long run (issue 24): trades and quotes over 1,000
symbols, generated with event time moving on (one row per millisecond per side), fed in
8,192-row batches for `--minutes` of wall time, the sources keeping their newest 100,000 rows. Every `--every` seconds it prints the
process's resident memory, the join's state (rows per side) and the rows fed so far: the
state is bounded by the watermark, so resident memory should level off once the
allocator has warmed up, however long the run.

    python perf/asof_memory.py [--minutes 10] [--every 30] [--shards 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa

import laminardb

BASE = 1_700_000_000_000
BATCH = 8_192
SYMBOLS = np.array([f"S{i:04d}" for i in range(1_000)])


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def batch(rng, start: int, value: str) -> pa.RecordBatch:
    ts = BASE + start + np.sort(rng.integers(0, BATCH, BATCH))
    columns = {
        "symbol": pa.array(SYMBOLS[rng.integers(0, len(SYMBOLS), BATCH)]),
        "ts": pa.array(ts, pa.timestamp("ms")),
        value: pa.array(rng.uniform(10, 20, BATCH)) if value == "bid" else pa.array(rng.integers(1, 1_000, BATCH)),
    }
    return pa.RecordBatch.from_pydict(columns)


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--minutes", type=float, default=10)
    args.add_argument("--every", type=float, default=30)
    args.add_argument("--shards", type=int, default=2)
    opts = args.parse_args()
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=opts.shards))
    db.execute("CREATE SOURCE trades (symbol VARCHAR, ts TIMESTAMP(3), qty BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (retention_rows = '100000')")
    db.execute("CREATE SOURCE quotes (symbol VARCHAR, ts TIMESTAMP(3), bid DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (retention_rows = '100000')")
    # The joined rows are counted per symbol in the same stream: a stream keeps the rows
    # it emits, so emitting every joined row would measure that, not the join's state.
    db.execute(
        "CREATE STREAM matched AS SELECT t.symbol, COUNT(*) AS n, SUM(q.bid) AS bids FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol GROUP BY t.symbol"
    )
    rng = np.random.default_rng(1)
    fed = 0
    start = time.monotonic()
    next_report = start
    print("seconds, rss MiB, join left rows, join right rows, input rows fed", flush=True)
    while time.monotonic() - start < opts.minutes * 60:
        db.insert("quotes", batch(rng, fed // 2, "bid"))
        db.insert("trades", batch(rng, fed // 2, "qty"))
        fed += 2 * BATCH
        now = time.monotonic()
        if now >= next_report:
            m = db.stream_metrics("matched")
            print(f"{now - start:.0f}, {rss_mib():.1f}, {m.join_left_rows}, {m.join_right_rows}, {fed}", flush=True)
            next_report += opts.every
    m = db.stream_metrics("matched")
    print(f"{time.monotonic() - start:.0f}, {rss_mib():.1f}, {m.join_left_rows}, {m.join_right_rows}, {fed}", flush=True)
    db.close()


if __name__ == "__main__":
    main()
