"""Issue 20, item 3: damaged storage is never opened short. After kill -9, damage to
acknowledged data (a missing or emptied WAL segment, a changed byte before the end of what
was written, a missing or damaged MANIFEST) refuses the open with a CheckpointError naming
the file, unless the database is opened with LaminarConfig(recovery='truncate'), which cuts
the log at the damage, keeps what precedes it and reports what was lost. A torn tail (what
a crash leaves of a write in flight) is still cut, counted and logged."""

from __future__ import annotations

import glob
import logging
import os

import pytest

import laminardb
from conftest import count
from crash_harness import run_damage_seed
from test_durability import crash_after, frames_end, reopen, segments

ROWS_PER_INSERT = 516
INSERTS = 100  # 51,600 rows, each insert split over both shards


def _fill(path, checkpoint=False):
    script = (
        'db.execute("CREATE SOURCE t (id BIGINT)")\n'
        f"for i in range({INSERTS}):\n"
        f'    db.insert("t", {{"id": list(range(i * {ROWS_PER_INSERT}, (i + 1) * {ROWS_PER_INSERT}))}})\n'
    )
    if checkpoint:
        script += 'db.checkpoint()\ndb.insert("t", {"id": [-1, -2, -3, -4]})\n'
    crash_after(path, script, shards=2, checkpoint_ms=3_600_000 if checkpoint else None)


def _refused(path) -> str:
    with pytest.raises(laminardb.CheckpointError) as ei:
        reopen(path)
    return str(ei.value)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_wal_segment_of_one_shard_refuses_the_open(tmp_path, how):
    """Was: 0 of 51,600 acknowledged rows came back, with no log line. The other shard's
    records prove the lost inserts were acknowledged."""
    path = tmp_path / "db"
    _fill(path)
    (seg,) = segments(path, "shard-0")
    if how == "deleted":
        os.remove(seg)
    else:
        open(seg, "wb").close()
    message = _refused(path)
    assert os.path.join("wal", "shard-0") in message and "acknowledged" in message, message
    assert _refused(path) == message  # refusing changed nothing on disk
    if how == "emptied":
        assert os.path.getsize(seg) == 0
    # Opted in: whatever precedes the damage is kept (here nothing: every insert had a
    # part on shard 0), what was dropped is reported, and no row is served twice.
    with reopen(path, recovery="truncate") as db:
        assert db.metrics().wal_damage_cut == 1
        assert db.metrics().wal_rows_dropped == INSERTS * ROWS_PER_INSERT // 2
        assert count(db, "t") == 0
    with reopen(path) as db:  # the cut is behind the checkpoint taken at that open
        assert db.metrics().wal_damage_cut == 0
        db.insert("t", {"id": [1]})
        assert count(db, "t") == 1


def test_a_deleted_manifest_refuses_the_open(tmp_path):
    """Was: the database opened as new and empty."""
    path = tmp_path / "db"
    _fill(path, checkpoint=True)
    os.remove(path / "MANIFEST")
    message = _refused(path)
    assert "MANIFEST" in message and "missing" in message, message
    # A checkpoint cannot be cut around: the WAL it replaced is gone.
    with pytest.raises(laminardb.CheckpointError):
        reopen(path, recovery="truncate")


def test_a_deleted_manifest_with_part_of_the_wal_cleaned_up_refuses_the_open_naming_it(tmp_path):
    """Was (a flake under load): when the crash came while a checkpoint's cleanup had deleted
    the control log's segments but not yet the shards', the refusal named only wal/control."""
    import shutil

    # The state such a crash leaves: the checkpoint's files, no MANIFEST, the shards' logs
    # still whole from their start, the control log's segments gone.
    checkpointed, path = tmp_path / "checkpointed", tmp_path / "db"
    _fill(checkpointed, checkpoint=True)
    _fill(path)
    shutil.copytree(checkpointed / "data", path / "data")
    assert not (path / "MANIFEST").exists()
    controls = glob.glob(str(path / "wal" / "control" / "*.wal"))
    assert controls
    for seg in controls:
        os.remove(seg)
    message = _refused(path)
    assert "MANIFEST" in message and "missing" in message, message
    with pytest.raises(laminardb.CheckpointError):
        reopen(path, recovery="truncate")


def test_a_flipped_byte_in_the_manifest_names_it(tmp_path):
    """Was: error 900 "stream did not contain valid UTF-8"."""
    path = tmp_path / "db"
    _fill(path, checkpoint=True)
    data = bytearray((path / "MANIFEST").read_bytes())
    data[len(data) // 2] ^= 0x80
    (path / "MANIFEST").write_bytes(bytes(data))
    message = _refused(path)
    assert str(path / "MANIFEST") in message and "checksum mismatch" in message, message
    assert "UTF-8" not in message


def test_a_flipped_byte_mid_wal_refuses_the_open_and_truncate_keeps_the_prefix(tmp_path, caplog):
    """Was: every shard was cut to that point with one warning."""
    path = tmp_path / "db"
    _fill(path)
    (seg,) = segments(path, "shard-1")
    with open(seg, "r+b") as f:
        data = bytearray(f.read())
        at = frames_end(data) // 2
        data[at] ^= 0x01
        f.seek(0)
        f.write(data)
    message = _refused(path)
    assert os.path.basename(seg) in message and "before a later write" in message, message
    with caplog.at_level(logging.WARNING, logger="laminardb"):
        db = reopen(path, recovery="truncate")
    with db:
        kept = count(db, "t")
        m = db.metrics()
        assert m.wal_damage_cut == 1 and m.wal_rows_dropped > 0
        # A prefix of whole inserts, in order: ids 0 .. kept-1, nothing else.
        assert kept % ROWS_PER_INSERT == 0 and 0 < kept < INSERTS * ROWS_PER_INSERT
        assert db.query("SELECT MIN(id) AS lo, MAX(id) AS hi, COUNT(DISTINCT id) AS n FROM t").to_dicts() == {
            "lo": [0], "hi": [kept - 1], "n": [kept]}
        assert any(os.path.basename(seg) in r.getMessage() and "cut" in r.getMessage() for r in caplog.records)
    # The damaged segment was kept aside for inspection.
    assert glob.glob(os.path.join(os.path.dirname(seg), "*.wal.corrupt"))


def test_a_torn_tail_after_a_kill_still_opens(tmp_path):
    """What a crash leaves (the last write of a shard's newest segment, its later sectors
    never written) is still cut without refusing."""
    path = tmp_path / "db"
    _fill(path)
    (seg,) = segments(path, "shard-0")
    with open(seg, "r+b") as f:
        data = bytearray(f.read())
        end = frames_end(data)
        # A frame begun at the end whose body's sectors never reached the disk.
        f.seek(end)
        f.write((100_000).to_bytes(4, "little") + b"\x01\x02\x03\x04" + b"\x07" * 3)
    with reopen(path) as db:
        assert db.metrics().wal_torn_tails == 1
        assert count(db, "t") == INSERTS * ROWS_PER_INSERT


def test_recovery_mode_is_validated():
    assert laminardb.LaminarConfig().recovery == "strict"
    assert laminardb.LaminarConfig(recovery="truncate").recovery == "truncate"
    with pytest.raises(ValueError, match="strict"):
        laminardb.LaminarConfig(recovery="lenient")


@pytest.mark.parametrize("seed", range(5))
def test_random_damage_after_kill_9_never_opens_short_silently(tmp_path, seed):
    """A small run of `python python/tests/crash_harness.py --damage --runs 100`."""
    out = run_damage_seed(seed, threads=2, max_kill_s=0.4, directory=str(tmp_path))
    assert out.acked > 0
    assert out.ok, out
