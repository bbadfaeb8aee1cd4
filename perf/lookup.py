"""The lookup join (issue 24): trades enriched from an instruments table outside the engine,
`SELECT t.id, t.qty * i.lot AS shares, i.sector FROM trades t JOIN instruments i ON t.sym =
i.sym`, N trades over 10,000 symbols, every symbol in the table.

* laminardb stream, postgres lookup (default cache: 100,000 rows, one minute): trades fed in
  8,192-row batches; input rows/s until the subscriber has every joined row. After the
  first batches every key is cached.
* the same with `cache.max_rows = 1`: every batch fetches its ~5,600 distinct keys in one
  query, the cost of a cold cache.
* laminardb stream, parquet lookup (the table in memory, no cache).
* a plain-Python client, what one writes without laminardb: per batch, psycopg fetches the
  batch's keys (`WHERE sym = ANY(%s)`), then pandas merges.
* DuckDB joining the same two tables in memory, as the batch baseline.

Needs the machine's PostgreSQL on 127.0.0.1:5432 (trust, database test).

    python perf/lookup.py [--rows 1000000] [--rounds 3] [--shards 2]
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

import laminardb

from join_bench import BATCH, options, rounds, run_duckdb, wait_for

DSN = "postgresql://postgres@127.0.0.1:5432/test"
SYMBOLS = 10_000
TABLE = "perf_lookup_instruments"
SELECT = "SELECT t.id, t.qty * i.lot AS shares, i.sector FROM trades t JOIN instruments i ON t.sym = i.sym"


def data(n: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(5)
    syms = [f"S{i:05d}" for i in range(SYMBOLS)]
    instruments = pa.table(
        {
            "sym": pa.array(syms),
            "sector": pa.array([f"sector{i % 11}" for i in range(SYMBOLS)]),
            "lot": pa.array(rng.integers(1, 100, SYMBOLS), pa.int32()),
        }
    )
    trades = pa.table(
        {
            "id": pa.array(np.arange(n)),
            "sym": pa.array(np.array(syms, dtype=object)[rng.integers(0, SYMBOLS, n)]),
            "qty": pa.array(rng.integers(1, 1000, n)),
        }
    )
    return trades, instruments


def load_postgres(instruments: pa.Table) -> None:
    with psycopg.connect(DSN, autocommit=True) as pg:
        pg.execute(f"DROP TABLE IF EXISTS {TABLE}")
        pg.execute(f"CREATE TABLE {TABLE} (sym text PRIMARY KEY, sector text, lot int)")
        with pg.cursor().copy(f"COPY {TABLE} (sym, sector, lot) FROM STDIN") as copy:
            for row in zip(*(instruments[c].to_pylist() for c in ("sym", "sector", "lot"))):
                copy.write_row(row)


def run_laminardb(shards: int, lookup_ddl: str, trades: pa.Table) -> tuple[float, int]:
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    db.execute("CREATE SOURCE trades (id BIGINT, sym VARCHAR, qty BIGINT)")
    db.execute(lookup_ddl)
    db.execute(f"CREATE STREAM joined AS {SELECT}")
    sub = db.subscribe_stream("joined")
    got = 0
    start = time.perf_counter()
    for batch in trades.to_batches(BATCH):
        db.insert("trades", batch)
        while (b := sub.try_next()) is not None:
            got += b.num_rows
    got = wait_for(sub, got, trades.num_rows)
    seconds = time.perf_counter() - start
    m = db.stream_metrics("joined")
    if m.rejected_rows:
        raise SystemExit(f"rows rejected: {m.last_error}")
    db.close()
    return seconds, got


def run_python_client(trades: pa.Table) -> tuple[float, int]:
    """Per batch: fetch the batch's keys from PostgreSQL, merge with pandas."""
    got = 0
    with psycopg.connect(DSN, autocommit=True) as pg:
        start = time.perf_counter()
        for batch in trades.to_batches(BATCH):
            frame = batch.to_pandas()
            keys = frame["sym"].unique().tolist()
            rows = pg.execute(f"SELECT sym, sector, lot FROM {TABLE} WHERE sym = ANY(%s)", (keys,)).fetchall()
            ref = pd.DataFrame(rows, columns=["sym", "sector", "lot"])
            merged = frame.merge(ref, on="sym")
            merged["shares"] = merged["qty"] * merged["lot"]
            got += len(merged[["id", "shares", "sector"]])
        return time.perf_counter() - start, got


def main() -> None:
    opts = options()
    trades, instruments = data(opts.rows)
    load_postgres(instruments)
    path = os.path.join(tempfile.mkdtemp(), "instruments.parquet")
    pq.write_table(instruments, path)
    columns = "(sym VARCHAR, sector VARCHAR, lot INT)"
    pg = f"CREATE LOOKUP TABLE instruments {columns} WITH (connector = 'postgres', connection = '{DSN}', table = '{TABLE}'"
    rounds(
        {
            "duckdb (in memory)": lambda: run_duckdb(SELECT, [("trades", trades), ("instruments", instruments)]),
            "python client (psycopg + pandas)": lambda: run_python_client(trades),
            "laminardb postgres, cached": lambda: run_laminardb(opts.shards, pg + ")", trades),
            "laminardb postgres, cache of 1 row": lambda: run_laminardb(opts.shards, pg + ", 'cache.max_rows' = '1')", trades),
            "laminardb parquet": lambda: run_laminardb(
                opts.shards, f"CREATE LOOKUP TABLE instruments {columns} WITH (connector = 'parquet', path = '{path}')", trades
            ),
        },
        opts.rounds,
        opts.rows,
        expect=opts.rows,
    )


if __name__ == "__main__":
    main()
