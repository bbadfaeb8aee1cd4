"""Issue 5: retained rows beyond `table_spill_threshold` move to disk (Arrow IPC files,
written off the shards' threads) and stay queryable ad hoc, exactly."""

from __future__ import annotations

import glob
import os
import tempfile
import time

import laminardb
from conftest import records

N = 60_000


def spilled(db, name, at_least, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        st = db.stats(name)
        if st["spilled_rows"] >= at_least or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def fill(db):
    db.execute("CREATE SOURCE t (id BIGINT, sym VARCHAR)")
    db.execute("CREATE STREAM evens AS SELECT id, sym FROM t WHERE id % 2 = 0")
    for start in range(0, N, 3_000):
        ids = list(range(start, start + 3_000))
        db.insert("t", {"id": ids, "sym": [f"S{i % 7}" for i in ids]})


def check_all_rows(db):
    assert records(db.query("SELECT COUNT(*) AS n, SUM(id) AS s, MIN(id) AS lo, MAX(id) AS hi FROM t"),
                   "n", "s", "lo", "hi") == [(N, N * (N - 1) // 2, 0, N - 1)]
    assert records(db.query("SELECT sym, COUNT(*) AS n FROM t GROUP BY sym ORDER BY sym"), "sym", "n") == [
        (f"S{k}", len(range(k, N, 7))) for k in range(7)]
    assert records(db.query("SELECT id FROM t WHERE id IN (0, 1, 29999, 59999) ORDER BY id"), "id") == [
        (0,), (1,), (29_999,), (59_999,)]
    assert records(db.query("SELECT COUNT(*) AS n, SUM(id) AS s FROM evens"), "n", "s") == [
        (N // 2, sum(range(0, N, 2)))]


def test_rows_beyond_the_threshold_spill_to_disk_and_queries_still_see_every_row():
    cfg = laminardb.LaminarConfig(shards=2, table_spill_threshold=10_000)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), f"laminardb-spill-{os.getpid()}-*")))
    with laminardb.open(":memory:", config=cfg) as db:
        fill(db)
        # Each shard keeps at most 5,000 rows of a source in memory: the rest is on disk.
        st = spilled(db, "t", N - 10_000)
        assert st["total_events"] == N
        assert N - 10_000 <= st["spilled_rows"] < N
        dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), f"laminardb-spill-{os.getpid()}-*"))) - before
        assert len(dirs) == 1 and glob.glob(os.path.join(dirs.pop(), "shard-*", "*.arrow"))
        check_all_rows(db)
        # Rows inserted after a spill are read with the spilled ones.
        db.insert("t", {"id": [N], "sym": ["S0"]})
        assert records(db.query("SELECT COUNT(*) AS n FROM t"), "n") == [(N + 1,)]
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), f"laminardb-spill-{os.getpid()}-*"))) == before, "the spill directory outlived close"


def test_below_the_threshold_nothing_spills():
    with laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2)) as db:
        fill(db)
        assert db.stats("t")["spilled_rows"] == 0


def test_spilled_rows_are_checkpointed_and_survive_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    cfg = laminardb.LaminarConfig(shards=2, table_spill_threshold=10_000)
    with laminardb.open(path, config=cfg) as db:
        fill(db)
        spilled(db, "t", N - 10_000)
        assert os.listdir(os.path.join(path, "spill"))
    assert not os.path.exists(os.path.join(path, "spill")), "spill files are not kept across a close"
    with laminardb.open(path, config=cfg) as db:
        # Restored from the checkpoint taken at close (which read the spilled rows back),
        # and spilled again as they load.
        assert db.metrics().recovered_rows == 0
        assert spilled(db, "t", N - 10_000)["spilled_rows"] >= N - 10_000
        check_all_rows(db)
