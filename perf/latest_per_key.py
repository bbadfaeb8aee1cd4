"""The latest quote per symbol as a changelog (issue 24): `SELECT sym, ts, bid, ask FROM (SELECT
…, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY ts DESC) AS rn FROM quotes) WHERE rn = 1`,
N quotes over 1,000 symbols in time order, fed in 8,192-row batches.

* laminardb stream: input rows/s until every batch's changes are out (each batch retracts
  and replaces the quote of each symbol it touches); the state is one row per symbol.
* DuckDB and pandas computing the same latest quotes once over all N rows (batch work,
  the lower bound of what a recomputation costs), as baselines.

    python perf/latest_per_key.py [--rows 1000000] [--rounds 3] [--shards 2]
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

import laminardb

from join_bench import BATCH, options, rounds, run_duckdb

SYMBOLS = 1_000
INNER = "SELECT sym, ts, bid, ask, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY ts DESC) AS rn FROM quotes"
SELECT = f"SELECT sym, ts, bid, ask FROM ({INNER}) WHERE rn = 1"


def data(n: int) -> pa.Table:
    rng = np.random.default_rng(3)
    bid = rng.uniform(10, 20, n)
    return pa.table(
        {
            "sym": pa.array([f"S{i:04d}" for i in rng.integers(0, SYMBOLS, n)]),
            "ts": pa.array(1_700_000_000_000 + np.arange(n)),
            "bid": pa.array(bid),
            "ask": pa.array(bid + 0.01),
        }
    )


def run_stream(shards: int, quotes: pa.Table) -> tuple[float, int]:
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    db.execute("CREATE SOURCE quotes (sym VARCHAR, ts BIGINT, bid DOUBLE, ask DOUBLE)")
    db.execute(f"CREATE STREAM latest AS {SELECT}")
    sub = db.subscribe_stream("latest")
    start = time.perf_counter()
    for batch in quotes.to_batches(BATCH):
        db.insert("quotes", batch)
        while sub.try_next() is not None:
            pass
    seconds = time.perf_counter() - start
    rows = db.query("SELECT COUNT(*) AS n FROM latest").to_arrow().to_pylist()[0]["n"]
    db.close()
    return seconds, rows


def run_pandas(quotes: pa.Table) -> tuple[float, int]:
    frame = quotes.to_pandas()
    start = time.perf_counter()
    latest = frame.sort_values("ts").groupby("sym").tail(1)
    return time.perf_counter() - start, len(latest)


def main() -> None:
    opts = options()
    quotes = data(opts.rows)
    rounds(
        {
            "pandas sort + groupby tail": lambda: run_pandas(quotes),
            "duckdb": lambda: run_duckdb(SELECT, [("quotes", quotes)]),
            "laminardb stream": lambda: run_stream(opts.shards, quotes),
        },
        opts.rounds,
        opts.rows,
        expect=SYMBOLS,
    )


if __name__ == "__main__":
    main()
