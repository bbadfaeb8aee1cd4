"""The interval join of orders with their fills (issue 24): N orders, one per millisecond of
event time, each filled once within 5 s; `ON o.oid = f.oid AND f.ts BETWEEN o.ts AND o.ts +
INTERVAL '5' SECOND`, so every fill joins exactly one order.

* laminardb stream: both sources fed in alternating 8,192-row batches in time order, then the
  watermark moved past the end; input rows/s until the subscriber has every joined row. The
  state it holds, sampled after each batch, stays near what 5 s of orders and the watermark's
  1 s delay hold, whatever N is.
* laminardb ad hoc: the same SELECT over the retained rows (DataFusion's hash join).
* DuckDB (the same SQL) and pandas (`merge` on the id, then the time filter) over the same
  rows, as the baselines.

    python perf/interval_join.py [--rows 1000000] [--rounds 3] [--shards 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

import laminardb

BASE = 1_700_000_000_000
BATCH = 8_192
SELECT = (
    "SELECT o.oid, o.sym, f.px FROM orders o JOIN fills f "
    "ON o.oid = f.oid AND f.ts BETWEEN o.ts AND o.ts + INTERVAL '5' SECOND"
)


def data(n: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(9)
    ts = BASE + np.arange(n)
    orders = pa.table(
        {
            "oid": pa.array(np.arange(n)),
            "sym": pa.array([f"S{i:03d}" for i in rng.integers(0, 500, n)]),
            "ts": pa.array(ts, pa.timestamp("ms")),
        }
    )
    fill_ts = ts + rng.integers(0, 5_001, n)
    order = np.argsort(fill_ts, kind="stable")
    fills = pa.table(
        {
            "oid": pa.array(np.arange(n)[order]),
            "px": pa.array(rng.uniform(10, 20, n)),
            "ts": pa.array(fill_ts[order], pa.timestamp("ms")),
        }
    )
    return orders, fills


def open_db(shards: int):
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    db.execute("CREATE SOURCE orders (oid BIGINT, sym VARCHAR, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
    db.execute("CREATE SOURCE fills (oid BIGINT, px DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
    return db


def run_stream(orders: pa.Table, fills: pa.Table, shards: int, expect: int) -> tuple[float, int, int]:
    db = open_db(shards)
    db.execute(f"CREATE STREAM filled AS {SELECT}")
    sub = db.subscribe_stream("filled")
    got = 0
    peak = 0
    start = time.perf_counter()
    for o, f in zip(orders.to_batches(BATCH), fills.to_batches(BATCH)):
        db.insert("orders", o)
        db.insert("fills", f)
        m = db.stream_metrics("filled")
        peak = max(peak, m.join_left_rows + m.join_right_rows)
        while (b := sub.try_next()) is not None:
            got += b.num_rows
    for source in ("orders", "fills"):
        db.writer(source).watermark(BASE + 10 * len(orders) + 60_000)
    deadline = time.monotonic() + 120
    while got < expect and time.monotonic() < deadline:
        b = sub.next_timeout(1000)
        if b is not None:
            got += b.num_rows
    seconds = time.perf_counter() - start
    db.close()
    return seconds, got, peak


def run_adhoc(orders: pa.Table, fills: pa.Table, shards: int) -> tuple[float, int]:
    db = open_db(shards)
    db.insert("orders", orders)
    db.insert("fills", fills)
    start = time.perf_counter()
    n = db.query(SELECT).to_arrow().num_rows
    seconds = time.perf_counter() - start
    db.close()
    return seconds, n


def run_pandas(orders: pa.Table, fills: pa.Table) -> tuple[float, int]:
    o, f = orders.to_pandas(), fills.to_pandas()
    start = time.perf_counter()
    m = o.merge(f, on="oid", suffixes=("_o", "_f"))
    m = m[(m["ts_f"] >= m["ts_o"]) & (m["ts_f"] <= m["ts_o"] + np.timedelta64(5, "s"))]
    return time.perf_counter() - start, len(m)


def run_duckdb(orders: pa.Table, fills: pa.Table) -> tuple[float, int]:
    import duckdb

    con = duckdb.connect()
    con.register("orders", orders)
    con.register("fills", fills)
    start = time.perf_counter()
    n = con.execute(f"SELECT COUNT(*) FROM ({SELECT})").fetchone()[0]
    return time.perf_counter() - start, n


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--rows", type=int, default=1_000_000)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--shards", type=int, default=2)
    opts = args.parse_args()
    orders, fills = data(opts.rows)
    inputs = 2 * opts.rows
    results: dict[str, list[float]] = {}
    peaks = []
    for r in range(opts.rounds):
        for name in ("pandas merge + filter", "duckdb", "laminardb ad hoc", "laminardb stream"):
            if name == "pandas merge + filter":
                s, n = run_pandas(orders, fills)
            elif name == "duckdb":
                s, n = run_duckdb(orders, fills)
            elif name == "laminardb ad hoc":
                s, n = run_adhoc(orders, fills, opts.shards)
            else:
                s, n, peak = run_stream(orders, fills, opts.shards, opts.rows)
                peaks.append(peak)
            if n != opts.rows:
                raise SystemExit(f"{name}: {n} joined rows, not {opts.rows}")
            results.setdefault(name, []).append(inputs / s / 1e6)
            print(f"round {r + 1} {name}: {inputs / s / 1e6:.2f} M input rows/s", flush=True)
    print()
    for name, values in results.items():
        print(f"median {name}: {statistics.median(values):.2f} M input rows/s ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"stream join state, peak rows held (both sides): {max(peaks)} of {inputs} fed")


if __name__ == "__main__":
    main()
