"""Issue 24, bounded join state: a join whose condition does not bound the two rows' times
needs `CREATE STREAM … WITH (state_ttl = …)`, which keeps each row that long (processing
time) after it arrived; without either bound the join is refused, naming both ways out."""

from __future__ import annotations

import time

import pytest

import laminardb

from conftest import poll_rows, wait_until

JOIN = "SELECT o.oid, c.city FROM orders o JOIN customers c ON o.cust = c.cust"


def setup(conn, ttl):
    conn.execute("CREATE SOURCE orders (oid BIGINT, cust VARCHAR)")
    conn.execute("CREATE SOURCE customers (cust VARCHAR, city VARCHAR)")
    conn.execute(f"CREATE STREAM enriched WITH (state_ttl = '{ttl}') AS {JOIN}")


def state(conn):
    m = conn.stream_metrics("enriched")
    return (m.join_left_rows, m.join_right_rows)


def test_rows_meet_within_the_ttl_and_expire_after_it_even_while_nothing_arrives(sharded_db):
    setup(sharded_db, "700 ms")
    sub = sharded_db.subscribe_stream("enriched")
    sharded_db.insert("orders", [{"oid": 1, "cust": "ann"}, {"oid": 2, "cust": "bob"}])
    sharded_db.insert("customers", [{"cust": "ann", "city": "Oslo"}])
    assert poll_rows(sub, ("oid", "city"), 1) == [(1, "Oslo")]
    assert state(sharded_db) == (2, 1)
    # No rows come: the timer expires them.
    assert wait_until(lambda: state(sharded_db) == (0, 0), timeout=5)
    sharded_db.insert("customers", [{"cust": "bob", "city": "Rome"}])
    assert poll_rows(sub, ("oid", "city"), 1, timeout=0.5) == []


def test_state_stays_bounded_while_rows_keep_coming(db):
    setup(db, "300 ms")
    peak = 0
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 2.0:
        db.insert("orders", [{"oid": n + i, "cust": f"c{(n + i) % 50}"} for i in range(100)])
        n += 100
        peak = max(peak, state(db)[0])
        time.sleep(0.01)
    # Far fewer than everything inserted: about what arrives in 300 ms (plus a timer period).
    assert n >= 2_000
    assert peak < n / 2, (peak, n)


def test_the_ttl_state_survives_a_reopen_and_keeps_counting_from_arrival(tmp_path):
    path = str(tmp_path / "db")
    conn = laminardb.open(path)
    setup(conn, "1 hour")
    conn.insert("orders", [{"oid": 7, "cust": "ann"}])
    conn.close()
    conn = laminardb.open(path)
    try:
        sub = conn.subscribe_stream("enriched")
        assert state(conn) == (1, 0)
        conn.insert("customers", [{"cust": "ann", "city": "Oslo"}])
        assert poll_rows(sub, ("oid", "city"), 1) == [(7, "Oslo")]
    finally:
        conn.close()


def test_a_join_without_a_bound_is_refused_naming_both_bounds(db):
    db.execute("CREATE SOURCE orders (oid BIGINT, cust VARCHAR)")
    db.execute("CREATE SOURCE customers (cust VARCHAR, city VARCHAR)")
    for sql in (f"CREATE STREAM s AS {JOIN}", f"CREATE SINK out AS {JOIN}"):
        with pytest.raises(laminardb.LaminarError, match=r"without a bound on its state.*BETWEEN.*state_ttl"):
            db.execute(sql)
    with pytest.raises(laminardb.LaminarError, match="without a bound on its state"):
        db.subscribe(JOIN)
    # Ad hoc, over the rows there are, the same join runs.
    db.insert("orders", [{"oid": 1, "cust": "ann"}])
    db.insert("customers", [{"cust": "ann", "city": "Oslo"}])
    assert db.query(JOIN).to_arrow().to_pylist() == [{"oid": 1, "city": "Oslo"}]


def duckdb_outer(kind, orders, customers):
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    con.register("orders", pa.Table.from_pylist(orders, schema=pa.schema([("oid", pa.int64()), ("cust", pa.string())])))
    con.register(
        "customers", pa.Table.from_pylist(customers, schema=pa.schema([("cid", pa.int64()), ("cust", pa.string())]))
    )
    return con.execute(f"SELECT o.oid, c.cid FROM orders o {kind} JOIN customers c ON o.cust = c.cust").fetchall()


@pytest.mark.parametrize("kind", ["LEFT", "RIGHT", "FULL"])
def test_outer_joins_bounded_by_a_ttl_are_changelogs_whose_fold_equals_duckdb(sharded_db, kind):
    import collections
    import random

    db = sharded_db
    db.execute("CREATE SOURCE orders (oid BIGINT, cust VARCHAR)")
    db.execute("CREATE SOURCE customers (cid BIGINT, cust VARCHAR)")
    db.execute(
        f"CREATE STREAM joined WITH (state_ttl = '1 hour') AS SELECT o.oid, c.cid FROM orders o {kind} JOIN customers c "
        "ON o.cust = c.cust"
    )
    db.execute("CREATE STREAM per_order AS SELECT oid, COUNT(*) AS n FROM joined GROUP BY oid")
    sub = db.subscribe_stream("joined")
    rng = random.Random(len(kind))
    orders = [{"oid": i, "cust": rng.choice([None, *[f"c{k}" for k in range(60)]])} for i in range(1_500)]
    customers = [{"cid": i, "cust": f"c{rng.randrange(90)}"} for i in range(400)]
    rows = [("orders", r) for r in orders] + [("customers", r) for r in customers]
    rng.shuffle(rows)
    for k in range(0, len(rows), 37):
        chunk = rows[k : k + 37]
        for name in ("orders", "customers"):
            part = [r for n, r in chunk if n == name]
            if part:
                db.insert(name, part)
    changes = []
    while (b := sub.try_next()) is not None:
        changes.extend((r["oid"], r["cid"], r["_op"]) for r in b.to_arrow().to_pylist())
    # Folded, the changelog is the batch join; every retraction takes back a row emitted before.
    bag = collections.Counter()
    for oid, cid, op in changes:
        bag[(oid, cid)] += 1 if op == "+I" else -1
        assert bag[(oid, cid)] >= 0, (oid, cid, op)
    want = collections.Counter(duckdb_outer(kind, orders, customers))
    assert +bag == want
    assert any(op == "-D" for *_, op in changes)
    # A query of the stream reads the current result; an aggregate reads the changelog.
    now = collections.Counter((r["oid"], r["cid"]) for r in db.query("SELECT oid, cid FROM joined").to_arrow().to_pylist())
    assert now == want
    per_order = collections.Counter(oid for oid, _ in want.elements())
    got = {r["oid"]: r["n"] for r in db.query("SELECT oid, n FROM per_order").to_arrow().to_pylist() if r["n"]}
    assert got == dict(per_order)


def test_an_outer_join_changelog_survives_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    config = laminardb.LaminarConfig(checkpoint_interval_ms=100_000)
    db = laminardb.open(path, config=config)
    db.execute("CREATE SOURCE orders (oid BIGINT, cust VARCHAR)")
    db.execute("CREATE SOURCE customers (cid BIGINT, cust VARCHAR)")
    db.execute(
        "CREATE STREAM joined WITH (state_ttl = '1 hour') AS SELECT o.oid, c.cid FROM orders o LEFT JOIN customers c "
        "ON o.cust = c.cust"
    )
    db.insert("orders", [{"oid": 1, "cust": "a"}, {"oid": 2, "cust": "b"}])
    db.checkpoint()
    db.insert("customers", [{"cid": 10, "cust": "a"}])
    db.close()
    db = laminardb.open(path, config=config)
    try:
        sub = db.subscribe_stream("joined")
        # Order 1 already met customer 10 (replayed from the WAL): a second customer of a
        # retracts nothing; order 2's padded row goes when b arrives.
        db.insert("customers", [{"cid": 11, "cust": "a"}, {"cid": 12, "cust": "b"}])
        got = sorted(((r["oid"], r["cid"], r["_op"]) for b in poll_batches_all(sub) for r in b.to_arrow().to_pylist()), key=repr)
        assert got == [(1, 11, "+I"), (2, 12, "+I"), (2, None, "-D")]
        now = sorted((r["oid"], r["cid"]) for r in db.query("SELECT oid, cid FROM joined").to_arrow().to_pylist())
        assert now == [(1, 10), (1, 11), (2, 12)]
    finally:
        db.close()


def poll_batches_all(sub):
    from conftest import poll_batches

    return poll_batches(sub, lambda bs: sum(b.num_rows for b in bs) >= 3)


def test_an_outer_join_feeding_group_by_in_one_stream_is_refused(db):
    db.execute("CREATE SOURCE orders (oid BIGINT, cust VARCHAR)")
    db.execute("CREATE SOURCE customers (cid BIGINT, cust VARCHAR)")
    with pytest.raises(laminardb.LaminarError, match="create the join as a stream"):
        db.execute(
            "CREATE STREAM s WITH (state_ttl = '1 hour') AS SELECT o.cust, COUNT(*) AS n FROM orders o LEFT JOIN "
            "customers c ON o.cust = c.cust GROUP BY o.cust"
        )
    with pytest.raises(laminardb.LaminarError, match="state_ttl = '1 hour'"):
        db.execute("CREATE STREAM s AS SELECT o.oid FROM orders o LEFT JOIN customers c ON o.cust = c.cust")
