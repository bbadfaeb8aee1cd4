"""Python UDFs in a filter stream: 1 M trades inserted in batches into a source read by
`CREATE STREAM … WHERE <condition>`, the condition written in SQL, as a vectorized UDF
(pyarrow compute) and as a row-at-a-time UDF. `insert()` returns once its rows have passed
the stream, so rows/s is the stream's. Beside it, DuckDB over the same table with the same
condition in SQL and as an Arrow UDF (its vectorized Python functions), as the reference
ratio. Then the cost of one crossing into Python: an identity UDF against the same column
in SQL, over many 1-row inserts.

    .venv-perf/bin/python perf/udf.py [--rows 1000000] [--batch 8192] [--rounds 3] [--shards 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import laminardb

THRESHOLD = 5_000.0


def table(rows: int) -> pa.Table:
    rng = np.random.default_rng(7)
    return pa.table(
        {
            "symbol": pa.array([f"S{i % 100:02d}" for i in range(rows)]),
            "price": pa.array(rng.uniform(10, 200, rows)),
            "qty": pa.array(rng.integers(1, 100, rows).astype(np.float64)),
        }
    )


def dear_vectorized(price, qty):
    return pc.greater(pc.multiply(price, qty), THRESHOLD)


def dear_rows(price, qty):
    return price * qty > THRESHOLD


CONDITIONS = {
    "sql": "price * qty > 5000.0",
    "udf vectorized": "dear(price, qty)",
    "udf row by row": "dear_rows(price, qty)",
}


def run_ours(kind: str, data: pa.Table, batch: int, shards: int = 2) -> tuple[float, int]:
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    db.register_udf("dear", dear_vectorized, pa.bool_())
    db.register_udf("dear_rows", dear_rows, pa.bool_(), vectorized=False)
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty DOUBLE)")
    db.execute(f"CREATE STREAM dear_trades AS SELECT symbol, price, qty FROM trades WHERE {CONDITIONS[kind]}")
    batches = data.to_batches(max_chunksize=batch)
    start = time.perf_counter()
    for b in batches:
        db.insert("trades", b)
    elapsed = time.perf_counter() - start
    out = db.stream_metrics("dear_trades").total_events
    db.close()
    return elapsed, out


def run_duckdb(kind: str, data: pa.Table) -> tuple[float, int]:
    import duckdb

    con = duckdb.connect()
    con.create_function("dear", dear_vectorized, ["DOUBLE", "DOUBLE"], "BOOLEAN", type="arrow")
    con.register("trades", data)
    condition = CONDITIONS["sql"] if kind == "sql" else "dear(price, qty)"
    start = time.perf_counter()
    out = con.execute(f"SELECT count(*) FROM (SELECT symbol, price, qty FROM trades WHERE {condition})").fetchone()[0]
    return time.perf_counter() - start, out


def crossing(n: int) -> tuple[float, float]:
    """µs per 1-row insert through a stream projecting `price` in SQL, and through an
    identity UDF."""
    times = []
    for udf in (False, True):
        db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1))
        db.register_udf("same", lambda v: v, pa.float64())
        db.execute("CREATE SOURCE t (price DOUBLE)")
        db.execute(f"CREATE STREAM s AS SELECT {'same(price)' if udf else 'price'} AS p FROM t")
        row = pa.record_batch({"price": [1.0]})
        for _ in range(200):
            db.insert("t", row)
        start = time.perf_counter()
        for _ in range(n):
            db.insert("t", row)
        times.append((time.perf_counter() - start) / n * 1e6)
        db.close()
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    data = table(args.rows)
    expected = int(pc.sum(pc.greater(pc.multiply(data["price"], data["qty"]), THRESHOLD)).as_py())
    rates: dict = {}
    for r in range(args.rounds):
        for kind in CONDITIONS:
            rows = args.rows if kind != "udf row by row" else args.rows // 10
            seconds, out = run_ours(kind, data.slice(0, rows), args.batch, args.shards)
            want = expected if rows == args.rows else int(
                pc.sum(pc.greater(pc.multiply(data["price"][:rows], data["qty"][:rows]), THRESHOLD)).as_py()
            )
            if out != want:
                raise SystemExit(f"{kind}: {out} rows out, expected {want}")
            rates.setdefault(f"laminardb {kind}", []).append(rows / seconds)
        for kind in ("sql", "udf"):
            seconds, out = run_duckdb(kind, data)
            if out != expected:
                raise SystemExit(f"duckdb {kind}: {out} rows, expected {expected}")
            rates.setdefault(f"duckdb {kind}", []).append(args.rows / seconds)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] / 1e6:.2f} M/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        print(f"median {k}: {v / 1e6:.3f} M rows/s ({', '.join(f'{x / 1e6:.2f}' for x in rates[k])})")
    print(f"laminardb: vectorized UDF / SQL = {med['laminardb udf vectorized'] / med['laminardb sql']:.2f}; "
          f"row by row / SQL = {med['laminardb udf row by row'] / med['laminardb sql']:.3f}")
    print(f"duckdb: Arrow UDF / SQL = {med['duckdb udf'] / med['duckdb sql']:.2f}")
    sql_us, udf_us = crossing(5_000)
    print(f"1-row insert through the stream: {sql_us:.1f} µs (SQL), {udf_us:.1f} µs (identity UDF): "
          f"{udf_us - sql_us:.1f} µs per crossing into Python")


if __name__ == "__main__":
    main()
