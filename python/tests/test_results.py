"""Issue 20, "wrong results": each test reproduces one way a stream's result differed from
the right one (or from the same query ad hoc), with exact values."""

from __future__ import annotations

import math

import pytest

import laminardb
from laminardb import codes
from conftest import drain, records, setup

I64_MAX = 2**63 - 1


def changelog(sub, cols: tuple) -> list[tuple]:
    return sorted(r for b in drain(sub) for r in records(b, *cols, "_op"))


def fold(rows: list[tuple]) -> list[tuple]:
    """`+I`/`+U` add a row; `-U`/`-D` take back a row that must be current."""
    state: list[tuple] = []
    for *vals, op in rows:
        if op.startswith("+"):
            state.append(tuple(vals))
        else:
            assert tuple(vals) in state, f"{op} {vals} retracts no current row of {state}"
            state.remove(tuple(vals))
    return sorted(state)


# --------------------------------------------------------------------------- sessions


def test_session_changes_retract_the_rows_emitted_before(sharded_db):
    """Extending a session took back a row with the *new* bounds (never emitted), so the
    old row stayed downstream; a merge took back neither of the two old rows."""
    db = sharded_db
    setup(
        db,
        # No watermark: every session stays open, whatever order rows come in.
        "CREATE SOURCE clicks (usr VARCHAR, ts BIGINT, v BIGINT)",
        "CREATE STREAM s AS SELECT usr, window_start, window_end, COUNT(*) AS n, SUM(v) AS total "
        "FROM clicks GROUP BY usr, SESSION(ts, 100) EMIT CHANGES",
    )
    sub = db.subscribe_stream("s")
    cols = ("usr", "window_start", "window_end", "n", "total")
    db.insert("clicks", [{"usr": "u", "ts": 0, "v": 1}, {"usr": "u", "ts": 150, "v": 2}])
    first = changelog(sub, cols)
    assert first == [("u", 0, 100, 1, 1, "+I"), ("u", 150, 250, 1, 2, "+I")]
    db.insert("clicks", [{"usr": "u", "ts": 200, "v": 3}])  # extends [150, 250) to [150, 300)
    extend = changelog(sub, cols)
    assert extend == [("u", 150, 250, 1, 2, "-U"), ("u", 150, 300, 2, 5, "+U")]
    db.insert("clicks", [{"usr": "u", "ts": 90, "v": 4}])  # bridges both sessions
    merge = changelog(sub, cols)
    assert merge == [("u", 0, 100, 1, 1, "-U"), ("u", 0, 300, 4, 10, "+U"), ("u", 150, 300, 2, 5, "-D")]
    assert fold(first + extend + merge) == [("u", 0, 300, 4, 10)]
    assert db.query("SELECT usr, window_start, window_end, n, total FROM s").fetchall() == [("u", 0, 300, 4, 10)]


# --------------------------------------------------------------------------- closed windows


@pytest.mark.parametrize("emit", ["EMIT CHANGES", "EMIT ON UPDATE", "EMIT EVERY INTERVAL '10' SECOND"])
def test_a_windowed_changelog_stream_keeps_closed_windows_queryable(sharded_db, emit):
    """Closed windows used to vanish from `SELECT … FROM stream` once their state was
    freed: only the open windows were left."""
    db = sharded_db
    setup(
        db,
        "CREATE SOURCE trades (sym VARCHAR, ts BIGINT, qty BIGINT, WATERMARK FOR ts)",
        f"CREATE STREAM vol AS SELECT sym, window_start, window_end, SUM(qty) AS q FROM trades "
        f"GROUP BY sym, TUMBLE(ts, 1000) {emit}",
    )
    db.insert("trades", [{"sym": "A", "ts": 100, "qty": 1}, {"sym": "B", "ts": 200, "qty": 2}, {"sym": "A", "ts": 900, "qty": 3}])
    db.insert("trades", [{"sym": "A", "ts": 1500, "qty": 4}])  # closes [0, 1000)
    db.insert("trades", [{"sym": "B", "ts": 2100, "qty": 5}])  # closes [1000, 2000)
    got = sorted(db.query("SELECT sym, window_start, window_end, q FROM vol").fetchall())
    assert got == [("A", 0, 1000, 4), ("A", 1000, 2000, 4), ("B", 0, 1000, 2), ("B", 2000, 3000, 5)]
    n = db.query("SELECT COUNT(*) AS n FROM vol").fetchall()
    assert n == [(4,)]


# --------------------------------------------------------------------------- NaN and ±0.0


def test_min_max_and_distinct_of_nan_and_signed_zero_agree_with_ad_hoc(sharded_db):
    """MAX over {NaN, 1.0} was 1.0 or NaN by arrival order in a stream (and in DataFusion's
    grouped path), and COUNT(DISTINCT) took -0.0 and 0.0 as one value where DataFusion
    counts two. Both now follow the total order: NaN above every number, -0.0 below 0.0."""
    db = sharded_db
    select = (
        "SELECT k, MAX(v) AS hi, MIN(v) AS lo, COUNT(DISTINCT v) AS d FROM t GROUP BY k"
    )
    setup(db, "CREATE SOURCE t (k VARCHAR, v DOUBLE)", f"CREATE STREAM s AS {select}")
    nan = math.nan
    rows = [("a", nan), ("a", 1.0), ("b", 1.0), ("b", nan), ("z", -0.0), ("z", 0.0), ("y", 0.0), ("y", -0.0), ("n", nan)]
    for k, v in rows:  # one insert each: the arrival order is the listed one
        db.insert("t", [{"k": k, "v": v}])

    def canon(result):
        return sorted((k, repr(hi), repr(lo), d) for k, hi, lo, d in result)

    want = [
        ("a", "nan", "1.0", 2),
        ("b", "nan", "1.0", 2),
        ("n", "nan", "nan", 1),
        ("y", "0.0", "-0.0", 2),
        ("z", "0.0", "-0.0", 2),
    ]
    assert canon(db.query(select).fetchall()) == want
    assert canon(db.query("SELECT k, hi, lo, d FROM s").fetchall()) == want
    # Ad hoc with FILTER (the grouped accumulators' row filter).
    filtered = db.query(
        "SELECT k, MAX(v) FILTER (WHERE k <> 'a') AS m, MIN(v) FILTER (WHERE v <> 1.0) AS lo FROM t "
        "WHERE k IN ('a', 'z') GROUP BY k"
    ).fetchall()
    assert sorted((k, repr(m), repr(lo)) for k, m, lo in filtered) == [("a", "None", "nan"), ("z", "0.0", "-0.0")]
    # Without GROUP BY, DataFusion's own kernels already agreed.
    assert [tuple(map(repr, r)) for r in db.query("SELECT MAX(v), MIN(v) FROM t WHERE k = 'z'").fetchall()] == [("0.0", "-0.0")]


# --------------------------------------------------------------------------- SUM overflow


def test_bigint_sum_overflow_is_an_error_ad_hoc_and_in_a_stream(sharded_db):
    """SUM over BIGINT wrapped around silently, in a stream and ad hoc (DataFusion's own
    SUM wraps): now both fail, and the stream's error is in its metrics."""
    db = sharded_db
    setup(
        db,
        "CREATE SOURCE t (k VARCHAR, v BIGINT)",
        "CREATE STREAM s AS SELECT k, SUM(v) AS total, COUNT(*) AS n FROM t GROUP BY k",
    )
    db.insert("t", [{"k": "a", "v": I64_MAX - 1}, {"k": "b", "v": 5}])
    db.insert("t", [{"k": "a", "v": 2}])  # would wrap to a large negative number
    with pytest.raises(laminardb.LaminarError) as ei:
        db.query("SELECT k, SUM(v) FROM t GROUP BY k").fetchall()
    assert ei.value.code == codes.QUERY_FAILED
    assert "SUM overflowed the BIGINT range" in str(ei.value)
    with pytest.raises(laminardb.LaminarError, match="SUM overflowed the BIGINT range"):
        db.query("SELECT SUM(v) FROM t").fetchall()
    m = db.stream_metrics("s")
    assert m.errors >= 1
    assert "SUM overflowed the BIGINT range" in m.last_error
    # The refused rows left the state as it was: no wrapped number, nothing half-applied.
    assert sorted(db.query("SELECT k, total, n FROM s").fetchall()) == [("a", I64_MAX - 1, 1), ("b", 5, 1)]
    db.insert("t", [{"k": "a", "v": 1}])
    assert sorted(db.query("SELECT k, total, n FROM s").fetchall()) == [("a", I64_MAX, 2), ("b", 5, 1)]
    # Within range, ad hoc still sums (grouped and not), and over a window frame.
    assert db.query("SELECT SUM(v) FROM t WHERE k = 'b'").fetchall() == [(5,)]
    assert db.query("SELECT SUM(v) OVER (ORDER BY v ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS w FROM t WHERE k = 'b'").fetchall() == [(5,)]


# --------------------------------------------------------------------------- quoted names


def test_quoted_mixed_case_names_work_in_streams(sharded_db):
    """`"Trades"`, `"Price"`: ad hoc resolved them, streams lowercased the table name
    and refused the stream ("table … not found")."""
    db = sharded_db
    setup(
        db,
        'CREATE SOURCE "Trades" ("Sym" VARCHAR, "Ts" BIGINT, "Price" DOUBLE, WATERMARK FOR "Ts")',
        'CREATE SOURCE "Quotes" ("Sym" VARCHAR, "Bid" DOUBLE)',
        'CREATE STREAM "Doubled" AS SELECT "Sym", "Price" * 2 AS "P2" FROM "Trades" WHERE "Price" > 1',
        'CREATE STREAM totals AS SELECT "Sym", SUM("Price") AS "Total" FROM "Trades" GROUP BY "Sym"',
        'CREATE STREAM bars AS SELECT "Sym", window_start, window_end, MAX("Price") AS hi FROM "Trades" '
        'GROUP BY "Sym", TUMBLE("Ts", INTERVAL \'1\' SECOND)',
        'CREATE STREAM sessions AS SELECT "Sym", window_start, window_end, COUNT(*) AS n FROM "Trades" '
        'GROUP BY "Sym", SESSION("Ts", 100)',
        'CREATE STREAM joined WITH (state_ttl = \'1 hour\') AS SELECT t."Sym", t."Price", q."Bid" FROM "Trades" t JOIN "Quotes" q ON t."Sym" = q."Sym"',
        'CREATE STREAM again AS SELECT "Sym", "P2" FROM "Doubled"',
    )
    db.insert("Quotes", [{"Sym": "X", "Bid": 9.5}])
    db.insert("Trades", [{"Sym": "X", "Ts": 10, "Price": 2.0}, {"Sym": "Y", "Ts": 50, "Price": 0.5}])
    db.insert("Trades", [{"Sym": "X", "Ts": 2000, "Price": 3.0}])
    assert sorted(db.query('SELECT * FROM "Doubled"').fetchall()) == [("X", 4.0), ("X", 6.0)]
    assert sorted(db.query('SELECT "Sym", "Total" FROM totals').fetchall()) == [("X", 5.0), ("Y", 0.5)]
    assert sorted(db.query("SELECT * FROM bars").fetchall()) == [("X", 0, 1000, 2.0), ("Y", 0, 1000, 0.5)]
    assert sorted(db.query("SELECT * FROM sessions").fetchall()) == [("X", 10, 110, 1), ("Y", 50, 150, 1)]
    assert sorted(db.query("SELECT * FROM joined").fetchall()) == [("X", 2.0, 9.5), ("X", 3.0, 9.5)]
    assert sorted(db.query("SELECT * FROM again").fetchall()) == [("X", 4.0), ("X", 6.0)]
    # An unquoted window column is lowercased, as DataFusion does: "Ts" is not ts.
    with pytest.raises(laminardb.LaminarError):
        db.execute('CREATE STREAM bad AS SELECT COUNT(*) AS n FROM "Trades" GROUP BY TUMBLE(Ts, 1000)')


def test_an_ad_hoc_result_has_the_type_its_rows_have(db):
    """`CASE WHEN … THEN 3 ELSE px END` declared BIGINT (the type before coercion) while
    its rows were DOUBLE, and fetching the result failed ("All batches must have same
    schema"). Found by the differential test."""
    db.execute("CREATE SOURCE t (px DOUBLE)")
    db.insert("t", [{"px": 1e10}, {"px": -2.0}])
    r = db.query("SELECT CASE WHEN px > 0 THEN 3 ELSE px END AS c FROM t")
    assert r.to_arrow().schema.field("c").type == "double"
    assert sorted(r.fetchall()) == [(-2.0,), (3.0,)]


def test_a_global_aggregate_over_no_rows_reads_as_one_row(sharded_db):
    """`SELECT COUNT(*), SUM(x) FROM t WHERE …` over no matching row is one row ad hoc
    (0, NULL); the stream's state was empty. Found by the differential test."""
    db = sharded_db
    select = "SELECT COUNT(*) AS n, SUM(x) AS s FROM t WHERE x > 100"
    setup(db, "CREATE SOURCE t (x DOUBLE)", f"CREATE STREAM g AS {select}")
    sub = db.subscribe_stream("g")
    db.insert("t", [{"x": 1.0}])
    assert db.query(select).fetchall() == [(0, None)]
    assert db.query("SELECT n, s FROM g").fetchall() == [(0, None)]
    assert drain(sub) == []  # its changelog starts with the first row it reads
    db.insert("t", [{"x": 150.0}, {"x": 200.0}])
    assert db.query("SELECT n, s FROM g").fetchall() == [(2, 350.0)]


def test_closed_changelog_windows_survive_a_restart(tmp_path):
    """The final rows of closed windows are the stream's retained rows: checkpointed
    with them (here at close) and queryable after reopening."""
    cfg = laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000)
    want = [("A", 0, 1000, 1), ("A", 1000, 2000, 4), ("B", 0, 1000, 2), ("B", 2000, 3000, 5)]
    db = laminardb.open(str(tmp_path / "db"), config=cfg)
    setup(
        db,
        "CREATE SOURCE trades (sym VARCHAR, ts BIGINT, qty BIGINT, WATERMARK FOR ts)",
        "CREATE STREAM vol AS SELECT sym, window_start, window_end, SUM(qty) AS q FROM trades "
        "GROUP BY sym, TUMBLE(ts, 1000) EMIT CHANGES",
    )
    db.insert("trades", [{"sym": "A", "ts": 100, "qty": 1}, {"sym": "B", "ts": 200, "qty": 2}])
    db.insert("trades", [{"sym": "A", "ts": 1500, "qty": 4}])
    db.checkpoint()
    db.insert("trades", [{"sym": "B", "ts": 2100, "qty": 5}])
    assert sorted(db.query("SELECT * FROM vol").fetchall()) == want
    db.close()
    db = laminardb.open(str(tmp_path / "db"), config=cfg)
    try:
        db.start()
        assert sorted(db.query("SELECT * FROM vol").fetchall()) == want
    finally:
        db.close()
