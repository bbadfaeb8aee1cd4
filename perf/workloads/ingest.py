"""Ingest throughput: rows/s until a filter stream's subscriber has seen every row.

Cases, each on a fresh database with a reader thread on the stream: one pyarrow Table,
a pandas DataFrame and a polars DataFrame (1 M rows each, --quick 200 k), 20,000 single
dicts through `db.insert` and 20,000 through `Writer.insert` (--quick 2,000). The clock
runs from the first insert call until the reader has every row; the rows seen must be
the rows sent (count and sum of ts).
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from workloads.common import Case, Collector, Context, open_filtered

STALL_S = 3.0  # no new rows for this long after the last insert: the case is over


def make_table(rows: int) -> pa.Table:
    i = np.arange(rows, dtype=np.int64)
    symbols = np.array(["AAPL", "MSFT", "GOOG", "AMZN"], dtype=object)
    return pa.table(
        {
            "symbol": pa.array(symbols[i % 4], pa.string()),
            "price": pa.array(100.0 + (i % 100) * 0.5),  # all > 0: every row passes the filter
            "ts": pa.array(i),
        }
    )


def run(ctx: Context) -> None:
    bulk = 200_000 if ctx.quick else 1_000_000
    single = 2_000 if ctx.quick else 20_000
    table = make_table(bulk)
    dicts = make_table(single).to_pylist()
    cases: list[tuple[str, Any, Callable[[Any, Any], None]]] = [
        ("pyarrow.Table", table, lambda db, data: db.insert("trades", data)),
        ("pandas.DataFrame", table.to_pandas(), lambda db, data: db.insert("trades", data)),
        ("polars.DataFrame", pl.from_arrow(table), lambda db, data: db.insert("trades", data)),
        ("db.insert(dict)", dicts, insert_each),
        ("Writer.insert(dict)", dicts, write_each),
    ]
    for name, data, insert in cases:
        rows = len(data)
        expected_ts = int(table.column("ts").to_numpy()[:rows].sum())
        ctx.run_case(name, lambda case: ingest(case, ctx, data, rows, expected_ts, insert))


def insert_each(db: Any, rows: list[dict]) -> None:
    for row in rows:
        db.insert("trades", row)


def write_each(db: Any, rows: list[dict]) -> None:
    writer = db.writer("trades")
    for row in rows:
        writer.insert(row)
    writer.flush()


def ingest(
    case: Case, ctx: Context, data: Any, rows: int, expected_ts: int, insert: Callable[[Any, Any], None]
) -> None:
    with closing(open_filtered(ctx.shards)) as db:
        deadline = time.perf_counter() + ctx.budget.left()
        reader = Collector(db.subscribe_stream("hot"), rows, ctx.budget.cap(STALL_S), deadline)
        reader.start()
        t0 = time.perf_counter()
        insert(db, data)
        reader.writer_done()
        seen = reader.finish()
    if not reader.complete(case, "rows"):
        return
    assert seen is not None and reader.done_at is not None
    case.check(seen.num_rows == rows, f"{seen.num_rows:,} rows seen, {rows:,} sent")
    seen_ts = pc.sum(seen.column("ts")).as_py()
    case.check(seen_ts == expected_ts, f"sum(ts) seen {seen_ts:,}, sent {expected_ts:,}")
    elapsed = reader.done_at - t0
    case.metric("rows/s", rows / elapsed, "rows/s", "higher")
    case.metric("time", elapsed * 1000, "ms", "lower")
