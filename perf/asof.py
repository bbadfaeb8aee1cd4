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

import time

import numpy as np
import pyarrow as pa

from join_bench import open_db, options, rounds, run_adhoc, run_duckdb, run_stream

BASE = 1_700_000_000_000


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
DDL = [
    "CREATE SOURCE trades (symbol VARCHAR, ts TIMESTAMP(3), qty BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)",
    "CREATE SOURCE quotes (symbol VARCHAR, ts TIMESTAMP(3), bid DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)",
]


def run_pandas(trades: pa.Table, quotes: pa.Table) -> tuple[float, int]:
    import pandas as pd

    t, q = trades.to_pandas(), quotes.to_pandas()
    start = time.perf_counter()
    m = pd.merge_asof(t.sort_values("ts"), q.sort_values("ts"), on="ts", by="symbol", direction="backward")
    n = int(m["bid"].notna().sum())
    return time.perf_counter() - start, n


def main() -> None:
    opts = options()
    trades, quotes = data(opts.rows)
    tables = [("quotes", quotes), ("trades", trades)]
    end = BASE + 10 * len(trades)
    expect = run_pandas(trades, quotes)[1]
    duckdb_sql = "SELECT t.symbol, t.ts, t.qty, q.bid FROM trades t ASOF JOIN quotes q ON t.symbol = q.symbol AND t.ts >= q.ts"
    rounds(
        {
            "pandas merge_asof": lambda: run_pandas(trades, quotes),
            "duckdb ASOF JOIN": lambda: run_duckdb(duckdb_sql, tables),
            "laminardb ad hoc": lambda: run_adhoc(open_db(opts.shards, DDL), SELECT, tables),
            "laminardb stream": lambda: run_stream(open_db(opts.shards, DDL), SELECT, tables, end, expect)[:2],
        },
        opts.rounds,
        2 * opts.rows,
        expect,
    )


if __name__ == "__main__":
    main()
