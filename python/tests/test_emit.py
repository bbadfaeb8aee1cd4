"""F-PY-009: EMIT strategies and late data.

* EMIT AFTER WATERMARK (the default for windows), EMIT ON WINDOW CLOSE and EMIT FINAL emit
  each window's row once, when the watermark reaches the window's end; no `_op` column.
* EMIT ON UPDATE / EMIT CHANGES emit every change with a trailing `_op` column
  ('+I' first row of a key, '-U' retraction of its previous row, '+U' its new row).
* EMIT EVERY INTERVAL emits the current results periodically.
* ALLOW LATENESS INTERVAL L keeps a window open until the watermark reaches end + L; rows for
  windows already closed are dropped and counted in `metrics().total_events_dropped`."""

from __future__ import annotations

import pytest

import laminardb
from conftest import drain, poll_batches, poll_rows, records, setup

SOURCE = "CREATE SOURCE trades (ts BIGINT, sym VARCHAR, qty BIGINT, WATERMARK FOR ts)"
SLOW_SOURCE = (
    "CREATE SOURCE trades (ts BIGINT, sym VARCHAR, qty BIGINT, "
    "WATERMARK FOR ts AS ts - INTERVAL '1' HOUR)"
)


def put(db, *rows):
    """Insert (ts_ms, sym, qty) tuples as one insert."""
    db.insert("trades", [{"ts": t, "sym": s, "qty": q} for t, s, q in rows])


def rows_of(batches, *cols):
    return [r for b in batches for r in records(b, *cols)]


def dropped(db) -> int:
    return db.metrics().total_events_dropped


# --------------------------------------------------------------------------- once per window


@pytest.mark.parametrize(
    "clause", ["", "EMIT AFTER WATERMARK", "EMIT ON WINDOW CLOSE", "EMIT FINAL"], ids=["default", "after_watermark", "on_window_close", "final"]
)
def test_window_emitted_once_when_it_closes(shard_db, clause):
    db = shard_db
    setup(
        db,
        SOURCE,
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        f"GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND) {clause}",
    )
    sub = db.subscribe_stream("c")
    cols = ("sym", "window_start", "n", "q")

    put(db, (10_100, "A", 1), (10_200, "B", 2))
    assert drain(sub) == []
    put(db, (10_800, "A", 4))
    assert drain(sub) == []  # an update of an open window emits nothing

    put(db, (11_000, "A", 8))  # watermark 11 s closes [10 s, 11 s)
    batches = poll_batches(sub, lambda bs: sum(b.num_rows for b in bs) >= 2)
    batches += drain(sub)
    assert all("_op" not in b.columns for b in batches)
    assert sorted(rows_of(batches, *cols)) == [("A", 10_000, 2, 5), ("B", 10_000, 1, 2)]

    put(db, (11_500, "A", 16))
    assert drain(sub) == []
    put(db, (12_000, "B", 32))  # closes [11 s, 12 s)
    assert poll_rows(sub, cols, 1) == [("A", 11_000, 2, 24)]
    assert drain(sub) == []

    assert sorted(db.query("SELECT sym, window_start, n, q FROM c").fetchall()) == [
        ("A", 10_000, 2, 5),
        ("A", 11_000, 2, 24),
        ("B", 10_000, 1, 2),
    ]


# --------------------------------------------------------------------------- every change


@pytest.mark.parametrize("clause", ["EMIT ON UPDATE", "EMIT CHANGES"])
def test_windowed_emit_on_update_emits_every_change(shard_db, clause):
    db = shard_db
    # the 1 h watermark delay keeps every window open: only updates are emitted
    setup(
        db,
        SLOW_SOURCE,
        "CREATE STREAM c AS SELECT sym, SUM(qty) AS q FROM trades "
        f"GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND) {clause}",
    )
    sub = db.subscribe_stream("c")
    cols = ("sym", "window_start", "q", "_op")

    put(db, (10_100, "A", 1))
    batches = drain(sub)
    assert batches and all(b.columns[-1] == "_op" for b in batches)
    assert rows_of(batches, *cols) == [("A", 10_000, 1, "+I")]

    put(db, (10_500, "A", 2))
    assert rows_of(drain(sub), *cols) == [("A", 10_000, 1, "-U"), ("A", 10_000, 3, "+U")]

    put(db, (11_200, "A", 4))
    assert rows_of(drain(sub), *cols) == [("A", 11_000, 4, "+I")]

    put(db, (10_900, "B", 8))
    assert rows_of(drain(sub), *cols) == [("B", 10_000, 8, "+I")]

    assert sorted(db.query("SELECT sym, window_start, q FROM c").fetchall()) == [
        ("A", 10_000, 3),
        ("A", 11_000, 4),
        ("B", 10_000, 8),
    ]


def test_emit_on_update_without_window_matches_the_default(db):
    setup(
        db,
        SOURCE,
        "CREATE STREAM plain AS SELECT sym, SUM(qty) AS q FROM trades GROUP BY sym",
        "CREATE STREAM explicit AS SELECT sym, SUM(qty) AS q FROM trades GROUP BY sym EMIT ON UPDATE",
    )
    a, b = db.subscribe_stream("plain"), db.subscribe_stream("explicit")
    expected = [
        [("A", 1, "+I")],
        [("A", 1, "-U"), ("A", 3, "+U")],
        [("B", 4, "+I")],
    ]
    for row, want in zip([(1, "A", 1), (2, "A", 2), (3, "B", 4)], expected):
        put(db, row)
        assert rows_of(drain(a), "sym", "q", "_op") == want
        assert rows_of(drain(b), "sym", "q", "_op") == want


# --------------------------------------------------------------------------- periodic


@pytest.mark.parametrize(
    "group_by",
    ["sym, TUMBLE(ts, INTERVAL '1' MINUTE)", "sym"],
    ids=["windowed", "not_windowed"],
)
def test_emit_every_interval_emits_current_results_periodically(db, group_by):
    setup(
        db,
        SLOW_SOURCE,
        f"CREATE STREAM c AS SELECT sym, COUNT(*) AS n FROM trades GROUP BY {group_by} "
        "EMIT EVERY INTERVAL '1' SECOND",
    )
    sub = db.subscribe_stream("c")

    def counts(batches):
        out = []
        for b in batches:
            ops = records(b, "_op") if "_op" in b.columns else [(None,)] * b.num_rows
            for (sym, n), (op,) in zip(records(b, "sym", "n"), ops):
                if op not in ("-U", "-D"):
                    out.append((sym, n))
        return out

    put(db, (60_100, "A", 1), (60_200, "A", 1))
    first = poll_batches(sub, lambda bs: ("A", 2) in counts(bs), timeout=10)
    assert ("A", 2) in counts(first)
    put(db, (60_300, "A", 1))
    second = poll_batches(sub, lambda bs: ("A", 3) in counts(bs), timeout=10)
    assert ("A", 3) in counts(second)
    seen = [n for _, n in counts(first + second)]
    assert set(seen) <= {2, 3}
    assert seen == sorted(seen)


# --------------------------------------------------------------------------- late data


def test_late_rows_are_dropped_and_counted(shard_db):
    db = shard_db
    setup(
        db,
        SOURCE,
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        "GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
    )
    sub = db.subscribe_stream("c")
    cols = ("sym", "window_start", "n", "q")
    put(db, (10_100, "A", 1))
    put(db, (11_200, "A", 2))  # closes [10 s, 11 s)
    assert poll_rows(sub, cols, 1) == [("A", 10_000, 1, 1)]
    assert dropped(db) == 0

    put(db, (10_500, "A", 4), (10_999, "B", 8))  # their window has closed
    assert dropped(db) == 2
    assert drain(sub) == []

    # older than the watermark (11.2 s) but its window [11 s, 12 s) is open: not late
    put(db, (11_100, "B", 16))
    assert dropped(db) == 2
    put(db, (12_000, "A", 32))  # closes [11 s, 12 s)
    assert sorted(poll_rows(sub, cols, 2)) == [("A", 11_000, 1, 2), ("B", 11_000, 1, 16)]
    assert dropped(db) == 2
    # the closed window was never re-emitted with the late rows
    assert sorted(db.query("SELECT sym, window_start, n, q FROM c").fetchall()) == [
        ("A", 10_000, 1, 1),
        ("A", 11_000, 1, 2),
        ("B", 11_000, 1, 16),
    ]


def test_allow_lateness_keeps_windows_open(shard_db):
    db = shard_db
    setup(
        db,
        SOURCE,
        "CREATE STREAM c AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades "
        "GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND) ALLOW LATENESS INTERVAL '2' SECOND",
    )
    sub = db.subscribe_stream("c")
    cols = ("sym", "window_start", "window_end", "n", "q")
    put(db, (10_100, "A", 1), (10_600, "A", 2))
    put(db, (11_500, "A", 4))  # watermark 11.5 s: [10 s, 11 s) stays open until 13 s
    assert drain(sub) == []
    put(db, (10_300, "A", 8))  # late, within the allowed lateness: counted in
    assert drain(sub) == []
    assert dropped(db) == 0

    put(db, (13_200, "A", 16))  # watermark 13.2 s >= 11 s + 2 s
    assert poll_rows(sub, cols, 1) == [("A", 10_000, 11_000, 3, 11)]

    put(db, (10_900, "A", 32))  # beyond the allowed lateness: dropped
    assert dropped(db) == 1
    assert drain(sub) == []

    put(db, (14_500, "A", 64))  # closes [11 s, 12 s) (12 s + 2 s <= 14.5 s); [13 s, 14 s) stays open
    assert poll_rows(sub, cols, 1) == [("A", 11_000, 12_000, 1, 4)]
    assert drain(sub) == []
    assert dropped(db) == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "clause",
    ["EMIT SOMETIMES", "EMIT EVERY INTERVAL 'often'", "ALLOW LATENESS INTERVAL 'x' SECOND"],
)
def test_malformed_emit_or_lateness_clause_raises_query_error(db, clause):
    db.execute(SOURCE)
    with pytest.raises(laminardb.QueryError):
        db.execute(
            "CREATE STREAM c AS SELECT sym, COUNT(*) AS n FROM trades "
            f"GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND) {clause}"
        )
    assert db.list_streams() == []
