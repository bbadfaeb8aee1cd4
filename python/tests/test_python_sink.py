"""Python sinks (`connector = 'python'`): a function or an object registered by name gets
every emitted batch (pyarrow, pandas or polars), with open/checkpoint/close hooks; an
exception counts against that sink only."""

from __future__ import annotations

import threading

import pandas as pd
import pyarrow as pa
import pytest

import laminardb
from conftest import wait_until


def test_a_function_gets_every_row_of_a_stream_as_record_batches():
    got: list = []
    lock = threading.Lock()

    def collect(batch):
        assert isinstance(batch, pa.RecordBatch)
        with lock:
            got.extend(batch.to_pylist())

    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.register_sink("collect", collect)
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    db.execute("CREATE SINK dear AS SELECT symbol, price FROM trades WHERE price > 10 WITH (connector = 'python', name = 'collect')")
    db.insert("trades", [{"symbol": f"S{i}", "price": float(i)} for i in range(30)])
    wait_until(lambda: len(got) >= 19)
    metrics = db.sink_metrics("dear")
    db.close()
    assert sorted(r["price"] for r in got) == [float(i) for i in range(11, 30)]
    assert (metrics.connector, metrics.total_events, metrics.errors) == ("python", 19, 0)


class Recorder:
    """A class: one instance per shard, each told its shard, checkpoints and close."""

    instances: list = []

    def __init__(self) -> None:
        self.events: list = []
        self.frames: list = []
        Recorder.instances.append(self)

    def open(self, shard):
        self.events.append(("open", shard))

    def write(self, frame):
        assert isinstance(frame, pd.DataFrame)
        self.frames.append(frame)

    def checkpoint(self, checkpoint_id):
        self.events.append(("checkpoint", checkpoint_id))

    def close(self):
        self.events.append(("close",))


def test_a_class_gets_an_instance_per_shard_with_its_hooks_and_pandas_frames():
    Recorder.instances = []
    laminardb.sink(name="recorder", format="pandas")(Recorder)
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000))
    db.execute("CREATE SOURCE t (v BIGINT)")
    db.execute("CREATE SINK out FROM t WITH (connector = 'python', name = 'recorder')")
    db.insert("t", [{"v": i} for i in range(10)])
    checkpoint = db.checkpoint()
    db.close()
    assert sorted(e[0][1] for e in (r.events for r in Recorder.instances)) == [0, 1]
    for r in Recorder.instances:
        # The checkpoint asked for, the one close() takes, then the close.
        assert r.events[1:] == [("checkpoint", checkpoint), ("checkpoint", checkpoint + 1), ("close",)], r.events
    values = sorted(v for r in Recorder.instances for f in r.frames for v in f["v"])
    assert values == list(range(10))


def test_an_exception_counts_against_its_sink_and_goes_to_on_error_while_others_go_on(db):
    errors: list = []
    good: list = []

    def flaky(batch):
        if 3 in batch.column("v").to_pylist():
            raise ValueError("no threes")

    db.register_sink("flaky", flaky, on_error=errors.append)
    db.register_sink("good", lambda b: good.extend(b.column("v").to_pylist()))
    db.execute("CREATE SOURCE t (v BIGINT)")
    db.execute("CREATE SINK bad FROM t WITH (connector = 'python', name = 'flaky')")
    db.execute("CREATE SINK fine FROM t WITH (connector = 'python', name = 'good')")
    db.insert("t", {"v": 3})
    db.insert("t", {"v": 4})
    wait_until(lambda: len(good) == 2 and errors)
    metrics = db.sink_metrics("bad")
    assert metrics.errors == 1 and "ValueError: no threes" in metrics.last_error
    assert isinstance(errors[0], laminardb.ConnectorError) and isinstance(errors[0].__cause__, ValueError)
    assert metrics.total_events == 1  # the batch with 4
    assert sorted(good) == [3, 4]


def test_unknown_names_bad_registrations_and_stored_databases_are_refused(db, tmp_path):
    db.execute("CREATE SOURCE t (v BIGINT)")
    with pytest.raises(laminardb.ConnectorError, match="nothing is registered as 'nope'"):
        db.execute("CREATE SINK s FROM t WITH (connector = 'python', name = 'nope')")
    with pytest.raises(laminardb.ConnectorError, match="needs the option 'name'"):
        db.execute("CREATE SINK s FROM t WITH (connector = 'python')")
    with pytest.raises(laminardb.ConnectorError, match="format 'xml'"):
        db.register_sink("x", print, format="xml")
    with pytest.raises(laminardb.ConnectorError, match="neither callable"):
        db.register_sink("x", 42)
    stored = laminardb.open(str(tmp_path / "db"))
    stored.register_sink("p", print)
    stored.execute("CREATE SOURCE t (v BIGINT)")
    with pytest.raises(laminardb.LaminarError, match="could not open it again"):
        stored.execute("CREATE SINK s FROM t WITH (connector = 'python', name = 'p')")
    stored.close()
