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
