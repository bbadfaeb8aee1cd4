"""Shared fixtures for the laminardb black-box test suite."""

from __future__ import annotations

import os

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
