"""Resource lifecycle: open/close cycles must not leak threads or file descriptors,
and several connections are independent."""

from __future__ import annotations

import gc
import os

import pytest

import laminardb

CYCLES = 200
THREAD_TOLERANCE = 2
FD_TOLERANCE = 4


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _one_cycle(i: int) -> None:
    if i % 2 == 0:
        conn = laminardb.open(":memory:")
        try:
            conn.execute("CREATE SOURCE t (a BIGINT)")
            conn.insert("t", {"a": [1, 2, 3]})
            assert conn.query("SELECT SUM(a) FROM t").fetchall() == [(6,)]
        finally:
            conn.close()
        assert conn.is_closed
    else:
        with laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1 + i % 3)) as conn:
            conn.execute("CREATE SOURCE t (a BIGINT)")
            with conn.writer("t") as w:
                w.insert({"a": [i]})
            assert conn.query("SELECT a FROM t").fetchall() == [(i,)]
        assert conn.is_closed


def _baseline() -> tuple[int, int]:
    # warm up lazily created process-wide resources (pyarrow pools, ...)
    for i in range(2):
        _one_cycle(i)
    gc.collect()
    return thread_count(), fd_count()


@pytest.fixture(scope="module")
def cycles():
    base_threads, base_fds = _baseline()
    open_conn = laminardb.open(":memory:")
    threads_while_open = thread_count()
    open_conn.close()
    for i in range(CYCLES):
        _one_cycle(i)
    gc.collect()
    return {
        "base_threads": base_threads,
        "base_fds": base_fds,
        "threads_while_open": threads_while_open,
        "threads": thread_count(),
        "fds": fd_count(),
    }


def test_open_connection_owns_engine_threads(cycles):
    # an open connection runs its coordinator/shard threads
    assert cycles["threads_while_open"] > cycles["base_threads"]


def test_threads_return_to_baseline_after_200_cycles(cycles):
    assert cycles["threads"] <= cycles["base_threads"] + THREAD_TOLERANCE, cycles


def test_fds_return_to_baseline_after_200_cycles(cycles):
    assert cycles["fds"] <= cycles["base_fds"] + FD_TOLERANCE, cycles


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_each_open_close_releases_its_fds(shards):
    _baseline()
    before = fd_count()
    for _ in range(10):
        conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.insert("t", {"a": [1]})
        conn.close()
    # A few process-wide fds opened lazily (or closed late by earlier tests' threads) are
    # tolerated; a per-connection leak would show as 10 or more.
    assert fd_count() <= before + 3


def test_unclosed_connections_release_threads_when_dropped():
    base_threads, _ = _baseline()
    for _ in range(20):
        conn = laminardb.open(":memory:")
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.insert("t", {"a": [1]})
        del conn
    gc.collect()
    assert thread_count() <= base_threads + THREAD_TOLERANCE


def test_start_shutdown_close_cycles_release_threads():
    base_threads, _ = _baseline()
    for i in range(20):
        conn = laminardb.open(":memory:")
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.start()
        conn.insert("t", {"a": [i]})
        stream = conn.stream("SELECT a FROM t")
        assert sum(b.num_rows for b in stream) == 1
        conn.shutdown()
        assert conn.pipeline_state == "Stopped"
        conn.close()
    gc.collect()
    assert thread_count() <= base_threads + THREAD_TOLERANCE


def test_several_open_connections_are_independent():
    conns = [laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1 + i % 2)) for i in range(4)]
    try:
        for i, c in enumerate(conns):
            c.execute("CREATE SOURCE x (k BIGINT)")  # same name everywhere
            c.insert("x", {"k": list(range(i + 1))})
            c.execute(f"CREATE SOURCE only_{i} (v DOUBLE)")
        for i, c in enumerate(conns):
            assert c.query("SELECT COUNT(*), SUM(k) FROM x").fetchall() == [(i + 1, i * (i + 1) // 2)]
            assert sorted(c.list_tables()) == sorted(["x", f"only_{i}"])
            assert c.total_events_processed == i + 1
        # closing one leaves the others untouched
        conns[1].close()
        with pytest.raises(laminardb.ConnectionError):
            conns[1].query("SELECT 1")
        assert conns[0].query("SELECT SUM(k) FROM x").fetchall() == [(0,)]
        assert conns[2].query("SELECT SUM(k) FROM x").fetchall() == [(3,)]
        conns[3].insert("x", {"k": [100]})
        assert conns[3].query("SELECT SUM(k) FROM x").fetchall() == [(106,)]
        assert conns[2].query("SELECT SUM(k) FROM x").fetchall() == [(3,)]
        # a panic in one connection does not affect another
        with pytest.raises(laminardb.LaminarError) as ei:
            conns[0]._inject_panic("shard")
        assert ei.value.code == 900
        assert conns[2].query("SELECT COUNT(*) FROM x").fetchall() == [(3,)]
        # pipeline state is per connection
        conns[2].start()
        assert conns[2].pipeline_state == "Running"
        assert conns[3].pipeline_state == "Created"
    finally:
        for c in conns:
            c.close()
