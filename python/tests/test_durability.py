"""Issue 5: durability. `open(path)` keeps the catalog, every acknowledged row and every
stream's state across close + reopen and across kill -9; a damaged WAL tail is cut off,
counted and logged, never served; one connection per directory (ConnectionError 102)."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import subprocess
import sys

import pytest

import laminardb
from conftest import all_records, count, drain, poll_batches, records
from crash_harness import run_seed


def reopen(path, shards=2, **kw):
    return laminardb.open(str(path), config=laminardb.LaminarConfig(shards=shards, **kw))


def segments(path, owner="shard-*"):
    return sorted(glob.glob(os.path.join(str(path), "wal", owner, "*.wal")))


def frames_end(data: bytes) -> int:
    """Where the last whole frame of a segment ends (frames: u32 length, u32 crc, body)."""
    at = 0
    while at + 8 <= len(data) and (n := int.from_bytes(data[at:at + 4], "little")) > 0:
        at += 8 + n
    return at


def test_memory_database_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with laminardb.open(":memory:") as db:
        db.execute("CREATE SOURCE t (id BIGINT)")
        db.insert("t", {"id": [1, 2]})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["close", "kill", "kill-fewer-shards"])
def test_reopen_keeps_catalog_rows_and_stream_state(tmp_path, how):
    """Closed: reopened from the checkpoint taken at close. Killed: rebuilt from the WAL
    alone, also with another shard count (rows and keyed state re-partitioned)."""
    path = tmp_path / "db"
    script = """
db.execute("CREATE SOURCE trades (sym VARCHAR, price DOUBLE, ts BIGINT, "
           "WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)")
db.execute("CREATE TABLE refs (sym VARCHAR, name VARCHAR)")
db.execute("CREATE STREAM totals AS SELECT sym, COUNT(*) AS n, SUM(price) AS s FROM trades GROUP BY sym")
db.execute("CREATE STREAM bars AS SELECT sym, COUNT(*) AS n, MAX(price) AS hi FROM trades "
           "GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)")
db.execute("CREATE SINK out FROM totals")
db.insert("refs", [{"sym": "A", "name": "Alpha"}, {"sym": "B", "name": "Beta"}])
db.insert("trades", [{"sym": "A", "price": 1.0, "ts": 100}, {"sym": "B", "price": 2.0, "ts": 200}])
db.insert("trades", [{"sym": "A", "price": 3.0, "ts": 900}])
db.insert("trades", [{"sym": "A", "price": 5.0, "ts": 1500}])  # closes window [0, 1000)
"""
    if how == "close":
        db = reopen(path)
        exec(script, {"db": db})
        db.close()
    else:
        crash_after(path, script)
    shards_after = 1 if how == "kill-fewer-shards" else 2
    with reopen(path, shards=shards_after) as db:
        assert db.metrics().recovered_rows == (0 if how == "close" else 6)
        assert sorted(s.name for s in db.sources()) == ["refs", "trades"]
        assert [s.watermark_column for s in db.sources() if s.name == "trades"] == ["ts"]
        assert sorted(db.list_streams()) == ["bars", "totals"]
        assert db.list_sinks() == ["out"]
        assert count(db, "trades") == 4
        assert records(db.query("SELECT sym, name FROM refs ORDER BY sym"), "sym", "name") == [
            ("A", "Alpha"), ("B", "Beta")]
        assert records(db.query("SELECT sym, n, s FROM totals ORDER BY sym"), "sym", "n", "s") == [
            ("A", 3, 9.0), ("B", 1, 2.0)]
        assert db.source_metrics("trades").watermark == 1500
        # The open window [1000, 2000) kept its row: a bar closed after the reopen counts it.
        sub = db.subscribe_stream("bars")
        db.insert("trades", [{"sym": "A", "price": 4.0, "ts": 1700}, {"sym": "A", "price": 9.0, "ts": 2500}])
        got = poll_batches(sub, lambda b: len(all_records(b, "sym")) >= 1)
        assert all_records(got, "sym", "n", "hi", "window_start") == [("A", 2, 5.0, 1000)]
        sub.cancel()
    # And again: what was added after the first reopen is there too, nothing twice.
    with reopen(path) as db:
        assert count(db, "trades") == 6
        assert records(db.query("SELECT sym, n FROM totals ORDER BY sym"), "sym", "n") == [("A", 5), ("B", 1)]


def test_a_checkpoint_then_a_crash_restores_state_and_replays_only_the_tail(tmp_path):
    path = tmp_path / "db"
    crash_after(path, """
db.execute("CREATE SOURCE e (k BIGINT, v BIGINT)")
db.execute("CREATE STREAM s AS SELECT k, COUNT(*) AS n, SUM(v) AS t FROM e GROUP BY k")
for i in range(30):
    db.insert("e", {"k": [i % 3], "v": [i]})
assert db.checkpoint() == 1
db.insert("e", {"k": [0, 1], "v": [100, 200]})
""", checkpoint_ms=3_600_000)
    with reopen(path, checkpoint_interval_ms=3_600_000) as db:
        # The segments the checkpoint covers are deleted (after it, or at the latest once
        # the reopen has loaded it): only the two written after it are left, one per shard.
        deadline = time.monotonic() + 10
        while len(segments(path)) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(segments(path)) <= 2
        assert db.metrics().recovered_rows == 2
        assert records(db.query("SELECT k, n, t FROM s ORDER BY k"), "k", "n", "t") == [
            (0, 11, 135 + 100), (1, 11, 145 + 200), (2, 10, 155)]
        assert count(db, "e") == 32
        assert db.checkpoint() == 2


def manifest(path):
    crc, body = (path / "MANIFEST").read_text().split("\n", 1)
    return json.loads(body)


# Child-script prologue: a keyed aggregate `s` over source `e`, and three threads inserting
# 64 keys per call until `stop` is set (keyed rows cross the exchange all the time).
KEYED_FEED = """
import json, threading
db.execute("CREATE SOURCE e (k BIGINT, v BIGINT)")
db.execute("CREATE STREAM s AS SELECT k, COUNT(*) AS n, SUM(v) AS t FROM e GROUP BY k")
stop = threading.Event()
def feed(base):
    i = 0
    while not stop.is_set():
        db.insert("e", {"k": list(range(64)), "v": [base + i] * 64})
        i += 1
threads = [threading.Thread(target=feed, args=(b * 1_000_000,)) for b in range(3)]
for t in threads:
    t.start()
"""


def assert_keyed_state_matches_rows(db):
    """Every group of `s` equals what the recovered rows of `e` give: nothing lost, nothing twice."""
    expected = records(db.query("SELECT k, COUNT(*) AS n, SUM(v) AS t FROM e GROUP BY k ORDER BY k"), "k", "n", "t")
    assert len(expected) == 64
    assert records(db.query("SELECT k, n, t FROM s ORDER BY k"), "k", "n", "t") == expected


def test_rows_crossing_the_exchange_at_a_checkpoint_are_recorded_and_applied(tmp_path):
    """Checkpoints taken while keyed rows travel between the shards (3 threads inserting)
    record the rows still in flight to a shard when it snapshotted (the channel state of
    the cut); after a crash, recovery applies them before the WAL tail: each group's
    count and sum equal those of the recovered rows, as if nothing had happened."""
    path = tmp_path / "db"
    crash_after(path, KEYED_FEED + """
def recorded():
    body = open(os.path.join(sys.argv[1], "MANIFEST")).read().split("\\n", 1)[1]
    return any(f.get("channel") for f in json.loads(body)["shard_files"])
for _ in range(1000):
    db.checkpoint()
    if recorded():
        break
stop.set()
for t in threads:
    t.join()
db.insert("e", {"k": [0], "v": [7]})
""", checkpoint_ms=3_600_000)
    assert any(f.get("channel") for f in manifest(path)["shard_files"]), "no checkpoint caught rows in flight"
    with reopen(path) as db:
        assert db.metrics().recovered_rows > 0  # the tail after the checkpoint
        assert_keyed_state_matches_rows(db)


def test_checkpoints_taken_while_keyed_rows_flow_all_complete(tmp_path):
    """A shard can get a peer's checkpoint marker before its own barrier (its command queue
    is behind its exchange inbox): it holds what that peer sends after the marker until
    its own snapshot, and the checkpoint completes. Before that was so, one of these
    checkpoints waited forever now and then. After the crash every row counts once."""
    path = tmp_path / "db"
    crash_after(path, KEYED_FEED + """
for i in range(200):
    assert db.checkpoint() == i + 1
stop.set()
for t in threads:
    t.join()
""", checkpoint_ms=3_600_000, timeout=60)
    with reopen(path) as db:
        assert_keyed_state_matches_rows(db)


def test_a_checkpoint_rewrites_only_the_state_that_changed(tmp_path):
    """Rows are written once (each checkpoint only the new ones); a stream's state file is
    reused while the stream has not changed."""
    with reopen(tmp_path / "db", shards=1, checkpoint_interval_ms=3_600_000) as db:
        db.execute("CREATE SOURCE a (k BIGINT, v BIGINT)")
        db.execute("CREATE SOURCE b (k BIGINT, v BIGINT)")
        db.execute("CREATE STREAM sa AS SELECT k, SUM(v) AS t FROM a GROUP BY k")
        db.execute("CREATE STREAM sb AS SELECT k, SUM(v) AS t FROM b GROUP BY k")
        db.insert("a", {"k": [1, 2], "v": [10, 20]})
        db.insert("b", {"k": [1], "v": [5]})
        assert db.checkpoint() == 1
        first = dict(manifest(tmp_path / "db")["shard_files"][0]["streams"])
        db.insert("a", {"k": [1], "v": [1]})
        assert db.checkpoint() == 2
        second = manifest(tmp_path / "db")
        files = second["shard_files"][0]
        streams = dict(files["streams"])
        assert streams["sb"] == first["sb"]  # unchanged: reused
        assert streams["sa"] != first["sa"] and "-2-" in streams["sa"]
        rows = dict(files["rows"])
        assert len(rows["a"]) == 2 and len(rows["b"]) == 1  # the new row went to a second file
    with reopen(tmp_path / "db", shards=1) as db:
        assert records(db.query("SELECT k, t FROM sa ORDER BY k"), "k", "t") == [(1, 11), (2, 20)]
        assert records(db.query("SELECT k, t FROM sb ORDER BY k"), "k", "t") == [(1, 5)]


def test_drops_and_watermark_calls_are_replayed(tmp_path):
    path = tmp_path / "db"
    with reopen(path) as db:
        db.execute("CREATE SOURCE e (ts BIGINT, v BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
        db.execute("CREATE SOURCE gone (v BIGINT)")
        db.execute("CREATE STREAM s AS SELECT v FROM e WHERE v > 1")
        db.execute("DROP SOURCE gone")
        with db.writer("e") as w:
            w.watermark(50_000)
        sub = db.subscribe("SELECT v FROM e")  # a subscription's stream is not kept
        sub.cancel()
    with reopen(path) as db:
        assert [s.name for s in db.sources()] == ["e"]
        assert db.list_streams() == ["s"]
        assert db.source_metrics("e").watermark == 50_000


def test_a_second_connection_to_the_same_directory_is_refused(tmp_path):
    path = tmp_path / "db"
    db = reopen(path)
    with pytest.raises(laminardb.ConnectionError) as ei:
        reopen(path)
    assert ei.value.code == laminardb.codes.CONNECTION_IN_USE == 102
    probe = (
        "import laminardb, sys\n"
        "try:\n    laminardb.open(sys.argv[1])\nexcept laminardb.ConnectionError as e:\n    print(e.code)\n"
    )
    other = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "102", other.stderr
    db.close()
    with reopen(path) as again:  # closing released the lock
        assert again.metrics().wal_torn_tails == 0


def crash_after(path, script, shards=2, fsync=True, checkpoint_ms=None, timeout=120):
    """Runs `script` (with `db` open on `path`) in a child process that then dies without
    closing: what it did is only in the WAL."""
    code = (
        "import os, sys, laminardb\n"
        f"cfg = laminardb.LaminarConfig(shards={shards}, wal_fsync={fsync}, checkpoint_interval_ms={checkpoint_ms})\n"
        "db = laminardb.open(sys.argv[1], config=cfg)\n"
        f"{script}\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr


def _fill(path, n):
    crash_after(path, f'db.execute("CREATE SOURCE t (id BIGINT)")\nfor i in range({n}): db.insert("t", {{"id": [i]}})', shards=1)


def test_a_torn_tail_is_cut_counted_and_logged(tmp_path, caplog):
    path = tmp_path / "db"
    _fill(path, 10)
    (seg,) = segments(path)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:  # a frame whose later sectors never reached the disk
        f.seek(frames_end(f.read()))
        f.write(b"\x00\x00\x01\x00\x01\x02\x03\x04\x05")
    assert os.path.getsize(seg) == size
    with caplog.at_level(logging.WARNING, logger="laminardb"):
        db = reopen(path, shards=1)
    with db:
        assert db.metrics().wal_torn_tails == 1
        assert count(db, "t") == 10
        assert any("recovery" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    with reopen(path, shards=1) as db:  # truncated: not reported twice
        assert db.metrics().wal_torn_tails == 0
        assert count(db, "t") == 10


def test_a_corrupt_record_is_never_served(tmp_path):
    """A changed byte in the last record is not what a crash leaves (a torn write leaves
    whole sectors unwritten): the open is refused, naming the segment; opted in with
    recovery='truncate' the record is cut and the rest served."""
    path = tmp_path / "db"
    _fill(path, 10)
    (seg,) = segments(path)
    with open(seg, "r+b") as f:
        data = bytearray(f.read())
        data[frames_end(data) - 20] ^= 0xFF  # a bit flip inside the last record
        f.seek(0)
        f.write(data)
    with pytest.raises(laminardb.CheckpointError) as ei:
        reopen(path, shards=1)
    assert os.path.basename(seg) in str(ei.value) and "checksum" in str(ei.value)
    with reopen(path, shards=1, recovery="truncate") as db:
        assert db.metrics().wal_damage_cut == 1
        assert records(db.query("SELECT id FROM t ORDER BY id"), "id") == [(i,) for i in range(9)]
    with reopen(path, shards=1) as db:  # the cut is behind a checkpoint now
        assert count(db, "t") == 9


def test_relaxed_mode_keeps_rows_across_a_crash(tmp_path):
    path = tmp_path / "db"
    crash_after(path, 'db.execute("CREATE SOURCE t (id BIGINT)")\ndb.insert("t", {"id": list(range(1000))})', fsync=False)
    with reopen(path) as db:
        assert count(db, "t") == 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_loses_and_duplicates_no_acknowledged_row(tmp_path, seed):
    """A small run of the crash harness (`python python/tests/crash_harness.py --runs 100`)."""
    out = run_seed(seed, generations=2, threads=2, max_kill_s=0.4, directory=str(tmp_path))
    assert out.acked > 0
    assert out.ok, out


def test_a_damaged_checkpoint_fails_the_open_instead_of_serving_less(tmp_path):
    path = tmp_path / "db"
    with reopen(path) as db:
        db.execute("CREATE SOURCE t (id BIGINT)")
        db.insert("t", {"id": list(range(100))})
    (state,) = [f for f in glob.glob(os.path.join(str(path), "data", "shard-*", "rows-*.arrow"))][:1]
    with open(state, "r+b") as f:
        f.seek(os.path.getsize(state) // 2)  # one byte in the middle of the rows
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(laminardb.LaminarError) as ei:
        reopen(path)
    assert "checkpoint" in str(ei.value).lower()
    with pytest.raises(laminardb.LaminarError):  # still refused: nothing was thrown away
        reopen(path)


def test_the_checkpointed_catalog_holds_live_objects_only_however_many_came_and_went(tmp_path):
    path = str(tmp_path / "db")
    db = laminardb.open(path)
    db.execute("CREATE SOURCE t (k VARCHAR, v BIGINT)")
    for i in range(30):
        db.execute(f"CREATE STREAM s{i} AS SELECT k, v * {i} AS w FROM t")
        db.execute(f"DROP STREAM s{i}")
    db.execute("CREATE STREAM kept AS SELECT k, v FROM t WHERE v > 1")
    db.execute("CREATE STREAM kept2 AS SELECT k, v FROM t")
    db.execute("CREATE OR REPLACE STREAM kept2 AS SELECT k, v + 1 AS v FROM t")
    db.execute("CREATE SOURCE IF NOT EXISTS t (other DOUBLE)")  # exists: changes nothing
    db.insert("t", [{"k": "a", "v": 1}, {"k": "b", "v": 2}])
    db.close()
    with open(os.path.join(path, "MANIFEST")) as f:
        manifest = json.loads(f.read().split("\n", 1)[1])
    assert manifest["ddl"] == [
        "CREATE SOURCE t (k VARCHAR, v BIGINT)",
        "CREATE STREAM kept AS SELECT k, v FROM t WHERE v > 1",
        "CREATE OR REPLACE STREAM kept2 AS SELECT k, v + 1 AS v FROM t",
    ]
    db = laminardb.open(path)
    try:
        assert db.query("SELECT k, v FROM kept").to_dicts() == {"k": ["b"], "v": [2]}
        assert sorted(db.query("SELECT v FROM kept2").to_dicts()["v"]) == [2, 3]
        assert db.query("SELECT COUNT(*) AS n FROM t").to_dicts() == {"n": [2]}
    finally:
        db.close()
