"""F-PY-006 / F-PY-010 / API.md: CREATE STREAM and CREATE MATERIALIZED VIEW, append-only
projection/filter streams, GROUP BY aggregates as changelogs, cascades of streams, and
identical results for one shard and the default shard count."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import at, drain, fold_changelog, poll_rows, records, setup

TRADES = "CREATE SOURCE trades (ts BIGINT, sym VARCHAR, px DOUBLE, qty BIGINT)"


def put(db, *rows):
    """Insert (ts, sym, px, qty) tuples into `trades` as one insert."""
    db.insert("trades", [{"ts": t, "sym": s, "px": p, "qty": q} for t, s, p, q in rows])


def by_key(rows, key_len=1):
    """Group changelog rows by key, keeping each key's order."""
    out = defaultdict(list)
    for r in rows:
        out[r[:key_len]].append(r)
    return dict(out)


# --------------------------------------------------------------------------- DDL and catalog


def test_create_stream_ddl_and_catalog(db):
    db.execute(TRADES)
    er = db.execute("CREATE STREAM big AS SELECT sym, px FROM trades WHERE px > 100")
    assert isinstance(er, laminardb.ExecuteResult)
    assert er.result_type == "ddl"
    assert er.ddl_type == "CREATE STREAM"
    assert er.ddl_object == "big"
    assert int(er) == 0
    assert db.list_streams() == ["big"]
    assert db.materialized_views() == ["big"]
    infos = db.streams()
    assert len(infos) == 1
    assert isinstance(infos[0], laminardb.StreamInfo)
    assert infos[0].name == "big"
    assert "select" in infos[0].sql.lower() and "trades" in infos[0].sql
    assert db.schema("big") == pa.schema([("sym", pa.string()), ("px", pa.float64())])
    # a stream is not a source or table
    assert db.list_tables() == ["trades"]


def test_create_materialized_view_is_a_queryable_stream(db):
    db.execute(TRADES)
    er = db.execute(
        "CREATE MATERIALIZED VIEW totals AS SELECT sym, SUM(qty) AS total FROM trades GROUP BY sym"
    )
    assert er.result_type == "ddl"
    assert er.ddl_object == "totals"
    assert er.ddl_type in ("CREATE MATERIALIZED VIEW", "CREATE STREAM")
    assert db.list_streams() == ["totals"]
    db.start()
    put(db, (1, "A", 1.0, 2), (2, "B", 1.0, 5), (3, "A", 1.0, 3))
    assert db.query("SELECT sym, total FROM totals ORDER BY sym").fetchall() == [("A", 5), ("B", 5)]


def test_duplicate_stream_name_raises_table_exists(db):
    db.execute(TRADES)
    db.execute("CREATE STREAM s AS SELECT sym FROM trades")
    for ddl in (
        "CREATE STREAM s AS SELECT px FROM trades",
        "CREATE MATERIALIZED VIEW s AS SELECT px FROM trades",
        "CREATE STREAM trades AS SELECT px FROM trades",
    ):
        with pytest.raises(laminardb.SchemaError) as ei:
            db.execute(ddl)
        assert ei.value.code == codes.TABLE_EXISTS == 201
    assert db.schema("s") == pa.schema([("sym", pa.string())])
    assert db.list_streams() == ["s"]


def test_stream_over_unknown_source_raises(db):
    with pytest.raises(laminardb.LaminarError) as ei:
        db.execute("CREATE STREAM s AS SELECT a FROM nope")
    assert "nope" in str(ei.value)
    assert db.list_streams() == []


def test_stream_with_unknown_column_raises(db):
    db.execute(TRADES)
    with pytest.raises(laminardb.QueryError) as ei:
        db.execute("CREATE STREAM s AS SELECT nocol FROM trades")
    assert "nocol" in str(ei.value)
    assert db.list_streams() == []


def test_drop_stream(db):
    db.execute(TRADES)
    db.execute("CREATE STREAM s AS SELECT sym FROM trades")
    er = db.execute("DROP STREAM s")
    assert er.result_type == "ddl"
    assert er.ddl_type == "DROP STREAM"
    assert er.ddl_object == "s"
    assert db.list_streams() == []
    assert db.streams() == []
    with pytest.raises(laminardb.LaminarError):
        db.query("SELECT * FROM s")
    # the name is free again
    db.execute("CREATE STREAM s AS SELECT px FROM trades")
    assert db.schema("s") == pa.schema([("px", pa.float64())])


# --------------------------------------------------------------------------- append-only streams


def test_projection_and_filter_stream_is_append_only(shard_db):
    db = shard_db
    setup(
        db,
        TRADES,
        "CREATE STREAM big_notional AS SELECT sym, px * qty AS notional FROM trades WHERE px > 100",
    )
    sub = db.subscribe_stream("big_notional")
    put(db, (1, "A", 150.0, 2), (2, "B", 90.0, 10), (3, "C", 101.0, 1))
    batches = drain(sub)
    assert batches
    assert all(b.columns == ["sym", "notional"] for b in batches)  # no `_op` on append-only output
    got = sorted(r for b in batches for r in b.fetchall())
    assert got == [("A", 300.0), ("C", 101.0)]
    put(db, (4, "A", 200.0, 3), (5, "B", 100.0, 1))  # px > 100 is strict
    assert sorted(r for b in drain(sub) for r in b.fetchall()) == [("A", 600.0)]
    assert db.query("SELECT sym, notional FROM big_notional ORDER BY notional").fetchall() == [
        ("C", 101.0),
        ("A", 300.0),
        ("A", 600.0),
    ]


def test_append_only_stream_keeps_duplicates_and_nulls(db):
    setup(db, TRADES, "CREATE STREAM s AS SELECT sym, qty FROM trades WHERE qty >= 2")
    put(db, (1, "A", 1.0, 2), (2, "A", 1.0, 2), (3, None, 1.0, 5), (4, "B", 1.0, None))
    # NULL qty fails the filter; a NULL sym passes through
    assert sorted(db.query("SELECT sym, qty FROM s").fetchall(), key=repr) == sorted(
        [("A", 2), ("A", 2), (None, 5)], key=repr
    )


def test_stream_expressions_and_types(db):
    setup(
        db,
        TRADES,
        "CREATE STREAM e AS SELECT UPPER(sym) AS usym, px * 2 AS px2, qty + 1 AS q1, "
        "CAST(qty AS DOUBLE) / 4 AS quarter, px > 10 AS pricey FROM trades",
    )
    assert db.schema("e") == pa.schema(
        [
            ("usym", pa.string()),
            ("px2", pa.float64()),
            ("q1", pa.int64()),
            ("quarter", pa.float64()),
            ("pricey", pa.bool_()),
        ]
    )
    put(db, (1, "ab", 7.5, 3))
    assert db.query("SELECT usym, px2, q1, quarter, pricey FROM e").fetchall() == [
        ("AB", 15.0, 4, 0.75, False)
    ]


# --------------------------------------------------------------------------- GROUP BY aggregates

AGG_ROWS = [
    (1, "A", 10.0, 1),
    (2, "A", 14.0, 2),
    (5, "B", 20.0, 5),
    (3, "A", 12.0, 2),
    (6, "B", 16.0, 5),
    (4, "A", 12.0, 1),
]
AGG_COLS = ("sym", "n", "q", "avg_px", "lo", "hi", "first_px", "last_px", "n_px", "sd", "var_px")
AGG_SQL = (
    "CREATE STREAM stats AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q, AVG(px) AS avg_px, "
    "MIN(px) AS lo, MAX(px) AS hi, FIRST_VALUE(px) AS first_px, LAST_VALUE(px) AS last_px, "
    "COUNT(DISTINCT px) AS n_px, STDDEV(px) AS sd, VAR(px) AS var_px FROM trades GROUP BY sym"
)
# A: px 10, 14, 12, 12 (arrival order); mean 12; squared deviations 4+4+0+0 = 8 -> sample var 8/3
# B: px 20, 16; mean 18; squared deviations 4+4 = 8 -> sample var 8/1
AGG_EXPECTED = {
    "A": ("A", 4, 6, 12.0, 10.0, 14.0, 10.0, 12.0, 3, math.sqrt(8 / 3), 8 / 3),
    "B": ("B", 2, 10, 18.0, 16.0, 20.0, 20.0, 16.0, 2, math.sqrt(8.0), 8.0),
}


def assert_agg_row(got, expected):
    exact, approx = got[:9], got[9:]
    assert exact == expected[:9]
    assert approx == pytest.approx(expected[9:], rel=1e-9)


def test_group_by_aggregates_state(shard_db):
    db = shard_db
    setup(db, TRADES, AGG_SQL)
    for row in AGG_ROWS:  # one insert per row: arrival order is unambiguous
        put(db, row)
    res = db.query(f"SELECT {', '.join(AGG_COLS)} FROM stats ORDER BY sym")
    got = res.fetchall()
    assert len(got) == 2
    assert_agg_row(got[0], AGG_EXPECTED["A"])
    assert_agg_row(got[1], AGG_EXPECTED["B"])
    assert res.schema.field("n").type == pa.int64()
    assert res.schema.field("q").type == pa.int64()
    assert res.schema.field("avg_px").type == pa.float64()


def test_group_by_aggregates_changelog_folds_to_state(shard_db):
    db = shard_db
    setup(db, TRADES, AGG_SQL)
    sub = db.subscribe_stream("stats")
    changes = []
    for row in AGG_ROWS:
        put(db, row)
        changes.extend(r for b in drain(sub) for r in records(b, *AGG_COLS, "_op"))
    # 6 rows, 2 keys: 2 inserts and 4 updates (a retraction and a new row each)
    assert len(changes) == 2 + 2 * 4
    state = fold_changelog(changes, key_len=1)
    assert sorted(state) == [("A",), ("B",)]
    assert_agg_row(state[("A",)], AGG_EXPECTED["A"])
    assert_agg_row(state[("B",)], AGG_EXPECTED["B"])


def test_stream_state_matches_adhoc_query_over_source(shard_db):
    db = shard_db
    setup(db, TRADES, AGG_SQL)
    rng = random.Random(7)
    for i in range(20):
        put(db, *[(i * 10 + j, f"S{rng.randrange(5)}", float(rng.randrange(50)), rng.randrange(1, 9)) for j in range(10)])
    cols = "sym, n, q, lo, hi, n_px"
    adhoc = db.query(
        "SELECT sym, COUNT(*) AS n, SUM(qty) AS q, MIN(px) AS lo, MAX(px) AS hi, "
        "COUNT(DISTINCT px) AS n_px FROM trades GROUP BY sym ORDER BY sym"
    ).fetchall()
    assert db.query(f"SELECT {cols} FROM stats ORDER BY sym").fetchall() == adhoc
    avg = db.query("SELECT sym, AVG(px), STDDEV(px), VAR(px) FROM trades GROUP BY sym ORDER BY sym").fetchall()
    got = db.query("SELECT sym, avg_px, sd, var_px FROM stats ORDER BY sym").fetchall()
    assert [g[0] for g in got] == [a[0] for a in avg]
    for g, a in zip(got, avg):
        assert g[1:] == pytest.approx(a[1:], rel=1e-9)


def test_group_by_emits_insert_and_update_changes(shard_db):
    db = shard_db
    setup(db, TRADES, "CREATE STREAM totals AS SELECT sym, SUM(qty) AS total FROM trades GROUP BY sym")
    sub = db.subscribe_stream("totals")

    put(db, (1, "A", 1.0, 1))
    batches = drain(sub)
    assert batches and all(b.columns == ["sym", "total", "_op"] for b in batches)
    assert batches[0].schema.field("_op").type == pa.string()
    assert [r for b in batches for r in b.fetchall()] == [("A", 1, "+I")]

    put(db, (2, "B", 1.0, 5))
    assert [r for b in drain(sub) for r in b.fetchall()] == [("B", 5, "+I")]

    put(db, (3, "A", 1.0, 2))
    assert [r for b in drain(sub) for r in b.fetchall()] == [("A", 1, "-U"), ("A", 3, "+U")]

    put(db, (4, "B", 1.0, 1), (5, "C", 1.0, 7))
    assert by_key([r for b in drain(sub) for r in b.fetchall()]) == {
        ("B",): [("B", 5, "-U"), ("B", 6, "+U")],
        ("C",): [("C", 7, "+I")],
    }
    # current state: one row per key, retracted rows gone
    assert db.query("SELECT sym, total FROM totals ORDER BY sym").fetchall() == [("A", 3), ("B", 6), ("C", 7)]


def test_group_by_several_rows_per_key_in_one_insert(shard_db):
    db = shard_db
    setup(
        db,
        TRADES,
        "CREATE STREAM totals AS SELECT sym, COUNT(*) AS n, SUM(qty) AS total FROM trades GROUP BY sym",
    )
    sub = db.subscribe_stream("totals")
    put(db, (1, "A", 1.0, 1), (2, "A", 1.0, 2), (3, "B", 1.0, 4), (4, "A", 1.0, 8))
    put(db, (5, "B", 1.0, 16), (6, "A", 1.0, 32), (7, "B", 1.0, 64))
    changes = [r for b in drain(sub) for r in records(b, "sym", "n", "total", "_op")]
    assert fold_changelog(changes, 1) == {("A",): ("A", 4, 43), ("B",): ("B", 3, 84)}
    assert db.query("SELECT sym, n, total FROM totals ORDER BY sym").fetchall() == [("A", 4, 43), ("B", 3, 84)]


def test_group_by_multiple_keys_and_global_aggregate(db):
    setup(
        db,
        "CREATE SOURCE orders (region VARCHAR, sym VARCHAR, qty BIGINT)",
        "CREATE STREAM by_pair AS SELECT region, sym, SUM(qty) AS q FROM orders GROUP BY region, sym",
        "CREATE STREAM overall AS SELECT COUNT(*) AS n, SUM(qty) AS q FROM orders",
    )
    db.insert(
        "orders",
        [
            {"region": "eu", "sym": "A", "qty": 1},
            {"region": "us", "sym": "A", "qty": 2},
            {"region": "eu", "sym": "A", "qty": 4},
            {"region": "eu", "sym": "B", "qty": 8},
        ],
    )
    assert db.query("SELECT region, sym, q FROM by_pair ORDER BY region, sym").fetchall() == [
        ("eu", "A", 5),
        ("eu", "B", 8),
        ("us", "A", 2),
    ]
    assert db.query("SELECT n, q FROM overall").fetchall() == [(4, 15)]


# --------------------------------------------------------------------------- cascades


def test_cascade_append_over_append(shard_db):
    db = shard_db
    setup(
        db,
        TRADES,
        "CREATE STREAM big AS SELECT ts, sym, px, qty FROM trades WHERE px > 100",
        "CREATE STREAM big_a AS SELECT ts, qty * 10 AS q10 FROM big WHERE sym = 'A'",
    )
    sub = db.subscribe_stream("big_a")
    put(db, (1, "A", 150.0, 1), (2, "A", 50.0, 2), (3, "B", 150.0, 3), (4, "A", 101.0, 4))
    assert sorted(r for b in drain(sub) for r in b.fetchall()) == [(1, 10), (4, 40)]
    assert db.query("SELECT ts, sym FROM big ORDER BY ts").fetchall() == [(1, "A"), (3, "B"), (4, "A")]
    assert db.query("SELECT ts, q10 FROM big_a ORDER BY ts").fetchall() == [(1, 10), (4, 40)]


def test_cascade_aggregate_over_filtered_stream(shard_db):
    db = shard_db
    setup(
        db,
        TRADES,
        "CREATE STREAM big AS SELECT sym, qty FROM trades WHERE px > 100",
        "CREATE STREAM big_totals AS SELECT sym, COUNT(*) AS n, SUM(qty) AS total FROM big GROUP BY sym",
    )
    sub = db.subscribe_stream("big_totals")
    put(db, (1, "A", 150.0, 1), (2, "A", 50.0, 2), (3, "B", 150.0, 3))
    put(db, (4, "A", 101.0, 4), (5, "B", 99.0, 5))
    changes = [r for b in drain(sub) for r in records(b, "sym", "n", "total", "_op")]
    assert fold_changelog(changes, 1) == {("A",): ("A", 2, 5), ("B",): ("B", 1, 3)}
    assert db.query("SELECT sym, n, total FROM big_totals ORDER BY sym").fetchall() == [
        ("A", 2, 5),
        ("B", 1, 3),
    ]


def test_cascade_filter_over_windowed_aggregate(shard_db):
    db = shard_db
    setup(
        db,
        "CREATE SOURCE ticks (ts TIMESTAMP, sym VARCHAR, px DOUBLE, WATERMARK FOR ts)",
        "CREATE STREAM bars AS SELECT sym, COUNT(*) AS n, MAX(px) AS hi FROM ticks "
        "GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)",
        "CREATE STREAM busy AS SELECT sym, window_start, n, hi FROM bars WHERE n >= 2",
    )
    sub = db.subscribe_stream("busy")
    db.insert(
        "ticks",
        [
            {"ts": 10_100, "sym": "A", "px": 1.0},
            {"ts": 10_200, "sym": "B", "px": 5.0},
            {"ts": 10_900, "sym": "A", "px": 3.0},
        ],
    )
    assert drain(sub) == []  # window [10s, 11s) still open
    db.insert("ticks", {"ts": 11_000, "sym": "C", "px": 9.0})  # watermark 11s closes it
    assert poll_rows(sub, ("sym", "window_start", "n", "hi"), 1) == [("A", at(10_000), 2, 3.0)]


# --------------------------------------------------------------------------- shard counts


def _run_pipeline(conn):
    setup(
        conn,
        TRADES,
        "CREATE STREAM totals AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q, MIN(px) AS lo, MAX(px) AS hi "
        "FROM trades GROUP BY sym",
        "CREATE STREAM odd AS SELECT ts, sym, qty FROM trades WHERE qty % 2 = 1",
    )
    sub = conn.subscribe_stream("odd")
    for i in range(10):
        put(conn, *[(i * 100 + j, f"K{(i * 100 + j) % 13}", float((i * 100 + j) % 17), (i * 100 + j) % 7) for j in range(100)])
    totals = sorted(conn.query("SELECT sym, n, q, lo, hi FROM totals").fetchall())
    odd = sorted(conn.query("SELECT ts, sym, qty FROM odd").fetchall())
    delivered = sorted(r for b in drain(sub) for r in b.fetchall())
    return totals, odd, delivered


def test_results_identical_with_one_and_default_shards():
    with laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1)) as one:
        r1 = _run_pipeline(one)
    with laminardb.open(":memory:") as default:
        rd = _run_pipeline(default)
    rows = [(t, f"K{t % 13}", float(t % 17), t % 7) for t in range(1000)]
    expected_totals = sorted(
        (
            k,
            len(g),
            sum(r[3] for r in g),
            min(r[2] for r in g),
            max(r[2] for r in g),
        )
        for k, g in ((k, [r for r in rows if r[1] == k]) for k in {r[1] for r in rows})
    )
    expected_odd = sorted((t, s, q) for t, s, _, q in rows if q % 2 == 1)
    assert r1[0] == rd[0] == expected_totals
    assert r1[1] == rd[1] == expected_odd
    assert r1[2] == rd[2] == expected_odd
