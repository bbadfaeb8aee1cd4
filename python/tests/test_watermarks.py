"""F-PY-008: watermarks. A source's watermark is the largest event time over its accepted
rows minus the declared delay (`WATERMARK FOR ts AS ts - INTERVAL …`), in epoch
milliseconds for TIMESTAMP and BIGINT columns alike; `Writer.watermark(ms)` sets it
explicitly; it never moves back. Windows close when the watermark reaches their end."""

from __future__ import annotations

import time

import pytest

import laminardb
from conftest import I64_MIN, drain, poll_rows, setup


def source_watermark(db, name):
    m = db.source_metrics(name)
    assert m is not None
    return m.watermark


def put(db, table, *rows):
    """Insert (ts_ms, sym, v) tuples as one insert."""
    db.insert(table, [{"ts": t, "sym": s, "v": v} for t, s, v in rows])


# --------------------------------------------------------------------------- declaration


def test_watermark_column_in_source_info(db):
    db.execute("CREATE SOURCE a (ts TIMESTAMP, v DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
    db.execute("CREATE SOURCE b (ts BIGINT, v DOUBLE, WATERMARK FOR ts)")
    db.execute("CREATE SOURCE c (event_time BIGINT, v DOUBLE) WITH (watermark_column = 'event_time')")
    db.execute("CREATE SOURCE d (ts BIGINT, v DOUBLE)")
    infos = {s.name: s for s in db.sources()}
    assert isinstance(infos["a"], laminardb.SourceInfo)
    assert infos["a"].watermark_column == "ts"
    assert infos["b"].watermark_column == "ts"
    assert infos["c"].watermark_column == "event_time"
    assert infos["d"].watermark_column is None


def test_watermark_on_unknown_or_non_time_column_is_rejected(db):
    with pytest.raises(laminardb.LaminarError):
        db.execute("CREATE SOURCE a (ts BIGINT, WATERMARK FOR nope)")
    with pytest.raises(laminardb.LaminarError):
        db.execute("CREATE SOURCE b (ts BIGINT, name VARCHAR) WITH (watermark_column = 'name')")
    assert db.list_tables() == []


# --------------------------------------------------------------------------- derived from rows


def test_source_watermark_is_max_event_time_minus_delay(shard_db, et):
    db = shard_db
    db.execute(
        f"CREATE SOURCE e (ts {et.sql_type}, sym VARCHAR, v DOUBLE, "
        "WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
    )
    assert source_watermark(db, "e") == I64_MIN
    # several keys, so with several shards the rows land on different shards
    put(db, "e", *[(1_000 + 500 * i, f"K{i}", 1.0) for i in range(8)] + [(3_000, "K9", 1.0)])
    expected = 1_000 + 500 * 7 - 1_000  # max event time 4.5 s, minus 1 s
    assert source_watermark(db, "e") == expected
    assert db.stats("e")["watermark"] == expected
    assert db.pipeline_watermark == expected
    assert db.metrics().pipeline_watermark == expected
    # an older row does not move it back
    put(db, "e", (2_000, "K1", 1.0))
    assert source_watermark(db, "e") == expected
    put(db, "e", (7_250, "K3", 1.0))
    assert source_watermark(db, "e") == 6_250
    assert db.pipeline_watermark == 6_250


@pytest.mark.parametrize(
    "clause,delay",
    [
        ("WATERMARK FOR ts", 0),
        ("WATERMARK FOR ts AS ts - INTERVAL '5' SECOND", 5_000),
        ("WATERMARK FOR ts AS ts - INTERVAL '2' MINUTE", 120_000),
        ("WATERMARK FOR ts AS ts - INTERVAL '3 seconds'", 3_000),
    ],
)
def test_declared_delay(db, clause, delay):
    db.execute(f"CREATE SOURCE e (ts BIGINT, sym VARCHAR, v DOUBLE, {clause})")
    put(db, "e", (1_000_000, "A", 1.0))
    assert source_watermark(db, "e") == 1_000_000 - delay


def test_watermark_column_option_means_no_delay(db):
    db.execute("CREATE SOURCE e (ts TIMESTAMP, sym VARCHAR, v DOUBLE) WITH (watermark_column = 'ts')")
    put(db, "e", (5_000, "A", 1.0), (4_000, "B", 1.0))
    assert source_watermark(db, "e") == 5_000


def test_source_without_watermark_has_none(db):
    db.execute("CREATE SOURCE plain (ts BIGINT, sym VARCHAR, v DOUBLE)")
    put(db, "plain", (5_000, "A", 1.0))
    assert source_watermark(db, "plain") == I64_MIN
    assert db.pipeline_watermark == I64_MIN


def test_pipeline_watermark_is_minimum_over_sources_with_watermarks(db):
    db.execute("CREATE SOURCE a (ts BIGINT, sym VARCHAR, v DOUBLE, WATERMARK FOR ts)")
    db.execute("CREATE SOURCE b (ts BIGINT, sym VARCHAR, v DOUBLE, WATERMARK FOR ts)")
    db.execute("CREATE SOURCE plain (ts BIGINT, sym VARCHAR, v DOUBLE)")
    assert db.pipeline_watermark == I64_MIN
    put(db, "a", (5_000, "A", 1.0))
    put(db, "plain", (1, "A", 1.0))
    assert db.pipeline_watermark == 5_000
    put(db, "b", (3_000, "A", 1.0))
    assert db.pipeline_watermark == 3_000
    put(db, "b", (9_000, "A", 1.0))
    assert db.pipeline_watermark == 5_000
    assert db.metrics().pipeline_watermark == 5_000
    assert isinstance(db.pipeline_watermark, int)


def test_an_idle_source_stops_holding_back_the_pipeline_watermark():
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(idle_timeout_ms=1_000))
    try:
        for name in ("fast", "slow"):
            db.execute(f"CREATE SOURCE {name} (ts BIGINT, sym VARCHAR, v DOUBLE, WATERMARK FOR ts)")
        put(db, "slow", (1_000, "A", 1.0))
        put(db, "fast", (5_000, "A", 1.0))
        assert db.pipeline_watermark == 1_000
        time.sleep(1.5)
        # Both idle: the minimum over all of them, so the watermark never jumps ahead alone.
        assert db.pipeline_watermark == 1_000
        put(db, "fast", (6_000, "A", 1.0))
        assert db.pipeline_watermark == 6_000
        # The slow source speaks again: it counts again.
        put(db, "slow", (2_000, "A", 1.0))
        assert db.pipeline_watermark == 2_000
    finally:
        db.close()


def test_stream_metrics_watermark_follows_its_source(db):
    setup(
        db,
        "CREATE SOURCE e (ts BIGINT, sym VARCHAR, v DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)",
        "CREATE STREAM s AS SELECT ts, sym FROM e WHERE v > 0",
    )
    put(db, "e", (5_000, "A", 1.0))
    assert db.stream_metrics("s").watermark == 4_000
    put(db, "e", (8_000, "A", -1.0))  # filtered out, but event time still advances
    assert db.stream_metrics("s").watermark == 7_000


# --------------------------------------------------------------------------- Writer.watermark


def test_writer_watermark_is_explicit_and_monotonic(db):
    db.execute(
        "CREATE SOURCE e (ts BIGINT, sym VARCHAR, v DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
    )
    with db.writer("e") as w:
        assert w.watermark(10_000) is None
        assert w.current_watermark == 10_000
        assert source_watermark(db, "e") == 10_000
        assert db.pipeline_watermark == 10_000
        w.watermark(5_000)  # lower: ignored
        assert w.current_watermark == 10_000
        assert source_watermark(db, "e") == 10_000
        # a row whose derived watermark (9.5 s) is lower does not move it back
        w.insert({"ts": 10_500, "sym": "A", "v": 1.0})
        w.flush()
        assert source_watermark(db, "e") == 10_000
        # a later row moves it on
        w.insert({"ts": 20_000, "sym": "A", "v": 1.0})
        w.flush()
        assert source_watermark(db, "e") == 19_000
        w.watermark(25_000)
        assert w.current_watermark == 25_000
        assert source_watermark(db, "e") == 25_000


def test_writer_watermark_closes_windows_on_source_without_watermark_clause(db):
    db.execute("CREATE SOURCE events (ts BIGINT, category VARCHAR, value DOUBLE)")
    db.start()
    sub = db.subscribe(
        "SELECT category, AVG(value) AS avg_val FROM events "
        "GROUP BY category, TUMBLE(ts, INTERVAL '10' SECOND)"
    )
    with db.writer("events") as w:
        w.insert({"ts": 1_000, "category": "A", "value": 10.0})
        w.insert({"ts": 5_000, "category": "A", "value": 20.0})
        w.insert({"ts": 7_000, "category": "B", "value": 1.0})
        w.insert({"ts": 12_000, "category": "A", "value": 99.0})
        w.flush()
        assert drain(sub) == []  # no watermark yet: nothing closes
        w.watermark(10_000)
        got = sorted(poll_rows(sub, ("category", "window_start", "window_end", "avg_val"), 2))
        assert got == [("A", 0, 10_000, 15.0), ("B", 0, 10_000, 1.0)]
        w.watermark(19_999)
        assert drain(sub) == []
        w.watermark(20_000)
        assert poll_rows(sub, ("category", "window_start", "avg_val"), 1) == [("A", 10_000, 99.0)]


def test_writer_watermark_closes_windows_before_the_declared_delay(db, et):
    setup(
        db,
        f"CREATE SOURCE e (ts {et.sql_type}, sym VARCHAR, v DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' HOUR)",
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n FROM e GROUP BY sym, TUMBLE(ts, INTERVAL '5' SECOND)",
    )
    sub = db.subscribe_stream("c")
    put(db, "e", (1_000, "A", 1.0), (2_000, "A", 1.0), (6_000, "A", 1.0))
    assert drain(sub) == []  # the 1 h delay keeps every window open
    with db.writer("e") as w:
        w.watermark(5_000)
    assert poll_rows(sub, ("sym", "window_start", "window_end", "n"), 1) == [("A", et(0), et(5_000), 2)]
    assert drain(sub) == []


# --------------------------------------------------------------------------- out-of-order rows


def test_watermark_delay_admits_out_of_order_rows(shard_db, et):
    db = shard_db
    setup(
        db,
        f"CREATE SOURCE e (ts {et.sql_type}, sym VARCHAR, v DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)",
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n, SUM(v) AS s FROM e GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
    )
    sub = db.subscribe_stream("c")
    put(db, "e", (10_100, "A", 1.0))
    put(db, "e", (11_200, "A", 2.0))  # watermark 10.2 s: [10 s, 11 s) still open
    put(db, "e", (10_500, "A", 4.0))  # out of order, within the delay: counted
    assert drain(sub) == []
    put(db, "e", (12_100, "A", 8.0))  # watermark 11.1 s closes [10 s, 11 s)
    assert poll_rows(sub, ("sym", "window_start", "n", "s"), 1) == [("A", et(10_000), 2, 5.0)]
    assert db.metrics().total_events_dropped == 0
