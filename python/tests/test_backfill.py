"""Backfill: a stream or materialized view created over inputs that already retain rows
starts from those rows, then goes on with new ones — no row counted twice, none missed,
also while another thread inserts during the CREATE. A subscription's query
(`subscribe(sql)`) and a sink's `AS SELECT` start with the rows that arrive after them."""

from __future__ import annotations

import threading

import pytest

import laminardb


def trades(db, ts0, n, syms="ABC"):
    db.insert("trades", [{"ts": t, "sym": syms[t % len(syms)], "qty": 1 + t % 5} for t in range(ts0, ts0 + n)])


def test_a_view_created_after_rows_shows_all_of_them_while_inserts_race_the_create(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE trades (ts BIGINT, sym VARCHAR, qty BIGINT)")
    trades(db, 0, 1000)
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set() or i < 50:
            db.insert("trades", [{"ts": 10_000 + i, "sym": "D", "qty": 2}])
            written.append(i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        db.execute("CREATE MATERIALIZED VIEW per_sym AS SELECT sym, COUNT(*) AS n, SUM(qty) AS q FROM trades GROUP BY sym")
        db.execute("CREATE STREAM copy AS SELECT ts, sym, qty FROM trades")
    finally:
        stop.set()
        t.join()
    d = len(written)
    got = {r["sym"]: (r["n"], r["q"]) for r in db.query("SELECT sym, n, q FROM per_sym").to_arrow().to_pylist()}
    qty = {s: sum(1 + i % 5 for i in range(1000) if "ABC"[i % 3] == s) for s in "ABC"}
    assert got == {"A": (334, qty["A"]), "B": (333, qty["B"]), "C": (333, qty["C"]), "D": (d, 2 * d)}
    rows = db.query("SELECT COUNT(*) AS n, COUNT(DISTINCT ts) AS distinct_ts FROM copy").to_arrow().to_pylist()
    assert rows == [{"n": 1000 + d, "distinct_ts": 1000 + d}]


def test_a_windowed_stream_created_later_closes_the_windows_its_rows_fill(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE trades (ts BIGINT, sym VARCHAR, qty BIGINT, WATERMARK FOR ts)")
    trades(db, 0, 2500)  # ts 0..2499: windows [0,1000) and [1000,2000) closed by the watermark
    db.execute(
        "CREATE STREAM bars AS SELECT sym, window_start, SUM(qty) AS q, COUNT(*) AS n FROM trades "
        "GROUP BY sym, TUMBLE(ts, INTERVAL '1' SECOND)"
    )
    got = sorted((r["sym"], r["window_start"], r["n"]) for r in db.query("SELECT * FROM bars").to_arrow().to_pylist())
    want = sorted((s, w, sum(1 for i in range(w, w + 1000) if "ABC"[i % 3] == s)) for s in "ABC" for w in (0, 1000))
    assert got == want
    trades(db, 2500, 600)  # the third window closes with rows from before and after the CREATE
    third = sorted((r["sym"], r["n"]) for r in db.query("SELECT * FROM bars WHERE window_start = 2000").to_arrow().to_pylist())
    assert third == sorted((s, sum(1 for i in range(2000, 3000) if "ABC"[i % 3] == s)) for s in "ABC")


def test_streams_over_streams_and_joins_backfill_too(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE trades (ts BIGINT, sym VARCHAR, qty BIGINT)")
    db.execute("CREATE SOURCE names (sym VARCHAR, name VARCHAR)")
    db.execute("CREATE STREAM counts AS SELECT sym, COUNT(*) AS n FROM trades GROUP BY sym")
    trades(db, 0, 300)
    db.insert("names", [{"sym": s, "name": s.lower()} for s in "AB"])
    # A changelog stream's current result is what a stream over it starts from.
    db.execute("CREATE STREAM total AS SELECT SUM(n) AS n FROM counts")
    db.execute("CREATE STREAM named WITH (state_ttl = '1 hour') AS SELECT t.ts, n.name FROM trades t JOIN names n ON t.sym = n.sym")
    trades(db, 300, 30)
    assert db.query("SELECT n FROM total").to_arrow().to_pylist() == [{"n": 330}]
    named = db.query("SELECT name, COUNT(*) AS c FROM named GROUP BY name ORDER BY name").to_arrow().to_pylist()
    assert named == [{"name": "a", "c": 110}, {"name": "b", "c": 110}]


def test_a_subscription_query_starts_with_new_rows():
    db = laminardb.open(":memory:")
    try:
        db.execute("CREATE SOURCE trades (ts BIGINT, sym VARCHAR, qty BIGINT)")
        trades(db, 0, 100)
        sub = db.subscribe("SELECT ts FROM trades WHERE qty > 0")
        trades(db, 100, 3)
        got = []
        while (batch := sub.next_timeout(1.0)) is not None:
            got += batch.to_dicts()["ts"]
            if len(got) >= 3:
                break
        assert sorted(got) == [100, 101, 102]
        sub.cancel()
    finally:
        db.close()
