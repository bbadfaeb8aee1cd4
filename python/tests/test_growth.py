"""What keeps a long-running database from growing without bound: orphaned temporary
directories of killed processes are removed, and sources keep only their retained rows."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import wait_until

# A child that opens an in-memory database spilling to the temporary directory, prints
# its pid once rows are spilled, then waits to be killed.
SPILLER = textwrap.dedent(
    """
    import sys, time, laminardb
    cfg = laminardb.LaminarConfig(shards=1, table_spill_threshold=10_000)
    db = laminardb.open(":memory:", config=cfg)
    db.execute("CREATE SOURCE t (v BIGINT)")
    for i in range(4):
        db.insert("t", [{"v": v} for v in range(i * 8_000, (i + 1) * 8_000)])
    deadline = time.time() + 20
    while db.stats("t")["spilled_rows"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    print("spilled", db.stats("t")["spilled_rows"], flush=True)
    time.sleep(600)
    """
)


def ours(tmp):
    return sorted(n for n in os.listdir(tmp) if n.startswith("laminardb-spill-"))


def test_a_killed_process_spill_directory_is_removed_at_the_next_open(tmp_path):
    # Before: `laminardb-spill-<pid>-<n>` of a killed process stayed in /tmp for good.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    children = [subprocess.Popen([sys.executable, "-c", SPILLER], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            line = child.stdout.readline().split()
            assert line[0] == "spilled" and int(line[1]) > 0, line
        dirs = {c.pid: [n for n in ours(tmp_path) if n.startswith(f"laminardb-spill-{c.pid}-")] for c in children}
        assert all(len(d) == 1 for d in dirs.values()), dirs
        killed, alive = children
        spill_files = [f for _, _, fs in os.walk(tmp_path / dirs[killed.pid][0]) for f in fs if f.endswith(".arrow")]
        assert spill_files, "the child spilled to its directory"
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert dirs[killed.pid][0] in ours(tmp_path), "a killed process leaves its directory"

        opener = subprocess.run(
            [sys.executable, "-c", "import laminardb; laminardb.open(':memory:').close()"],
            env=env,
            timeout=60,
            capture_output=True,
            text=True,
        )
        assert opener.returncode == 0, opener.stderr
        assert ours(tmp_path) == dirs[alive.pid], "the orphan is gone, the live database's directory stays"
    finally:
        for child in children:
            child.kill()
            child.wait(10)
    opener = subprocess.run(
        [sys.executable, "-c", "import laminardb; laminardb.open(':memory:').close()"], env=env, timeout=60
    )
    assert opener.returncode == 0
    assert ours(tmp_path) == []


# =========================================================================== retention


def one(db, sql):
    return db.query(sql).fetchall()[0]


@pytest.mark.parametrize("shards", [1, 2])
def test_time_retention_drops_rows_behind_the_watermark(shards):
    # Before: every row was kept forever; the option did not exist.
    with laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards)) as db:
        db.execute("CREATE SOURCE t (ts BIGINT, v BIGINT, WATERMARK FOR ts) WITH (retention = '10 seconds')")
        db.insert("t", [{"ts": ts, "v": i} for i, ts in enumerate(range(0, 31_000, 1_000))])
        # watermark 30,000: rows before 20,000 go, 20,000 itself stays
        assert one(db, "SELECT COUNT(*), MIN(ts), MAX(ts) FROM t") == (11, 20_000, 30_000)
        stats = db.stats("t")
        assert (stats["total_events"], stats["expired_rows"]) == (11, 20)
        db.insert("t", [{"ts": 45_000, "v": 99}])
        assert db.query("SELECT ts, v FROM t").fetchall() == [(45_000, 99)]
        assert db.stats("t")["expired_rows"] == 31


@pytest.mark.parametrize("shards", [1, 2])
def test_row_retention_keeps_each_shards_newest_share(shards):
    with laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards)) as db:
        db.execute("CREATE SOURCE t (v BIGINT) WITH (retention_rows = '100')")
        db.insert("t", [{"v": v} for v in range(1_000)])
        kept = sorted(r[0] for r in db.query("SELECT v FROM t").fetchall())
        # one shard: the newest 100; two: rows are dealt out in contiguous halves and
        # each shard keeps its newest 50
        expected = list(range(900, 1_000)) if shards == 1 else list(range(450, 500)) + list(range(950, 1_000))
        assert kept == expected
        assert db.stats("t")["expired_rows"] == 900
        for v in range(1_000, 1_010):  # single-row inserts go round the shards one by one
            db.insert("t", [{"v": v}])
        assert one(db, "SELECT COUNT(*) FROM t") == (100,)
        assert db.stats("t")["expired_rows"] == 910


def test_retention_options_are_checked_at_create(db):
    with pytest.raises(laminardb.LaminarError) as e:
        db.execute("CREATE SOURCE t (ts BIGINT, v BIGINT) WITH (retention = '1 hour')")
    assert e.value.code == codes.INVALID_SCHEMA
    assert "needs a watermark" in str(e.value)
    with pytest.raises(laminardb.LaminarError) as e:
        db.execute("CREATE SOURCE t (v BIGINT) WITH (retention_rows = 'many')")
    assert e.value.code == codes.INVALID_SCHEMA
    with pytest.raises(laminardb.LaminarError) as e:
        db.execute("CREATE SOURCE t (v BIGINT) WITH (retain = '1 hour')")
    assert "unknown option 'retain'" in str(e.value)
    assert db.sources() == []


def test_retention_deletes_wholly_expired_spill_files(tmp_path):
    config = laminardb.LaminarConfig(shards=1, storage_dir=str(tmp_path), table_spill_threshold=1_000)
    with laminardb.open(str(tmp_path), config=config) as db:
        db.execute("CREATE SOURCE t (v BIGINT) WITH (retention_rows = '1500')")
        for i in range(10):
            db.insert("t", pa.table({"v": pa.array(range(i * 1_000, (i + 1) * 1_000), pa.int64())}))
        db.insert("t", [{"v": 10_000}])
        # rows being written to a spill file expire once the file is in (asynchronous)
        wait_until(lambda: db.stats("t")["total_events"] == 1_500, timeout=20)
        assert one(db, "SELECT COUNT(*), MIN(v), MAX(v) FROM t") == (1_500, 8_501, 10_000)
        stats = db.stats("t")
        assert stats["expired_rows"] == 8_501
        spill = glob.glob(str(tmp_path / "spill" / "shard-0" / "*.arrow"))
        assert len(spill) <= 2, spill  # files of expired rows are gone


def test_expired_rows_stay_expired_after_reopen(tmp_path):
    # A checkpoint file whose first rows expired after it was written is still named by
    # the next checkpoint: reopening loads it whole and must drop those rows again.
    def open_db():
        config = laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000)
        return laminardb.open(str(tmp_path), config=config)

    def state(db):
        r = sorted(v for (v,) in db.query("SELECT v FROM r").fetchall())
        w = sorted(ts for (ts,) in db.query("SELECT ts FROM w").fetchall())
        return r, w

    # two shards, rows dealt out in contiguous halves; each shard keeps its newest 50
    r_kept = list(range(465, 500)) + list(range(1_000, 1_015)) + list(range(965, 1_000)) + list(range(1_015, 1_030))
    w_kept = list(range(4_400, 5_000, 100)) + [5_400]
    with open_db() as db:
        db.execute("CREATE SOURCE r (v BIGINT) WITH (retention_rows = '100')")
        db.execute("CREATE SOURCE w (ts BIGINT, WATERMARK FOR ts) WITH (retention = '1 second')")
        db.insert("r", [{"v": v} for v in range(1_000)])
        db.insert("w", [{"ts": ts} for ts in range(0, 5_000, 100)])
        db.checkpoint()
        first_files = glob.glob(str(tmp_path / "data" / "shard-*" / "rows-*.arrow"))
        assert first_files
        db.insert("r", [{"v": v} for v in range(1_000, 1_030)])
        db.insert("w", [{"ts": 5_400}])
        assert state(db) == (sorted(r_kept), w_kept)
        db.checkpoint()
    with open_db() as db:
        assert state(db) == (sorted(r_kept), w_kept)
        assert db.stats("r")["total_events"] == 100
        # now every row of the first checkpoint's files expires: the next checkpoint no
        # longer names them and its collection deletes them
        db.insert("r", [{"v": v} for v in range(2_000, 2_100)])
        db.insert("w", [{"ts": 9_000}])
        db.checkpoint()
        db.checkpoint()  # waits for the previous checkpoint's collection
        left = glob.glob(str(tmp_path / "data" / "shard-*" / "rows-*.arrow"))
    assert not set(first_files) & set(left), "files holding only expired rows are deleted"
    with open_db() as db:
        assert state(db) == (list(range(2_000, 2_100)), [9_000])
