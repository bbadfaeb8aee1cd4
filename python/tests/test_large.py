"""1,000,000-row inserts as one pyarrow batch, a pandas and a polars frame,
checked with exact aggregates."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import laminardb

N = 1_000_000
SUM_ID = N * (N - 1) // 2  # 499_999_500_000
SUM_V = float(sum(range(100)) * (N // 100))  # 49_500_000.0


@pytest.fixture(scope="module")
def big_batch() -> pa.RecordBatch:
    ids = np.arange(N, dtype=np.int64)
    return pa.record_batch(
        {
            "id": ids,
            "v": (ids % 100).astype(np.float64),
            "sym": pa.array(np.where(ids % 2 == 0, "A", "B")),
        }
    )


def _open(shards: int):
    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    conn.execute("CREATE SOURCE big (id BIGINT, v DOUBLE, sym VARCHAR)")
    return conn


def _check(conn, copies: int = 1):
    assert conn.query("SELECT COUNT(*), SUM(id), SUM(v), MIN(id), MAX(id) FROM big").fetchall() == [
        (copies * N, copies * SUM_ID, copies * SUM_V, 0, N - 1)
    ]
    assert conn.query("SELECT sym, COUNT(*) FROM big GROUP BY sym ORDER BY sym").fetchall() == [
        ("A", copies * N // 2),
        ("B", copies * N // 2),
    ]
    st = conn.stats("big")
    assert st["total_events"] == copies * N
    assert sum(st["rows_per_shard"]) == copies * N


@pytest.mark.parametrize("shards", [1, 2])
def test_one_million_rows_pyarrow_batch(big_batch, shards):
    conn = _open(shards)
    try:
        assert conn.insert("big", big_batch) == N
        _check(conn)
    finally:
        conn.close()


def test_one_million_rows_pandas(big_batch):
    df = big_batch.to_pandas()
    assert len(df) == N
    conn = _open(2)
    try:
        assert conn.insert("big", df) == N
        _check(conn)
    finally:
        conn.close()


def test_one_million_rows_polars(big_batch):
    df = pl.from_arrow(big_batch)
    assert df.height == N
    conn = _open(2)
    try:
        assert conn.insert("big", df) == N
        _check(conn)
    finally:
        conn.close()


def test_three_million_rows_mixed_formats(big_batch):
    conn = _open(2)
    try:
        assert conn.insert("big", big_batch) == N
        assert conn.insert("big", big_batch.to_pandas()) == N
        assert conn.insert("big", pl.from_arrow(big_batch)) == N
        _check(conn, copies=3)
        assert conn.query("SELECT COUNT(DISTINCT id) FROM big").fetchall() == [(N,)]
        res = conn.query("SELECT id, v FROM big WHERE id >= 999990 ORDER BY id, v")
        assert res.num_rows == 30
        assert res.fetchmany(3) == [(999990, 90.0)] * 3
    finally:
        conn.close()


def test_one_million_rows_result_export(big_batch):
    conn = _open(2)
    try:
        conn.insert("big", big_batch)
        res = conn.query("SELECT id, v FROM big")
        assert res.num_rows == N
        assert len(res) == N
        t = res.to_arrow()
        assert t.num_rows == N
        assert pc.sum(t.column("id")).as_py() == SUM_ID
        assert pa.table(res).num_rows == N
        assert res.to_polars()["v"].sum() == SUM_V
    finally:
        conn.close()
