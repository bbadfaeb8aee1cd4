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

import time

import numpy as np
import pyarrow as pa

from join_bench import open_db, options, rounds, run_adhoc, run_duckdb, run_stream

BASE = 1_700_000_000_000
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


DDL = [
    "CREATE SOURCE orders (oid BIGINT, sym VARCHAR, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)",
    "CREATE SOURCE fills (oid BIGINT, px DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)",
]


def run_pandas(orders: pa.Table, fills: pa.Table) -> tuple[float, int]:
    o, f = orders.to_pandas(), fills.to_pandas()
    start = time.perf_counter()
    m = o.merge(f, on="oid", suffixes=("_o", "_f"))
    m = m[(m["ts_f"] >= m["ts_o"]) & (m["ts_f"] <= m["ts_o"] + np.timedelta64(5, "s"))]
    return time.perf_counter() - start, len(m)


def main() -> None:
    opts = options()
    orders, fills = data(opts.rows)
    tables = [("orders", orders), ("fills", fills)]
    end = BASE + 10 * len(orders) + 60_000
    peaks = []

    def stream() -> tuple[float, int]:
        seconds, n, peak = run_stream(open_db(opts.shards, DDL), SELECT, tables, end, opts.rows)
        peaks.append(peak)
        return seconds, n

    rounds(
        {
            "pandas merge + filter": lambda: run_pandas(orders, fills),
            "duckdb": lambda: run_duckdb(SELECT, tables),
            "laminardb ad hoc": lambda: run_adhoc(open_db(opts.shards, DDL), SELECT, tables),
            "laminardb stream": stream,
        },
        opts.rounds,
        2 * opts.rows,
        expect=opts.rows,
    )
    print(f"stream join state, peak rows held (both sides): {max(peaks)} of {2 * opts.rows} fed")


if __name__ == "__main__":
    main()
