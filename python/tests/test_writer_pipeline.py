"""Issue 23, item 7: `Writer.insert` pipelines. A call returns once its rows are queued;
`flush()` (and every call of the writer's connection) waits until they are stored; a row's
own errors are raised by its call; nothing accepted is lost, not at `close()`, not when the
writer is dropped unflushed, not across a reopen."""

from __future__ import annotations

import gc
import threading

import pytest

import laminardb
from laminardb import codes

from conftest import count, poll_rows, records


def trades(conn, shards=None):
    conn.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE, qty BIGINT)")


def row(i):
    return {"ts": i, "symbol": f"S{i % 7}", "price": float(i % 100) + 0.5, "qty": i % 13}


def expected_sums(n):
    return sum(i % 13 for i in range(n)), sum(float(i % 100) + 0.5 for i in range(n))


def sums(conn):
    return tuple(conn.query("SELECT SUM(qty) AS q, SUM(price) AS p FROM trades").fetchall()[0])


def test_every_row_of_a_fast_feed_is_stored_exactly(sharded_db):
    trades(sharded_db)
    w = sharded_db.writer("trades")
    n = 50_000
    for i in range(n):
        w.insert(row(i))
    assert w.flush() == 0
    assert count(sharded_db, "trades") == n
    assert sums(sharded_db) == expected_sums(n)


def test_queued_rows_reach_a_subscriber_without_flush(db):
    """The rows gathered while an insert was in flight are sent by the writer's flusher:
    a subscriber gets every one with no further call on the writer."""
    trades(db)
    db.execute("CREATE STREAM big AS SELECT ts, qty FROM trades WHERE qty > 5")
    sub = db.subscribe_stream("big")
    w = db.writer("trades")
    n = 20_000
    for i in range(n):
        w.insert(row(i))
    want = sorted((i, i % 13) for i in range(n) if i % 13 > 5)
    got = poll_rows(sub, ("ts", "qty"), len(want), timeout=20)
    assert sorted(got) == want


def test_a_reused_dict_keeps_each_calls_values(db):
    trades(db)
    w = db.writer("trades")
    r = {"ts": 0, "symbol": "A", "price": 1.0, "qty": 1}
    for i in range(1_000):
        r["ts"], r["qty"] = i, i
        w.insert(r)
    w.flush()
    assert sorted(x[0] for x in records(db.query("SELECT ts FROM trades"), "ts")) == list(range(1_000))
    assert db.query("SELECT SUM(qty) AS q FROM trades").fetchall()[0][0] == sum(range(1_000))


def test_order_is_kept_across_rows_lists_and_frames():
    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1))
    try:
        trades(conn)
        w = conn.writer("trades")
        w.insert(row(0))
        w.insert([row(1), row(2)])
        w.insert(row(3))
        import pyarrow as pa

        w.insert(pa.Table.from_pylist([row(4)], schema=w.schema))
        w.insert(row(5))
        conn.insert("trades", row(6))  # the connection's insert comes after the writer's rows
        w.insert(row(7))
        w.close()
        assert [r[0] for r in records(conn.query("SELECT ts FROM trades"), "ts")] == list(range(8))
    finally:
        conn.close()


def test_a_bad_row_is_refused_by_its_own_call_and_the_others_stay(db):
    db.execute("CREATE SOURCE t (ts BIGINT NOT NULL, small TINYINT, name VARCHAR)")
    w = db.writer("t")
    w.insert({"ts": 1, "small": 1, "name": "a"})
    with pytest.raises(laminardb.IngestionError) as e:
        w.insert({"ts": 2, "small": 300, "name": "b"})  # out of TINYINT's range
    assert e.value.code == codes.BATCH_SCHEMA_MISMATCH
    with pytest.raises(laminardb.LaminarError):
        w.insert({"ts": None, "small": 1, "name": "c"})  # NULL into NOT NULL
    with pytest.raises(laminardb.LaminarError):
        w.insert({"ts": 4, "nope": 1})  # unknown column
    w.insert({"ts": 5, "small": None})  # absent and None columns are nulls
    w.close()
    assert records(db.query("SELECT ts, small, name FROM t ORDER BY ts"), "ts", "small", "name") == [
        (1, 1, "a"),
        (5, None, None),
    ]


def test_insert_into_a_dropped_source_raises(db):
    trades(db)
    w = db.writer("trades")
    w.insert(row(0))
    db.execute("DROP SOURCE trades")  # the connection's call stores row 0 first
    with pytest.raises(laminardb.LaminarError) as e:
        w.insert(row(1))
    assert e.value.code == codes.TABLE_NOT_FOUND
    assert "not stored" in str(e.value)


def test_many_threads_share_one_writer(db):
    trades(db)
    w = db.writer("trades")
    threads, per = 4, 5_000

    def feed(t):
        for i in range(t * per, (t + 1) * per):
            w.insert(row(i))

    workers = [threading.Thread(target=feed, args=(t,)) for t in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    w.flush()
    assert count(db, "trades") == threads * per
    assert sums(db) == expected_sums(threads * per)


def test_watermark_comes_after_the_queued_rows(db):
    db.execute(
        "CREATE SOURCE ticks (ts TIMESTAMP(3), v BIGINT, WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)"
    )
    db.execute(
        "CREATE STREAM sums AS SELECT window_start, SUM(v) AS total, COUNT(*) AS n "
        "FROM ticks GROUP BY TUMBLE(ts, INTERVAL '1' SECOND)"
    )
    sub = db.subscribe_stream("sums")
    w = db.writer("ticks")
    base = 1_700_000_000_000
    for i in range(3_000):
        w.insert({"ts": base + i, "v": i})  # three 1-second windows
    w.watermark(base + 3_000)
    got = poll_rows(sub, ("total", "n"), 3)
    assert got == [(sum(range(s, s + 1000)), 1000) for s in (0, 1000, 2000)]
    assert db.stream_metrics("sums").late_events == 0


@pytest.mark.parametrize("ending", ["close_db", "drop_writer", "close_writer"])
def test_accepted_rows_survive_a_reopen(tmp_path, ending):
    path = str(tmp_path / "db")
    conn = laminardb.open(path, config=laminardb.LaminarConfig(shards=2))
    trades(conn)
    w = conn.writer("trades")
    n = 10_000
    for i in range(n):
        w.insert(row(i))
    if ending == "drop_writer":
        del w
        gc.collect()
    elif ending == "close_writer":
        w.close()
    conn.close()  # no flush(): the connection waits for its writers' rows
    conn = laminardb.open(path, config=laminardb.LaminarConfig(shards=2))
    try:
        assert count(conn, "trades") == n
        assert sums(conn) == expected_sums(n)
    finally:
        conn.close()


def test_closed_writer_refuses_and_flush_after_close_raises(db):
    trades(db)
    w = db.writer("trades")
    w.insert(row(0))
    w.close()
    assert repr(w) == "Writer(closed)"
    with pytest.raises(laminardb.IngestionError):
        w.insert(row(1))
    with pytest.raises(laminardb.IngestionError):
        w.flush()
    assert count(db, "trades") == 1
