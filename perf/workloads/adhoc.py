"""Ad-hoc SQL over retained rows, against DuckDB on the same Arrow table in the same process.

10 M trades (--quick 1 M) over 1,000 symbols are inserted into a source (held in the
shards) and loaded into DuckDB. Cases: `GROUP BY symbol` with COUNT, SUM, AVG, MIN, MAX,
and a filtered COUNT/SUM; each query runs alternately on both engines (median of 5,
--quick 3) and the results must be equal (floats to 1e-6 relative). Also the load:
insert() and a COUNT(*) that must see every row.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import duckdb
import numpy as np
import pyarrow as pa

from workloads.common import Case, Context, open_db

SOURCE = "CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE, qty BIGINT)"
QUERIES = {
    "GROUP BY": (
        "SELECT symbol, COUNT(*) AS n, SUM(qty) AS qty, AVG(price) AS avg_price, "
        "MIN(price) AS lo, MAX(price) AS hi FROM trades GROUP BY symbol ORDER BY symbol"
    ),
    "filter": "SELECT COUNT(*) AS n, SUM(qty) AS qty FROM trades WHERE price > 150.0 AND qty < 100",
}
SYMBOLS = 1_000


def make_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(7)
    names = np.array([f"S{i:04d}" for i in range(SYMBOLS)], dtype=object)
    return pa.table(
        {
            "ts": pa.array(np.arange(rows, dtype=np.int64)),
            "symbol": pa.array(names[rng.integers(0, SYMBOLS, rows)], pa.string()),
            "price": pa.array(rng.uniform(50, 250, rows)),
            "qty": pa.array(rng.integers(1, 1000, rows, dtype=np.int64)),
        }
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(ctx: Context) -> None:
    rows = 1_000_000 if ctx.quick else 10_000_000
    runs = 3 if ctx.quick else 5
    table = make_table(rows)
    db = open_db(ctx.shards)
    duck = duckdb.connect()
    try:
        db.execute(SOURCE)
        ctx.run_case("load", lambda case: load(case, db, duck, table))
        for name, sql in QUERIES.items():
            ctx.run_case(name, lambda case: query(case, db, duck, sql, runs))
    finally:
        db.close()
        duck.close()


def load(case: Case, db: Any, duck: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    """Until the rows are queryable: insert() and a COUNT(*) that must see them all."""

    def insert_and_count() -> int:
        db.insert("trades", table)
        return db.query("SELECT COUNT(*) AS n FROM trades").to_arrow().column("n")[0].as_py()

    seconds, stored = timed(insert_and_count)
    duck.register("arrow_trades", table)
    duck_seconds, _ = timed(lambda: duck.execute("CREATE TABLE trades AS SELECT * FROM arrow_trades"))
    case.check(stored == table.num_rows, f"COUNT(*) = {stored:,} after inserting {table.num_rows:,} rows")
    case.metric("insert + COUNT(*)", seconds * 1000, "ms", "lower")
    case.metric("DuckDB load", duck_seconds * 1000, "ms", None)


def query(case: Case, db: Any, duck: duckdb.DuckDBPyConnection, sql: str, runs: int) -> None:
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(runs):
        seconds, got = timed(lambda: db.query(sql).to_arrow())
        ours.append(seconds)
        seconds, want = timed(lambda: duck.sql(sql).to_arrow_table())
        theirs.append(seconds)
    check_equal(case, got.to_pylist(), want.to_pylist())
    median, duck_median = statistics.median(ours), statistics.median(theirs)
    case.metric("time", median * 1000, "ms", "lower")
    case.metric("DuckDB time", duck_median * 1000, "ms", None)
    case.metric("time ÷ DuckDB's", median / duck_median, "×", "lower")


def check_equal(case: Case, got: list[dict], want: list[dict]) -> None:
    if len(got) != len(want):
        case.fail("wrong", f"{len(got)} rows, DuckDB has {len(want)}")
        return
    for i, (a, b) in enumerate(zip(got, want)):
        if a.keys() != b.keys():
            case.fail("wrong", f"columns {list(a)}, DuckDB has {list(b)}")
            return
        for key, x in a.items():
            y = b[key]
            floats = isinstance(x, float) and isinstance(y, float)
            same = abs(x - y) <= 1e-6 * max(1.0, abs(y)) if floats else x == y
            if not same:
                case.fail("wrong", f"row {i} {key}: {x!r}, DuckDB has {y!r}")
                return
