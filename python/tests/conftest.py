"""Shared fixtures and helpers for the laminardb black-box test suite."""

from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Any, Callable, Iterable

import pytest

# Keep engine panics (from the `_inject_panic` test hook) short in captured output.
os.environ.setdefault("RUST_BACKTRACE", "0")

import laminardb  # noqa: E402

I64_MIN = -(2**63)


@pytest.fixture
def db():
    """A fresh in-memory connection, closed after the test."""
    conn = laminardb.open(":memory:")
    try:
        yield conn
    finally:
        if not conn.is_closed:
            conn.close()


@pytest.fixture(params=[1, 2], ids=["shards=1", "shards=2"])
def sharded_db(request):
    """An in-memory connection with 1 and with 2 shards: results must be identical."""
    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=request.param))
    assert conn.shard_count == request.param
    try:
        yield conn
    finally:
        if not conn.is_closed:
            conn.close()


def count(conn, table: str) -> int:
    """Row count of `table` through SQL."""
    return conn.query(f"SELECT COUNT(*) AS n FROM {table}").fetchall()[0][0]


# =========================================================================== streaming helpers


@pytest.fixture(params=[1, None], ids=["shards=1", "shards=default"])
def shard_db(request):
    """A connection with one shard and one with the default shard count.

    Every test using it compares against hand-computed values, so both runs must agree.
    """
    if request.param is None:
        conn = laminardb.open(":memory:")
    else:
        conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=request.param))
        assert conn.shard_count == request.param
    try:
        yield conn
    finally:
        if not conn.is_closed:
            conn.close()


EPOCH = datetime.datetime(1970, 1, 1)


def at(ms: int) -> datetime.datetime:
    """The naive datetime a TIMESTAMP column returns for `ms` epoch milliseconds."""
    return EPOCH + datetime.timedelta(milliseconds=ms)


class EventTime:
    """An event-time column type: `TIMESTAMP` (values come back as datetimes) or
    `BIGINT` epoch milliseconds (values come back as ints)."""

    def __init__(self, sql_type: str) -> None:
        self.sql_type = sql_type

    def __call__(self, ms: int) -> Any:
        return at(ms) if self.sql_type == "TIMESTAMP" else ms

    def __repr__(self) -> str:
        return self.sql_type


@pytest.fixture(params=["TIMESTAMP", "BIGINT"], ids=["ts=TIMESTAMP", "ts=BIGINT"])
def et(request) -> EventTime:
    """Parametrizes a test over both kinds of event-time column."""
    return EventTime(request.param)


def setup(conn, *ddl: str) -> None:
    """Run DDL statements, then start the pipeline."""
    for stmt in ddl:
        conn.execute(stmt)
    conn.start()


def records(result, *cols: str) -> list[tuple]:
    """Rows of a QueryResult projected on the named columns (in batch order)."""
    names = result.columns
    missing = [c for c in cols if c not in names]
    assert not missing, f"columns {missing} not in {names}"
    return [tuple(row[c] for c in cols) for row in result.to_arrow().to_pylist()]


def all_records(batches: Iterable, *cols: str) -> list[tuple]:
    out: list[tuple] = []
    for b in batches:
        out.extend(records(b, *cols))
    return out


def drain(sub, limit: int = 10_000) -> list:
    """Every batch a subscription has ready now (non-blocking)."""
    out = []
    for _ in range(limit):
        batch = sub.try_next()
        if batch is None:
            return out
        out.append(batch)
    raise AssertionError("subscription never ran dry")


def poll_batches(sub, until: Callable[[list], bool], timeout: float = 10.0) -> list:
    """Poll `try_next()` until `until(batches)` holds or `timeout` seconds pass (no hang)."""
    batches: list = []
    deadline = time.monotonic() + timeout
    while True:
        batch = sub.try_next()
        if batch is not None:
            batches.append(batch)
            if until(batches):
                return batches
            continue
        if until(batches) or time.monotonic() > deadline:
            return batches
        time.sleep(0.005)


def poll_rows(sub, cols: tuple, n: int, timeout: float = 10.0) -> list[tuple]:
    """Collect rows (projected on `cols`) until at least `n` arrived or `timeout` passes,
    then pick up anything else already ready."""
    batches = poll_batches(sub, lambda bs: sum(b.num_rows for b in bs) >= n, timeout)
    batches += drain(sub)
    return all_records(batches, *cols)


def fold_changelog(rows: Iterable[tuple], key_len: int) -> dict:
    """Apply changelog rows `(*values, op)` to a key -> row map, checking that every
    retraction retracts the current row of its key and every insert is for an absent key."""
    state: dict = {}
    for r in rows:
        *vals, op = r
        vals = tuple(vals)
        key = vals[:key_len]
        if op in ("+I", "+U"):
            assert key not in state, f"{op} {vals} while {state[key]} is current"
            state[key] = vals
        elif op in ("-U", "-D"):
            assert state.get(key) == vals, f"{op} {vals} does not retract current {state.get(key)}"
            del state[key]
        else:
            raise AssertionError(f"unknown _op {op!r} in {r}")
    return state


def call_with_timeout(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Run a possibly blocking call on a helper thread; fail instead of hanging."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test thread
            box["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise AssertionError(f"call did not return within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def iterate_to_end(sub, timeout: float = 30.0) -> list:
    """`list(sub)` on a helper thread: every batch until StopIteration, or fail after `timeout`."""
    return call_with_timeout(lambda: list(sub), timeout)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# =========================================================================== services


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A Kafka-protocol broker (tansu) on 127.0.0.1 for the whole run; each test makes
    its own topics with `kafka.create_topic(partitions)`."""
    from kafka_broker import start_broker

    broker = start_broker(str(tmp_path_factory.mktemp("kafka") / "broker.log"))
    try:
        yield broker
    finally:
        broker.stop()
