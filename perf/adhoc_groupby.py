"""Ad-hoc GROUP BY and filter over N retained rows: laminardb vs DuckDB on the same data,
in the same process, alternating runs. Results are checked against each other.

    python perf/adhoc_groupby.py [--rows 10000000] [--runs 5] [--json out.json]

Run it with a release build (tools/perf-setup makes .venv-perf).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import duckdb
import numpy as np
import pyarrow as pa

import laminardb

QUERIES = {
    "group_by": (
        "SELECT symbol, COUNT(*) AS n, SUM(qty) AS qty, AVG(price) AS avg_price, "
        "MIN(price) AS lo, MAX(price) AS hi FROM trades GROUP BY symbol ORDER BY symbol"
    ),
    "filter": "SELECT COUNT(*) AS n, SUM(qty) AS qty FROM trades WHERE price > 150.0 AND qty < 100",
}


def make_table(rows: int, symbols: int) -> pa.Table:
    rng = np.random.default_rng(7)
    names = np.array([f"S{i:04d}" for i in range(symbols)], dtype=object)
    return pa.table(
        {
            "ts": pa.array(np.arange(rows, dtype=np.int64)),
            "symbol": pa.array(names[rng.integers(0, symbols, rows)], pa.string()),
            "price": pa.array(rng.uniform(50, 250, rows)),
            "qty": pa.array(rng.integers(1, 1000, rows, dtype=np.int64)),
        }
    )


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--symbols", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    table = make_table(args.rows, args.symbols)
    db = laminardb.open(":memory:")
    db.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE, qty BIGINT)")
    ingest_s, _ = timed(lambda: db.insert("trades", table))
    duck = duckdb.connect()
    duck.register("arrow_trades", table)
    duck_load_s, _ = timed(lambda: duck.execute("CREATE TABLE trades AS SELECT * FROM arrow_trades"))

    report: dict[str, object] = {
        "rows": args.rows,
        "shards": db.shard_count,
        "laminardb_ingest_s": ingest_s,
        "duckdb_load_s": duck_load_s,
    }
    for name, sql in QUERIES.items():
        ours, theirs = [], []
        for _ in range(args.runs):
            t, lam = timed(lambda: db.query(sql).to_arrow())
            ours.append(t)
            t, dk = timed(lambda: duck.sql(sql).to_arrow_table())
            theirs.append(t)
        lam_rows = lam.to_pylist()
        dk_rows = dk.to_pylist()
        assert len(lam_rows) == len(dk_rows), (name, len(lam_rows), len(dk_rows))
        for a, b in zip(lam_rows, dk_rows):
            for key in a:
                x, y = a[key], b[key]
                if isinstance(x, float):
                    assert abs(x - y) <= 1e-6 * max(1.0, abs(y)), (name, key, x, y)
                else:
                    assert x == y, (name, key, x, y)
        med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
        report[name] = {
            "laminardb_median_s": med_ours,
            "duckdb_median_s": med_theirs,
            "ratio_laminardb_over_duckdb": med_ours / med_theirs,
        }
        print(f"{name:9s} laminardb {med_ours * 1e3:8.1f} ms   duckdb {med_theirs * 1e3:8.1f} ms   "
              f"ratio {med_ours / med_theirs:5.2f}x   (median of {args.runs}, results match)")
    print(f"ingest of {args.rows:,} rows as one Arrow table: {ingest_s * 1e3:.0f} ms "
          f"({args.rows / ingest_s / 1e6:.1f} M rows/s), duckdb load {duck_load_s * 1e3:.0f} ms")
    db.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
