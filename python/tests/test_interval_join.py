"""Issue 24: interval joins (`ON o.k = f.k AND f.ts BETWEEN o.ts - … AND o.ts + …`).

Each pair is emitted once, when its later row arrives; the watermark bounds the state (a
row goes once no row still to come can meet it) and rows behind it are late. Checked
against DuckDB's batch join of the same rows on random out-of-order input, on 1 and 2
shards."""

from __future__ import annotations

import random

import duckdb
import pyarrow as pa
import pytest

import laminardb

from conftest import poll_rows, wait_until

BASE = 1_700_000_000_000
CONDITION = "f.ts BETWEEN o.ts - INTERVAL '2' SECOND AND o.ts + INTERVAL '3' SECOND"
SELECT = f"SELECT o.oid, o.ts AS ots, f.fid, f.ts AS fts FROM orders o JOIN fills f ON o.k = f.k AND {CONDITION}"


def setup(conn):
    for name, id_col in (("orders", "oid"), ("fills", "fid")):
        conn.execute(
            f"CREATE SOURCE {name} (k VARCHAR, ts TIMESTAMP(3), {id_col} BIGINT, "
            "WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
        )


def random_rows(rng, n, id_col, keys, span_ms):
    rows = [{"k": f"K{rng.randrange(keys)}", "ts": BASE + rng.randrange(span_ms), id_col: i} for i in range(n)]
    # Out of order by up to 500 ms, within the watermark's delay (1 s): none is late.
    return sorted(rows, key=lambda r: r["ts"] + rng.randrange(500))


def feed(conn, orders, fills, batches):
    for b in range(batches):
        conn.insert("orders", orders[b * len(orders) // batches : (b + 1) * len(orders) // batches])
        conn.insert("fills", fills[b * len(fills) // batches : (b + 1) * len(fills) // batches])


def end_time(conn, at):
    for source in ("orders", "fills"):
        conn.writer(source).watermark(at)


def duckdb_with(orders, fills):
    """DuckDB with the rows as tables `orders` and `fills` (times as TIMESTAMPs)."""
    con = duckdb.connect()
    for name, rows in (("orders", orders), ("fills", fills)):
        table = pa.Table.from_pylist(rows)
        table = table.set_column(table.schema.get_field_index("ts"), "ts", table["ts"].cast(pa.timestamp("ms")))
        con.register(name, table)
    return con


def duckdb_join(orders, fills):
    out = duckdb_with(orders, fills).execute(SELECT).fetchall()
    return sorted((oid, fid) for oid, _, fid, _ in out)


@pytest.mark.parametrize("batches", [1, 40])
def test_the_stream_equals_duckdb_on_random_out_of_order_input(sharded_db, batches):
    setup(sharded_db)
    sharded_db.execute(f"CREATE STREAM matched AS {SELECT}")
    sub = sharded_db.subscribe_stream("matched")
    rng = random.Random(11 + batches)
    orders = random_rows(rng, 4_000, "oid", 50, 120_000)
    fills = random_rows(rng, 4_000, "fid", 50, 120_000)
    feed(sharded_db, orders, fills, batches)
    want = duckdb_join(orders, fills)
    got = sorted(poll_rows(sub, ("oid", "fid"), len(want), timeout=20))
    assert len(want) > 3_000
    assert got == want
    m = sharded_db.stream_metrics("matched")
    assert m.late_events == 0
    # Past every row, nothing can meet anything: the state is empty.
    end_time(sharded_db, BASE + 10 * 60_000)
    assert wait_until(lambda: (lambda m: (m.join_left_rows, m.join_right_rows))(sharded_db.stream_metrics("matched")) == (0, 0))


def duckdb_outer(kind, orders, fills):
    con = duckdb_with(orders, fills)
    sql = f"SELECT o.oid, f.fid FROM orders o {kind} JOIN fills f ON o.k = f.k AND {CONDITION}"
    return sorted(con.execute(sql).fetchall(), key=repr)


@pytest.mark.parametrize("kind", ["LEFT", "RIGHT", "FULL"])
def test_outer_joins_equal_duckdb_once_the_watermark_passes_every_row(sharded_db, kind):
    setup(sharded_db)
    sharded_db.execute(
        f"CREATE STREAM matched AS SELECT o.oid, f.fid FROM orders o {kind} JOIN fills f ON o.k = f.k AND {CONDITION}"
    )
    sub = sharded_db.subscribe_stream("matched")
    rng = random.Random(3)
    orders = random_rows(rng, 2_000, "oid", 40, 300_000)
    fills = random_rows(rng, 2_000, "fid", 40, 300_000)
    orders.append({"k": None, "ts": BASE, "oid": 99_999})
    feed(sharded_db, orders, fills, 20)
    end_time(sharded_db, BASE + 10 * 60_000)
    want = duckdb_outer(kind, orders, fills)
    got = sorted(poll_rows(sub, ("oid", "fid"), len(want), timeout=20), key=repr)
    padded = sum(1 for o, f in want if o is None or f is None)
    assert padded > 300 and len(want) - padded > 300, (padded, len(want))
    assert got == want


def duckdb_exists(negate, orders, fills, where=""):
    con = duckdb_with(orders, fills)
    sql = f"SELECT o.oid FROM orders o WHERE {negate} EXISTS (SELECT 1 FROM fills f WHERE o.k = f.k AND {CONDITION}){where}"
    return sorted(r[0] for r in con.execute(sql).fetchall())


@pytest.mark.parametrize("negate", ["", "NOT"])
def test_exists_and_not_exists_emit_each_order_once_and_equal_duckdb(sharded_db, negate):
    setup(sharded_db)
    where = " AND o.oid % 3 <> 0"
    sharded_db.execute(
        f"CREATE STREAM picked AS SELECT o.oid FROM orders o WHERE {negate} EXISTS "
        f"(SELECT 1 FROM fills f WHERE o.k = f.k AND {CONDITION}){where}"
    )
    sub = sharded_db.subscribe_stream("picked")
    rng = random.Random(17)
    orders = random_rows(rng, 3_000, "oid", 60, 300_000)
    fills = random_rows(rng, 1_500, "fid", 60, 300_000)
    orders.append({"k": None, "ts": BASE + 5, "oid": 100_000})
    feed(sharded_db, orders, fills, 30)
    end_time(sharded_db, BASE + 10 * 60_000)
    want = duckdb_exists(negate, orders, fills, where)
    got = sorted(r[0] for r in poll_rows(sub, ("oid",), len(want), timeout=20))
    assert 500 < len(want) < 2_000, len(want)
    assert got == want
    assert wait_until(lambda: sharded_db.stream_metrics("picked").join_left_rows == 0)


def test_exists_without_a_time_bound_and_not_in_are_refused(db):
    setup(db)
    with pytest.raises(laminardb.LaminarError, match=r"EXISTS \(or IN\) over a subquery in a stream without a time bound"):
        db.execute("CREATE STREAM s AS SELECT o.oid FROM orders o WHERE EXISTS (SELECT 1 FROM fills f WHERE f.k = o.k)")
    with pytest.raises(laminardb.LaminarError, match=r"EXISTS \(or IN\) over a subquery in a stream without a time bound"):
        db.execute("CREATE STREAM s AS SELECT o.oid FROM orders o WHERE o.k IN (SELECT f.k FROM fills f)")
    with pytest.raises(laminardb.LaminarError, match="NOT EXISTS over a subquery in a stream without a time bound"):
        db.execute("CREATE STREAM s AS SELECT o.oid FROM orders o WHERE NOT EXISTS (SELECT 1 FROM fills f WHERE f.k = o.k)")
    with pytest.raises(laminardb.LaminarError, match="NOT IN"):
        db.execute(
            "CREATE STREAM s AS SELECT o.oid FROM orders o WHERE o.k NOT IN (SELECT f.k FROM fills f WHERE "
            f"{CONDITION})"
        )


def test_the_watermark_bounds_the_state_as_rows_stream_through(sharded_db):
    setup(sharded_db)
    sharded_db.execute(f"CREATE STREAM matched AS {SELECT}")
    rng = random.Random(5)
    # 100 s of rows, 200 per second per side, fed in order of time in 2-second slices.
    n, span = 20_000, 100_000
    orders = random_rows(rng, n, "oid", 20, span)
    fills = random_rows(rng, n, "fid", 20, span)
    peak = [0, 0]
    for b in range(50):
        sharded_db.insert("orders", orders[b * n // 50 : (b + 1) * n // 50])
        sharded_db.insert("fills", fills[b * n // 50 : (b + 1) * n // 50])
        m = sharded_db.stream_metrics("matched")
        peak = [max(peak[0], m.join_left_rows), max(peak[1], m.join_right_rows)]
    # A row is kept while the other side's rows still to come can meet it: orders for 3 s
    # behind the watermark, fills for 2 s, plus the watermark's 1 s delay and one 2 s slice
    # (200 rows a second): far under the 20,000 fed to each side.
    assert 0 < peak[0] <= 200 * (3 + 1 + 2 + 1), peak
    assert 0 < peak[1] <= 200 * (2 + 1 + 2 + 1), peak
    assert sharded_db.stream_metrics("matched").late_events == 0


def test_late_rows_are_dropped_and_counted(db):
    setup(db)
    db.execute(f"CREATE STREAM matched AS {SELECT}")
    sub = db.subscribe_stream("matched")
    db.insert("orders", [{"k": "A", "ts": BASE + 10_000, "oid": 1}])
    db.insert("fills", [{"k": "A", "ts": BASE + 11_000, "fid": 1}])
    assert poll_rows(sub, ("oid", "fid"), 1) == [(1, 1)]
    end_time(db, BASE + 12_000)
    # Behind the watermark (12 s): late, although order 1 is still kept (until the
    # watermark passes its time + 3 s, 13 s).
    db.insert("fills", [{"k": "A", "ts": BASE + 11_500, "fid": 2}])
    db.insert("fills", [{"k": "A", "ts": BASE + 12_500, "fid": 3}])
    assert poll_rows(sub, ("oid", "fid"), 1) == [(1, 3)]
    assert db.stream_metrics("matched").late_events == 1


def test_the_join_state_survives_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    conn = laminardb.open(path)
    setup(conn)
    conn.execute(f"CREATE STREAM matched AS {SELECT}")
    conn.insert("orders", [{"k": "A", "ts": BASE, "oid": 7}, {"k": "B", "ts": BASE, "oid": 8}])
    conn.close()
    conn = laminardb.open(path)
    try:
        sub = conn.subscribe_stream("matched")
        assert conn.stream_metrics("matched").join_left_rows == 2
        conn.insert("fills", [{"k": "A", "ts": BASE + 2_500, "fid": 1}, {"k": "B", "ts": BASE + 3_500, "fid": 2}])
        assert poll_rows(sub, ("oid", "fid"), 1) == [(7, 1)]
    finally:
        conn.close()


def test_an_ad_hoc_query_runs_the_same_join(db):
    setup(db)
    db.insert("orders", [{"k": "A", "ts": BASE, "oid": 1}, {"k": "A", "ts": BASE + 10_000, "oid": 2}])
    db.insert("fills", [{"k": "A", "ts": BASE + 3_000, "fid": 1}, {"k": "A", "ts": BASE + 8_000, "fid": 2}])
    rows = db.query(SELECT + " ORDER BY oid, fid").to_arrow().to_pylist()
    assert [(r["oid"], r["fid"]) for r in rows] == [(1, 1), (2, 2)]


def test_equal_times_bound_the_join_too(db):
    setup(db)
    db.execute("CREATE STREAM same AS SELECT o.oid, f.fid FROM orders o JOIN fills f ON o.k = f.k AND f.ts = o.ts")
    sub = db.subscribe_stream("same")
    db.insert("orders", [{"k": "A", "ts": BASE + t, "oid": t} for t in range(0, 5_000, 10)])
    db.insert("fills", [{"k": "A", "ts": BASE + t, "fid": t} for t in range(0, 5_000, 25)])
    assert sorted(poll_rows(sub, ("oid", "fid"), 100)) == [(t, t) for t in range(0, 5_000, 50)]
    m = db.stream_metrics("same")
    # Only what is within about the watermark's delay (1 s) of the newest row is kept.
    assert m.join_left_rows <= 110 and m.join_right_rows <= 45, (m.join_left_rows, m.join_right_rows)


def test_a_join_bounded_one_way_only_needs_a_state_ttl(db):
    setup(db)
    one_way = "SELECT o.oid, f.fid FROM orders o JOIN fills f ON o.k = f.k AND f.ts >= o.ts"
    with pytest.raises(laminardb.LaminarError, match="without a bound on its state"):
        db.execute(f"CREATE STREAM after AS {one_way}")
    db.execute(f"CREATE STREAM after WITH (state_ttl = '1 hour') AS {one_way}")
    sub = db.subscribe_stream("after")
    db.insert("orders", [{"k": "A", "ts": BASE, "oid": 1}])
    end_time(db, BASE + 60_000)
    db.insert("fills", [{"k": "A", "ts": BASE + 70_000, "fid": 1}])
    assert poll_rows(sub, ("oid", "fid"), 1) == [(1, 1)]


def test_an_interval_on_a_column_without_the_watermark_bounds_nothing(db):
    db.execute("CREATE SOURCE a (ts TIMESTAMP(3), at TIMESTAMP(3), k VARCHAR, n BIGINT, WATERMARK FOR ts)")
    db.execute("CREATE SOURCE b (ts TIMESTAMP(3), k VARCHAR, n BIGINT, WATERMARK FOR ts)")
    on_at = "SELECT a.k FROM a JOIN b ON a.k = b.k AND b.ts BETWEEN a.at AND a.at + INTERVAL '1' SECOND"
    with pytest.raises(laminardb.LaminarError, match="without a bound on its state .its condition on time compares TIMESTAMP"):
        db.execute(f"CREATE STREAM s AS {on_at}")
    # A band on numbers is no time bound either; with a state_ttl both are plain joins.
    on_n = "SELECT a.k FROM a JOIN b ON a.k = b.k AND b.n BETWEEN a.n - 1 AND a.n + 1"
    with pytest.raises(laminardb.LaminarError, match=r"without a bound on its state \(it would"):
        db.execute(f"CREATE STREAM s AS {on_n}")
    db.execute(f"CREATE STREAM s1 WITH (state_ttl = '1 hour') AS {on_at}")
    db.execute(f"CREATE STREAM s2 WITH (state_ttl = '1 hour') AS {on_n}")
