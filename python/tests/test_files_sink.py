"""The `files` sink connector: a stream's rows as Parquet/CSV/JSON-lines files that appear
whole at checkpoints (and at close), read back by pyarrow; after a crash, each row is in
exactly one committed file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.csv
import pyarrow.parquet
import pytest

import laminardb


# Checkpoints taken by `checkpoint()` (and at close), the interval's only out of the way.
CHECKPOINTS_ON_DEMAND = laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000)


def committed(directory) -> list:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def hidden(directory) -> list:
    return sorted(p for p in directory.iterdir() if p.name.startswith("."))


def test_a_stream_is_written_to_parquet_files_that_appear_at_checkpoints(tmp_path):
    out = tmp_path / "out"
    db = laminardb.open(str(tmp_path / "db"), config=CHECKPOINTS_ON_DEMAND)
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    db.execute("CREATE STREAM dear AS SELECT symbol, price FROM trades WHERE price > 10")
    db.execute(f"CREATE SINK dear_files FROM dear WITH (connector = 'files', path = '{out}', format = 'parquet')")
    db.insert("trades", [{"symbol": f"S{i}", "price": float(i)} for i in range(30)])
    assert not out.exists() or committed(out) == []  # nothing whole before a checkpoint
    before = db.sink_metrics("dear_files")
    assert (before.total_bytes, before.last_commit_id, before.last_commit_ms) == (0, None, None)
    checkpoint_id = db.checkpoint()
    files = committed(out)
    assert files and not hidden(out)
    metrics = db.sink_metrics("dear_files")
    # The bytes of the files committed, and the checkpoint that committed them.
    assert metrics.total_bytes == sum(f.stat().st_size for f in files)
    assert metrics.last_commit_id == checkpoint_id
    assert metrics.last_commit_ms is not None and abs(metrics.last_commit_ms - time.time() * 1000) < 60_000
    table = pyarrow.concat_tables([pyarrow.parquet.read_table(f) for f in files])
    assert sorted(table.column("price").to_pylist()) == [float(i) for i in range(11, 30)]
    db.insert("trades", [{"symbol": "Z", "price": 99.0}])
    db.close()
    table = pyarrow.concat_tables([pyarrow.parquet.read_table(f) for f in committed(out)])
    assert table.num_rows == 20


def test_csv_files_of_a_sink_as_select_commit_at_close(tmp_path):
    db = laminardb.open(":memory:")
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    db.execute(
        f"CREATE SINK cheap AS SELECT symbol, price FROM trades WHERE price < 2 "
        f"WITH (connector = 'files', path = '{tmp_path}', format = 'csv')"
    )
    db.insert("trades", [{"symbol": "A", "price": 1.5}, {"symbol": "B", "price": 3.0}, {"symbol": "C", "price": 0.5}])
    db.close()
    rows = [pyarrow.csv.read_csv(f).to_pylist() for f in committed(tmp_path)]
    assert sorted(r["symbol"] for batch in rows for r in batch) == ["A", "C"]


@pytest.mark.parametrize(
    ("with_", "named"),
    [
        ("connector = 'files'", "'path'"),
        ("connector = 'files', path = '/tmp/x', format = 'xml'", "xml"),
        ("connector = 'files', path = '/tmp/x', rolling = '1'", "'rolling'"),
    ],
)
def test_bad_files_sink_options_are_connector_errors(db, with_, named):
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(f"CREATE SINK s FROM trades WITH ({with_})")
    assert named in str(ei.value)


CHILD = textwrap.dedent(
    """
    import sys, laminardb
    db = laminardb.open(sys.argv[1], config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000))
    db.execute("CREATE SOURCE t (v BIGINT)")
    db.execute(f"CREATE SINK out FROM t WITH (connector = 'files', path = '{sys.argv[2]}', format = 'parquet')")
    db.insert("t", [{"v": i} for i in range(0, 100)])
    db.checkpoint()
    db.insert("t", [{"v": i} for i in range(100, 150)])
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_after_a_crash_each_row_is_in_exactly_one_committed_file(tmp_path):
    path, out = str(tmp_path / "db"), tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # Rows 100..149 were written to a file the checkpoint did not commit: it stays hidden.
    assert hidden(out)
    db = laminardb.open(path, config=CHECKPOINTS_ON_DEMAND)
    db.close()  # the replayed rows 100..149 go to new files, committed at close
    assert not hidden(out), "the dead process's unfinished files are gone"
    values = pyarrow.concat_tables([pyarrow.parquet.read_table(f) for f in committed(out)]).column("v").to_pylist()
    assert sorted(values) == list(range(150))
