"""The ASOF join of trades with quotes (issue 24): 1,000 symbols, N trades and N quotes
over the same span, each trade joined with the latest quote of its symbol at or before it.

* laminardb stream: `CREATE STREAM … FROM trades t ASOF JOIN quotes q MATCH_CONDITION(t.ts >=
  q.ts) ON t.symbol = q.symbol`, both sources fed in alternating 8,192-row batches in time
  order, then the watermark moved past the end; input rows/s until the subscriber has every
  joined row. The stream's state stays bounded (quotes below the watermark pruned).
* laminardb ad hoc: the same SELECT over the retained rows.
* pandas `merge_asof` (inputs sorted first, as it requires) and DuckDB `ASOF JOIN` over the
  same rows, as the baselines.

    python perf/asof.py [--rows 1000000] [--rounds 3] [--shards 2]
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


def data(n: int, symbols: int = 1_000) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(5)
    span = n  # one row per ms per side: 1 M rows/s of event time
    trades = pa.table(
        {
            "symbol": pa.array([f"S{i:04d}" for i in rng.integers(0, symbols, n)]),
            "ts": pa.array(BASE + np.sort(rng.integers(0, span, n)), pa.timestamp("ms")),
            "qty": pa.array(rng.integers(1, 1_000, n)),
        }
    )
    quotes = pa.table(
        {
            "symbol": pa.array([f"S{i:04d}" for i in rng.integers(0, symbols, n)]),
            "ts": pa.array(BASE + np.sort(rng.integers(0, span, n)), pa.timestamp("ms")),
            "bid": pa.array(rng.uniform(10, 20, n)),
        }
    )
    return trades, quotes


SELECT = (
    "SELECT t.symbol, t.ts, t.qty, q.bid FROM trades t "
    "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol"
)


def open_db(shards: int):
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    db.execute("CREATE SOURCE trades (symbol VARCHAR, ts TIMESTAMP(3), qty BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
    db.execute("CREATE SOURCE quotes (symbol VARCHAR, ts TIMESTAMP(3), bid DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
    return db


def run_stream(trades: pa.Table, quotes: pa.Table, shards: int, expect: int) -> tuple[float, int, tuple]:
    db = open_db(shards)
    db.execute(f"CREATE STREAM matched AS {SELECT}")
    sub = db.subscribe_stream("matched")
    got = 0
    tb, qb = trades.to_batches(BATCH), quotes.to_batches(BATCH)
    start = time.perf_counter()
    for t, q in zip(tb, qb):
        db.insert("quotes", q)
        db.insert("trades", t)
        while (b := sub.try_next()) is not None:
            got += b.num_rows
    for source in ("trades", "quotes"):
        db.writer(source).watermark(BASE + 10 * len(trades))
    deadline = time.monotonic() + 120
    while got < expect and time.monotonic() < deadline:
        b = sub.next_timeout(1000)
        if b is not None:
            got += b.num_rows
    seconds = time.perf_counter() - start
    db.close()
    return seconds, got, ()


def run_adhoc(trades: pa.Table, quotes: pa.Table, shards: int) -> tuple[float, int]:
    db = open_db(shards)
    db.insert("quotes", quotes)
    db.insert("trades", trades)
    start = time.perf_counter()
    n = db.query(SELECT).to_arrow().num_rows
    seconds = time.perf_counter() - start
    db.close()
    return seconds, n


def run_pandas(trades: pa.Table, quotes: pa.Table) -> tuple[float, int]:
    import pandas as pd

    t, q = trades.to_pandas(), quotes.to_pandas()
    start = time.perf_counter()
    m = pd.merge_asof(t.sort_values("ts"), q.sort_values("ts"), on="ts", by="symbol", direction="backward")
    n = int(m["bid"].notna().sum())
    return time.perf_counter() - start, n


def run_duckdb(trades: pa.Table, quotes: pa.Table) -> tuple[float, int]:
    import duckdb

    con = duckdb.connect()
    con.register("trades", trades)
    con.register("quotes", quotes)
    start = time.perf_counter()
    n = con.execute(
        "SELECT COUNT(*) FROM (SELECT t.symbol, t.ts, t.qty, q.bid FROM trades t "
        "ASOF JOIN quotes q ON t.symbol = q.symbol AND t.ts >= q.ts)"
    ).fetchone()[0]
    return time.perf_counter() - start, n


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--rows", type=int, default=1_000_000)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--shards", type=int, default=2)
    opts = args.parse_args()
    trades, quotes = data(opts.rows)
    inputs = 2 * opts.rows
    results: dict[str, list[float]] = {}
    expect = None
    for r in range(opts.rounds):
        for name in ("pandas merge_asof", "duckdb ASOF JOIN", "laminardb ad hoc", "laminardb stream"):
            if name == "pandas merge_asof":
                s, n = run_pandas(trades, quotes)
            elif name == "duckdb ASOF JOIN":
                s, n = run_duckdb(trades, quotes)
            elif name == "laminardb ad hoc":
                s, n = run_adhoc(trades, quotes, opts.shards)
            else:
                s, n, _ = run_stream(trades, quotes, opts.shards, expect)
            expect = expect if expect is not None else n
            if n != expect:
                raise SystemExit(f"{name}: {n} joined rows, the others {expect}")
            results.setdefault(name, []).append(inputs / s / 1e6)
            print(f"round {r + 1} {name}: {inputs / s / 1e6:.2f} M input rows/s ({n} joined rows)", flush=True)
    print()
    for name, values in results.items():
        print(f"median {name}: {statistics.median(values):.2f} M input rows/s ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
