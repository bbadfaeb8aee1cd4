"""F-PY-007: TUMBLE, HOP, SESSION and CUMULATE windows, over TIMESTAMP and BIGINT
epoch-millisecond columns, in streams (closed by the watermark) and in ad-hoc queries
(evaluated over all retained rows).

Windows are [start, end); a streamed window's row is emitted once, when the watermark
reaches `end`. Every source here declares `WATERMARK FOR ts` (no delay) unless noted, so
the watermark is the largest event time inserted so far."""

from __future__ import annotations

import pytest

import laminardb
from conftest import EventTime, drain, poll_batches, poll_rows, records, setup


def source(et: EventTime, name: str = "trades", wm: str = "WATERMARK FOR ts") -> str:
    return f"CREATE SOURCE {name} (ts {et.sql_type}, sym VARCHAR, px DOUBLE, qty BIGINT, {wm})"


def put(db, *rows, table="trades"):
    """Insert (ts_ms, sym, px, qty) tuples as one insert."""
    db.insert(table, [{"ts": t, "sym": s, "px": p, "qty": q} for t, s, p, q in rows])


# --------------------------------------------------------------------------- TUMBLE

BARS = (
    "CREATE STREAM bars AS SELECT sym, FIRST_VALUE(px) AS open_px, MAX(px) AS high_px, "
    "MIN(px) AS low_px, LAST_VALUE(px) AS close_px, SUM(qty) AS vol, COUNT(*) AS n "
    "FROM trades GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)"
)
BAR_COLS = ("sym", "window_start", "window_end", "open_px", "high_px", "low_px", "close_px", "vol", "n")


def test_tumble_ohlc_bars_emitted_when_windows_close(shard_db, et):
    db = shard_db
    setup(db, source(et), BARS)
    sub = db.subscribe_stream("bars")

    # window [10s, 11s)
    put(
        db,
        (10_100, "A", 10.0, 1),
        (10_300, "B", 100.0, 10),
        (10_400, "A", 13.0, 2),
        (10_700, "A", 9.0, 3),
        (10_900, "A", 11.0, 4),
    )
    assert drain(sub) == []  # watermark 10.9s: nothing closed

    # window [11s, 12s); the watermark reaches 11.8s and closes [10s, 11s)
    put(db, (11_200, "A", 12.0, 1), (11_500, "B", 101.0, 20), (11_800, "A", 15.0, 2))
    first = sorted(poll_rows(sub, BAR_COLS, 2))
    assert first == [
        ("A", et(10_000), et(11_000), 10.0, 13.0, 9.0, 11.0, 10, 4),
        ("B", et(10_000), et(11_000), 100.0, 100.0, 100.0, 100.0, 10, 1),
    ]

    # the watermark reaches 12.5s and closes [11s, 12s); [12s, 13s) stays open
    put(db, (12_500, "A", 1.0, 1))
    second = sorted(poll_rows(sub, BAR_COLS, 2))
    assert second == [
        ("A", et(11_000), et(12_000), 12.0, 15.0, 12.0, 15.0, 3, 2),
        ("B", et(11_000), et(12_000), 101.0, 101.0, 101.0, 101.0, 20, 1),
    ]
    assert drain(sub) == []

    # the stream's state is the closed windows' rows
    state = db.query("SELECT sym, window_start, n FROM bars").fetchall()
    assert sorted(state) == [
        ("A", et(10_000), 4),
        ("A", et(11_000), 2),
        ("B", et(10_000), 1),
        ("B", et(11_000), 1),
    ]


def test_single_row_inserts_each_moving_the_watermark_lose_no_row(shard_db):
    """Every row its own insert and its own watermark step (each closing the windows the
    rows before it filled): exact counts and sums per key and window, nothing dropped."""
    db = shard_db
    setup(
        db,
        "CREATE SOURCE trades (ts BIGINT, sym VARCHAR, px DOUBLE, qty BIGINT, WATERMARK FOR ts)",
        "CREATE STREAM bars AS SELECT sym, COUNT(*) AS n, SUM(qty) AS vol "
        "FROM trades GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
    )
    sub = db.subscribe_stream("bars")
    expected: dict[tuple, list[int]] = {}
    for i in range(400):
        ts, sym = 1_000 + i * 50, f"S{i % 8}"
        db.insert("trades", {"ts": ts, "sym": sym, "px": 1.0, "qty": i})
        counts = expected.setdefault((sym, ts // 1000 * 1000), [0, 0])
        counts[0] += 1
        counts[1] += i
    db.insert("trades", {"ts": 100_000, "sym": "END", "px": 1.0, "qty": 0})  # closes them all
    got = {(s, w): [n, v] for s, w, n, v in poll_rows(sub, ("sym", "window_start", "n", "vol"), len(expected))}
    assert got == expected
    assert db.metrics().total_events_dropped == 0


def test_an_insert_whose_watermark_closes_its_own_rows_windows_counts_every_row(shard_db):
    """One large insert whose last row moves the watermark past every other row's window:
    each shard passes that watermark on only after the rows it routed to the others (each
    part well over a thousand rows), and they take them in that order."""
    db = shard_db
    setup(
        db,
        "CREATE SOURCE trades (ts BIGINT, sym VARCHAR, px DOUBLE, qty BIGINT, WATERMARK FOR ts)",
        "CREATE STREAM bars AS SELECT sym, COUNT(*) AS n FROM trades "
        "GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
    )
    sub = db.subscribe_stream("bars")
    rows = [{"ts": 1_000 + i % 1000, "sym": f"S{i % 50}", "px": 1.0, "qty": 1} for i in range(20_000)]
    rows.append({"ts": 9_000, "sym": "LAST", "px": 1.0, "qty": 1})
    db.insert("trades", rows)
    got = dict(poll_rows(sub, ("sym", "n"), 50))
    assert got == {f"S{k}": 400 for k in range(50)}
    assert db.metrics().total_events_dropped == 0


def test_window_bounds_have_the_event_time_type(db, et):
    setup(
        db,
        source(et),
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n FROM trades GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
    )
    sub = db.subscribe_stream("c")
    put(db, (10_100, "A", 1.0, 1))
    put(db, (11_000, "A", 1.0, 1))  # closes [10s, 11s)
    batches = poll_batches(sub, lambda bs: sum(b.num_rows for b in bs) >= 1)
    assert batches
    ts_type = db.schema("trades").field("ts").type
    for schema in [sub.schema, db.schema("c")] + [b.schema for b in batches]:
        assert schema.field("window_start").type == ts_type
        assert schema.field("window_end").type == ts_type


def test_tumble_with_multiple_group_by_columns(shard_db):
    db = shard_db
    setup(
        db,
        "CREATE SOURCE fills (ts BIGINT, sym VARCHAR, venue VARCHAR, qty BIGINT, WATERMARK FOR ts)",
        "CREATE STREAM per_venue AS SELECT sym, venue, SUM(qty) AS q FROM fills "
        "GROUP BY sym, venue, TUMBLE(ts, INTERVAL '2' SECOND)",
    )
    sub = db.subscribe_stream("per_venue")
    rows = [
        (10_000, "A", "X", 1),
        (10_500, "A", "Y", 2),
        (11_000, "A", "X", 4),
        (11_900, "B", "X", 8),
        (12_100, "A", "X", 16),  # window [12s, 14s), stays open
    ]
    db.insert("fills", [{"ts": t, "sym": s, "venue": v, "qty": q} for t, s, v, q in rows])
    got = sorted(poll_rows(sub, ("sym", "venue", "window_start", "window_end", "q"), 3))
    assert got == [
        ("A", "X", 10_000, 12_000, 5),
        ("A", "Y", 10_000, 12_000, 2),
        ("B", "X", 10_000, 12_000, 8),
    ]


def test_empty_windows_emit_nothing(shard_db, et):
    db = shard_db
    setup(
        db,
        source(et),
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n FROM trades GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
    )
    sub = db.subscribe_stream("c")
    put(db, (10_100, "A", 1.0, 1))
    put(db, (13_200, "A", 1.0, 1))  # closes [10s,11s), [11s,12s), [12s,13s): only the first has rows
    cols = ("sym", "window_start", "window_end", "n")
    assert poll_rows(sub, cols, 1) == [("A", et(10_000), et(11_000), 1)]
    put(db, (15_000, "A", 1.0, 1))  # closes [13s,14s) and the empty [14s,15s)
    assert poll_rows(sub, cols, 1) == [("A", et(13_000), et(14_000), 1)]
    assert drain(sub) == []


# --------------------------------------------------------------------------- HOP


def test_hop_windows_overlap(shard_db, et):
    db = shard_db
    setup(
        db,
        source(et),
        "CREATE STREAM h AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        "GROUP BY sym, HOP(ts, INTERVAL '1' SECOND, INTERVAL '2' SECOND)",
    )
    sub = db.subscribe_stream("h")
    put(db, (10_200, "A", 1.0, 1), (10_700, "A", 1.0, 2), (11_500, "A", 1.0, 4), (12_100, "A", 1.0, 8))
    put(db, (20_000, "Z", 1.0, 0))  # closes every window of A; Z's windows stay open
    got = sorted(poll_rows(sub, ("sym", "window_start", "window_end", "n", "q"), 4))
    assert got == [
        ("A", et(9_000), et(11_000), 2, 3),
        ("A", et(10_000), et(12_000), 3, 7),
        ("A", et(11_000), et(13_000), 2, 12),
        ("A", et(12_000), et(14_000), 1, 8),
    ]
    assert drain(sub) == []


# --------------------------------------------------------------------------- SESSION


def test_session_windows_close_after_the_gap(shard_db, et):
    db = shard_db
    setup(
        db,
        source(et),
        "CREATE STREAM s AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        "GROUP BY sym, SESSION(ts, INTERVAL '3' SECOND)",
    )
    sub = db.subscribe_stream("s")
    cols = ("sym", "window_start", "window_end", "n", "q")
    put(db, (10_000, "A", 1.0, 1), (11_000, "A", 1.0, 2))
    assert drain(sub) == []
    # 9s later: a new session; the watermark (20s) passes the first session's end (11s + 3s)
    put(db, (20_000, "A", 1.0, 4))
    assert poll_rows(sub, cols, 1) == [("A", et(10_000), et(14_000), 2, 3)]
    put(db, (21_000, "B", 1.0, 8))
    assert drain(sub) == []
    put(db, (30_000, "Z", 1.0, 0))
    assert sorted(poll_rows(sub, cols, 2)) == [
        ("A", et(20_000), et(23_000), 1, 4),
        ("B", et(21_000), et(24_000), 1, 8),
    ]


def test_session_windows_merge_when_a_row_bridges_them(shard_db, et):
    db = shard_db
    # a 10 s watermark delay keeps both sessions open until the bridging row arrives
    setup(
        db,
        source(et, wm="WATERMARK FOR ts AS ts - INTERVAL '10' SECOND"),
        "CREATE STREAM s AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        "GROUP BY sym, SESSION(ts, INTERVAL '3' SECOND)",
    )
    sub = db.subscribe_stream("s")
    # A: sessions [10s, 14s) and [16s, 19s); B: [12s, 15s)
    put(db, (10_000, "A", 1.0, 1), (11_000, "A", 1.0, 2), (12_000, "B", 1.0, 100), (16_000, "A", 1.0, 4))
    assert drain(sub) == []
    # 13.5s is within 3s of 11s and of 16s: A's two sessions become one, [10s, 19s)
    put(db, (13_500, "A", 1.0, 8))
    assert drain(sub) == []
    put(db, (29_500, "Z", 1.0, 0))  # watermark 19.5s
    got = sorted(poll_rows(sub, ("sym", "window_start", "window_end", "n", "q"), 2))
    assert got == [
        ("A", et(10_000), et(19_000), 4, 15),
        ("B", et(12_000), et(15_000), 1, 100),
    ]
    assert drain(sub) == []


# --------------------------------------------------------------------------- CUMULATE


def test_cumulate_windows_grow_by_step(shard_db, et):
    db = shard_db
    setup(
        db,
        source(et),
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        "GROUP BY sym, CUMULATE(ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND)",
    )
    sub = db.subscribe_stream("c")
    cols = ("sym", "window_start", "window_end", "n", "q")
    put(db, (9_200, "A", 1.0, 1))
    assert drain(sub) == []
    put(db, (10_500, "A", 1.0, 2))
    assert poll_rows(sub, cols, 1) == [("A", et(9_000), et(10_000), 1, 1)]
    put(db, (11_900, "A", 1.0, 4))
    assert poll_rows(sub, cols, 1) == [("A", et(9_000), et(11_000), 2, 3)]
    put(db, (12_100, "A", 1.0, 8))  # first window of the next period [12s, 15s)
    assert poll_rows(sub, cols, 1) == [("A", et(9_000), et(12_000), 3, 7)]
    put(db, (14_000, "A", 1.0, 16))
    assert sorted(poll_rows(sub, cols, 2)) == [
        ("A", et(12_000), et(13_000), 1, 8),
        ("A", et(12_000), et(14_000), 1, 8),
    ]
    assert drain(sub) == []


# --------------------------------------------------------------------------- continuous subscribe(sql)


def test_windowed_subscribe_sql(db, et):
    setup(db, source(et))
    sub = db.subscribe(
        "SELECT sym, SUM(qty) AS q FROM trades GROUP BY sym, TUMBLE(ts, INTERVAL '5' SECOND)"
    )
    put(db, (10_000, "A", 1.0, 1), (12_000, "A", 1.0, 2), (14_999, "B", 1.0, 4))
    assert drain(sub) == []
    put(db, (15_000, "A", 1.0, 8))
    got = sorted(poll_rows(sub, ("sym", "window_start", "window_end", "q"), 2))
    assert got == [("A", et(10_000), et(15_000), 3), ("B", et(10_000), et(15_000), 4)]
    sub.cancel()


# --------------------------------------------------------------------------- ad-hoc query()

# A: 60s q100, 90s q200, 95s q5, 130s q50; B: 125s q10. No watermark: every row is retained.
ADHOC_ROWS = [(60_000, "A", 100), (90_000, "A", 200), (95_000, "A", 5), (130_000, "A", 50), (125_000, "B", 10)]
ADHOC_CASES = {
    "tumble": (
        "TUMBLE(ts, INTERVAL '1' MINUTE)",
        [
            ("A", 60_000, 120_000, 3, 305),
            ("A", 120_000, 180_000, 1, 50),
            ("B", 120_000, 180_000, 1, 10),
        ],
    ),
    "hop": (
        "HOP(ts, INTERVAL '30' SECOND, INTERVAL '1' MINUTE)",
        [
            ("A", 30_000, 90_000, 1, 100),
            ("A", 60_000, 120_000, 3, 305),
            ("A", 90_000, 150_000, 3, 255),
            ("A", 120_000, 180_000, 1, 50),
            ("B", 90_000, 150_000, 1, 10),
            ("B", 120_000, 180_000, 1, 10),
        ],
    ),
    "session": (
        "SESSION(ts, INTERVAL '10' SECOND)",
        [
            ("A", 60_000, 70_000, 1, 100),
            ("A", 90_000, 105_000, 2, 205),
            ("A", 130_000, 140_000, 1, 50),
            ("B", 125_000, 135_000, 1, 10),
        ],
    ),
    "cumulate": (
        "CUMULATE(ts, INTERVAL '30' SECOND, INTERVAL '1' MINUTE)",
        [
            ("A", 60_000, 90_000, 1, 100),
            ("A", 60_000, 120_000, 3, 305),
            ("A", 120_000, 150_000, 1, 50),
            ("A", 120_000, 180_000, 1, 50),
            ("B", 120_000, 150_000, 1, 10),
            ("B", 120_000, 180_000, 1, 10),
        ],
    ),
}


@pytest.fixture
def adhoc(shard_db, et):
    shard_db.execute(f"CREATE SOURCE ticks (ts {et.sql_type}, sym VARCHAR, qty BIGINT)")
    shard_db.insert("ticks", [{"ts": t, "sym": s, "qty": q} for t, s, q in ADHOC_ROWS])
    return shard_db


@pytest.mark.parametrize("case", sorted(ADHOC_CASES))
def test_windows_in_adhoc_query(adhoc, et, case):
    window, expected = ADHOC_CASES[case]
    res = adhoc.query(f"SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM ticks GROUP BY sym, {window}")
    got = sorted(records(res, "sym", "window_start", "window_end", "n", "q"))
    assert got == [(s, et(a), et(b), n, q) for s, a, b, n, q in expected]


def test_adhoc_window_with_spec_interval_spelling(adhoc, et):
    res = adhoc.query(
        "SELECT sym, SUM(qty) AS total_qty FROM ticks GROUP BY sym, TUMBLE(ts, INTERVAL '1 minute')"
    )
    assert sorted(records(res, "sym", "window_start", "total_qty")) == [
        ("A", et(60_000), 305),
        ("A", et(120_000), 50),
        ("B", et(120_000), 10),
    ]


def test_window_query_through_stream(adhoc, et):
    s = adhoc.stream("SELECT sym, COUNT(*) AS n FROM ticks GROUP BY sym, TUMBLE(ts, INTERVAL '1' MINUTE)")
    rows = sorted(r for b in s for r in records(b, "sym", "window_start", "n"))
    assert rows == [("A", et(60_000), 3), ("A", et(120_000), 1), ("B", et(120_000), 1)]


def test_adhoc_window_over_source_without_watermark_includes_open_windows(db):
    db.execute("CREATE SOURCE t (ts BIGINT, v BIGINT)")
    db.insert("t", {"ts": [1_000, 1_500, 2_100], "v": [1, 2, 4]})
    res = db.query("SELECT SUM(v) AS s FROM t GROUP BY TUMBLE(ts, INTERVAL '1' SECOND)")
    assert sorted(records(res, "window_start", "window_end", "s")) == [(1_000, 2_000, 3), (2_000, 3_000, 4)]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "window",
    ["TUMBLE(ts, INTERVAL 'abc')", "TUMBLE(ts, INTERVAL '-1' SECOND)", "HOP(ts, INTERVAL '0' SECOND, INTERVAL '1' MINUTE)"],
)
def test_invalid_window_interval_raises_query_error(db, window):
    db.execute("CREATE SOURCE t (ts BIGINT, v BIGINT, WATERMARK FOR ts)")
    with pytest.raises(laminardb.QueryError):
        db.query(f"SELECT COUNT(*) FROM t GROUP BY {window}")
    with pytest.raises(laminardb.QueryError):
        db.execute(f"CREATE STREAM s AS SELECT COUNT(*) AS n FROM t GROUP BY {window}")
    assert db.list_streams() == []


def test_window_over_non_time_column_raises(db):
    db.execute("CREATE SOURCE t (ts BIGINT, name VARCHAR, WATERMARK FOR ts)")
    with pytest.raises(laminardb.LaminarError):
        db.execute("CREATE STREAM s AS SELECT COUNT(*) AS n FROM t GROUP BY TUMBLE(name, INTERVAL '1' SECOND)")
    assert db.list_streams() == []
