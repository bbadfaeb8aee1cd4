"""What the join benchmarks (`asof.py`, `interval_join.py`) share: a stream fed two
sources in alternating batches, the same SELECT ad hoc, DuckDB over the same tables, and
the rounds that run them side by side."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import pyarrow as pa

import laminardb

BATCH = 8_192


def options() -> argparse.Namespace:
    """`--rows` per side, `--rounds`, `--shards`."""
    args = argparse.ArgumentParser()
    args.add_argument("--rows", type=int, default=1_000_000)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--shards", type=int, default=2)
    return args.parse_args()


def open_db(shards: int, ddl: list[str]):
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    for statement in ddl:
        db.execute(statement)
    return db


def run_stream(db, select: str, sides: list[tuple[str, pa.Table]], end_ms: int, expect: int) -> tuple[float, int, int]:
    """`CREATE STREAM … AS select`, fed the sides' tables in alternating `BATCH`-row batches
    (in list order), then every source's watermark moved to `end_ms`; seconds until the
    subscriber has `expect` rows, the rows it got, and the most join state (rows, both
    sides) seen after a batch. Closes `db`."""
    db.execute(f"CREATE STREAM joined AS {select}")
    sub = db.subscribe_stream("joined")
    got = peak = 0
    batches = [table.to_batches(BATCH) for _, table in sides]
    start = time.perf_counter()
    for group in zip(*batches):
        for (name, _), batch in zip(sides, group):
            db.insert(name, batch)
        m = db.stream_metrics("joined")
        peak = max(peak, m.join_left_rows + m.join_right_rows)
        while (b := sub.try_next()) is not None:
            got += b.num_rows
    for name, _ in sides:
        db.writer(name).watermark(end_ms)
    got = wait_for(sub, got, expect)
    seconds = time.perf_counter() - start
    db.close()
    return seconds, got, peak


def wait_for(sub, got: int, expect: int, seconds: float = 120) -> int:
    """Rows taken from `sub` until `got` reaches `expect` (or `seconds` pass); the count."""
    deadline = time.monotonic() + seconds
    while got < expect and time.monotonic() < deadline:
        try:
            b = sub.next_timeout(1000)
        except laminardb.SubscriptionError:
            continue
        if b is None:  # the subscription ended
            break
        got += b.num_rows
    return got


def run_adhoc(db, select: str, tables: list[tuple[str, pa.Table]]) -> tuple[float, int]:
    """The same SELECT over the tables inserted whole; closes `db`."""
    for name, table in tables:
        db.insert(name, table)
    start = time.perf_counter()
    n = db.query(select).to_arrow().num_rows
    seconds = time.perf_counter() - start
    db.close()
    return seconds, n


def run_duckdb(sql: str, tables: list[tuple[str, pa.Table]]) -> tuple[float, int]:
    """`SELECT COUNT(*) FROM (sql)` in DuckDB over the tables registered as they are."""
    import duckdb

    con = duckdb.connect()
    for name, table in tables:
        con.register(name, table)
    start = time.perf_counter()
    n = con.execute(f"SELECT COUNT(*) FROM ({sql})").fetchone()[0]
    return time.perf_counter() - start, n


def rounds(
    runners: dict[str, Callable[[], tuple[float, int]]], count: int, inputs: int, expect: int | dict[str, int] | None = None
) -> None:
    """Runs each runner `count` times in turn (alternating, against the machine's drift),
    checks that all return the same number of joined rows (or each its own, when `expect`
    maps names to counts), and prints input rows/s."""
    results: dict[str, list[float]] = {}
    for r in range(count):
        for name, run in runners.items():
            seconds, n = run()
            if isinstance(expect, dict):
                want = expect[name]
            else:
                want = expect = n if expect is None else expect
            if n != want:
                raise SystemExit(f"{name}: {n} joined rows, expected {want}")
            results.setdefault(name, []).append(inputs / seconds / 1e6)
            print(f"round {r + 1} {name}: {inputs / seconds / 1e6:.2f} M input rows/s ({n} joined rows)", flush=True)
    print()
    for name, values in results.items():
        print(f"median {name}: {statistics.median(values):.2f} M input rows/s ({', '.join(f'{v:.2f}' for v in values)})")
