"""Python sources (`@laminardb.source`, `register_source`): generators (of dicts, lists,
batches; sync or async) feed a source from `start()` on, with watermarks, backpressure and
metrics; a generator's exception is the source's error."""

from __future__ import annotations

import asyncio
import threading
import time

import pyarrow as pa
import pytest

import laminardb
from conftest import poll_rows, wait_until

TRADES = pa.schema([("symbol", pa.string()), ("price", pa.float64()), ("ts", pa.int64())])


@laminardb.source(schema=TRADES, watermark="ts")
def ticks():
    for i in range(20):
        yield {"symbol": "A" if i % 2 else "B", "price": float(i), "ts": i * 500}
    # A batch at once, and a list of rows.
    yield pa.record_batch({"symbol": ["A", "B"], "price": [100.0, 200.0], "ts": [10_000, 10_000]}, schema=TRADES)
    yield [{"symbol": "Z", "price": 0.0, "ts": 60_000}]


def test_a_generator_feeds_a_source_with_watermarks_from_start_on(db):
    db.register_source("trades", ticks)
    assert "trades" in db.list_tables()
    db.execute(
        "CREATE STREAM bars AS SELECT symbol, window_start, COUNT(*) AS n, SUM(price) AS total "
        "FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '5' SECOND)"
    )
    sub = db.subscribe_stream("bars")
    assert db.query("SELECT COUNT(*) AS n FROM trades").to_dicts() == {"n": [0]}  # nothing before start()
    db.start()
    wait_until(lambda: db.source_metrics("trades").total_events == 23)
    bars = sorted(poll_rows(sub, ("symbol", "window_start", "n", "total"), 4))
    # 0..9.5 s: two 5 s windows per symbol, then the batch's 10 s window (closed by the Z at 60 s).
    assert [b for b in bars if b[0] in "AB" and b[1] < 10_000] == [
        ("A", 0, 5, 1.0 + 3 + 5 + 7 + 9),
        ("A", 5_000, 5, 11.0 + 13 + 15 + 17 + 19),
        ("B", 0, 5, 0.0 + 2 + 4 + 6 + 8),
        ("B", 5_000, 5, 10.0 + 12 + 14 + 16 + 18),
    ]


def test_an_async_generator_and_a_source_registered_after_start(db):
    async def feed():
        for i in range(5):
            await asyncio.sleep(0)
            yield {"v": i}

    db.start()
    db.register_source("nums", feed, schema={"v": "BIGINT"})
    wait_until(lambda: db.source_metrics("nums").total_events == 5)
    assert sorted(db.query("SELECT v FROM nums").to_dicts()["v"]) == [0, 1, 2, 3, 4]


def test_a_pipeline_that_cannot_take_rows_holds_the_generator_back(db):
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield {"v": i}
            i += 1

    gate = threading.Event()
    db.register_udf("slow", lambda v: (gate.wait(), v)[1], pa.int64())
    db.register_source("endless", endless, schema={"v": "BIGINT"})
    db.execute("CREATE STREAM held AS SELECT slow(v) AS v FROM endless")
    db.start()
    assert wait_until(lambda: len(pulled) >= 1)
    time.sleep(0.5)
    # The stream's function waits on the gate: the first row's insert cannot finish, so
    # the generator is not pulled on.
    held = len(pulled)
    assert held <= 2, held
    gate.set()
    assert wait_until(lambda: len(pulled) > held + 100)
    assert wait_until(lambda: db.stream_metrics("held").total_events > 100)


def test_a_generator_error_is_the_sources_error(db):
    errors: list = []

    def broken():
        yield {"v": 1}
        raise RuntimeError("feed lost")

    db.register_source("b", broken, schema={"v": "BIGINT"}, on_error=errors.append)
    db.start()
    wait_until(lambda: errors)
    metrics = db.source_metrics("b")
    assert isinstance(errors[0], laminardb.ConnectorError) and isinstance(errors[0].__cause__, RuntimeError)
    assert metrics.errors == 1 and "RuntimeError: feed lost" in metrics.last_error
    assert db.query("SELECT v FROM b").to_dicts() == {"v": [1]}


def test_a_source_needs_a_schema(db):
    with pytest.raises(laminardb.ConnectorError, match="needs a schema"):
        db.register_source("x", lambda: iter([]))
