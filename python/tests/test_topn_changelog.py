"""Issue 24, Top-N per key as a changelog: ROW_NUMBER() OVER (PARTITION BY … ORDER BY …)
filtered by rn <= N over an append-only stream, and its rn = 1 forms (the latest row per
key, the first row per key). Each partition keeps its current first N rows; the stream
emits `-D` for rows leaving them and `+I` for rows entering. The folded changelog, and an
ad-hoc query of the stream, equal DuckDB's ROW_NUMBER over every row, on 1 and 2 shards."""

from __future__ import annotations

import collections
import random

import duckdb
import pyarrow as pa
import pytest

import laminardb

from conftest import fold_changelog, poll_batches, wait_until

TRADES = "CREATE SOURCE trades (id BIGINT, ts BIGINT, sym VARCHAR, px DOUBLE)"


def random_trades(seed, n=5_000, symbols=40):
    rng = random.Random(seed)
    # Prices on a coarse grid, so ties happen; the id makes every row distinct.
    return [
        {"id": i, "ts": rng.randrange(100_000), "sym": f"S{rng.randrange(symbols)}", "px": rng.randrange(200) / 4}
        for i in range(n)
    ]


def duckdb_rows(rows, select):
    con = duckdb.connect()
    con.register("trades", pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.int64()), ("ts", pa.int64()), ("sym", pa.string()), ("px", pa.float64())]
    )))
    return con.execute(select).fetchall()


def feed_and_collect(db, stream, rows, cols):
    """Inserts `rows` in batches of mixed sizes; the stream's changes as `(*cols, _op)`."""
    sub = db.subscribe_stream(stream)
    rng = random.Random(1)
    k = 0
    while k < len(rows):
        step = rng.choice([1, 7, 100, 500])
        db.insert("trades", rows[k : k + step])
        k += step
    # Changes are queued before each insert returns (read-your-writes).
    batches = poll_batches(sub, lambda bs: False, timeout=0.5)
    return [tuple(r[c] for c in (*cols, "_op")) for b in batches for r in b.to_arrow().to_pylist()]


def test_top_three_prices_per_symbol_with_their_numbers_equal_duckdb(sharded_db):
    db = sharded_db
    db.execute(TRADES)
    inner = "SELECT sym, px, id, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY px DESC, id) AS rn FROM trades"
    db.execute(f"CREATE STREAM top3 AS SELECT sym, rn, px, id FROM ({inner}) WHERE rn <= 3")
    rows = random_trades(3)
    changes = feed_and_collect(db, "top3", rows, ("sym", "rn", "px", "id"))
    assert any(op == "-D" for *_, op in changes)
    state = fold_changelog(changes, key_len=2)
    want = duckdb_rows(rows, f"SELECT sym, rn, px, id FROM ({inner}) WHERE rn <= 3")
    assert sorted(state.values()) == sorted(want)
    assert len(want) == 120
    # A query of the stream reads the current rows.
    now = db.query("SELECT sym, rn, px, id FROM top3").to_arrow().to_pylist()
    assert sorted(tuple(r.values()) for r in now) == sorted(want)


def test_the_latest_row_per_key_and_the_first_row_per_key(sharded_db):
    db = sharded_db
    db.execute(TRADES)
    latest = "SELECT sym, ts, px, id, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY ts DESC) AS rn FROM trades"
    first = "SELECT sym, ts, px, id, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY ts) AS rn FROM trades"
    db.execute(f"CREATE STREAM latest AS SELECT sym, ts, px, id FROM ({latest}) WHERE rn = 1")
    db.execute(f"CREATE STREAM first_seen AS SELECT sym, ts, id FROM ({first}) WHERE rn = 1")
    rows = random_trades(5, n=3_000)
    subs = {name: db.subscribe_stream(name) for name in ("latest", "first_seen")}
    for k in range(0, len(rows), 64):
        db.insert("trades", rows[k : k + 64])
    got = {}
    for name, cols in (("latest", ("sym", "ts", "px", "id")), ("first_seen", ("sym", "ts", "id"))):
        batches = poll_batches(subs[name], lambda bs: False, timeout=0.5)
        changes = [tuple(r[c] for c in (*cols, "_op")) for b in batches for r in b.to_arrow().to_pylist()]
        got[name] = fold_changelog(changes, key_len=1)
    # Ties on ts are broken by every column, in order: the smallest (ts, px, id…) first.
    want_latest = duckdb_rows(
        rows, "SELECT sym, ts, px, id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY ts DESC, "
        "id, px) AS rn FROM trades) WHERE rn = 1"
    )
    want_first = duckdb_rows(
        rows, "SELECT sym, ts, id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY ts, id, px) AS rn "
        "FROM trades) WHERE rn = 1"
    )
    assert sorted(got["latest"].values()) == sorted(want_latest)
    assert sorted(got["first_seen"].values()) == sorted(want_first)


def test_without_the_row_number_only_rows_entering_or_leaving_change(sharded_db):
    db = sharded_db
    db.execute(TRADES)
    db.execute(
        "CREATE STREAM top2 AS SELECT sym, px FROM (SELECT sym, px, ROW_NUMBER() OVER (PARTITION BY sym "
        "ORDER BY px DESC) AS rn FROM trades) WHERE rn <= 2"
    )
    sub = db.subscribe_stream("top2")
    db.insert("trades", [{"id": 1, "ts": 1, "sym": "A", "px": 5.0}, {"id": 2, "ts": 2, "sym": "A", "px": 7.0}])
    db.insert("trades", [{"id": 3, "ts": 3, "sym": "A", "px": 6.0}, {"id": 4, "ts": 4, "sym": "A", "px": 1.0}])
    db.insert("trades", [{"id": 5, "ts": 5, "sym": "A", "px": 7.0}])
    batches = poll_batches(sub, lambda bs: sum(b.num_rows for b in bs) >= 6)
    changes = [(r["sym"], r["px"], r["_op"]) for b in batches for r in b.to_arrow().to_pylist()]
    # The first insert's two rows may reach the partition in one batch or two (2 shards);
    # then 6 pushes 5 out, 1 enters nothing, and the second 7 (ties on px go by the other
    # columns: id 2 before id 5) pushes 6 out.
    assert sorted(changes[:2]) == [("A", 5.0, "+I"), ("A", 7.0, "+I")]
    assert changes[2:] == [("A", 5.0, "-D"), ("A", 6.0, "+I"), ("A", 6.0, "-D"), ("A", 7.0, "+I")]
    bag = collections.Counter()
    for sym, px, op in changes:
        bag[(sym, px)] += 1 if op == "+I" else -1
    assert +bag == collections.Counter({("A", 7.0): 2})


def test_a_top_n_without_partition_runs_on_one_shard_and_survives_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    rows = random_trades(9, n=1_000)
    select = "SELECT id, px FROM (SELECT id, px, ROW_NUMBER() OVER (ORDER BY px DESC, id) AS rn FROM trades) WHERE rn <= 5"
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=100_000))
    db.execute(TRADES)
    db.execute(f"CREATE STREAM best AS {select}")
    db.insert("trades", rows[:500])
    db.checkpoint()
    db.insert("trades", rows[500:700])
    db.close()
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=100_000))
    try:
        db.insert("trades", rows[700:])
        want = duckdb_rows(rows, select)
        assert wait_until(lambda: sorted(tuple(r.values()) for r in db.query("SELECT id, px FROM best").to_arrow().to_pylist()) == sorted(want))
    finally:
        db.close()


def test_other_window_functions_stay_refused(db):
    db.execute(TRADES)
    with pytest.raises(laminardb.LaminarError, match="RANK\\(\\)"):
        db.execute(
            "CREATE STREAM r AS SELECT * FROM (SELECT sym, RANK() OVER (PARTITION BY sym ORDER BY px) AS rk FROM trades) "
            "WHERE rk <= 2"
        )
    with pytest.raises(laminardb.LaminarError, match="without a bound"):
        db.execute(
            "CREATE STREAM r AS SELECT * FROM (SELECT sym, ROW_NUMBER() OVER (PARTITION BY sym ORDER BY px) AS rn "
            "FROM trades) WHERE rn > 2"
        )


def test_select_distinct_emits_each_distinct_row_once(sharded_db):
    db = sharded_db
    db.execute(TRADES)
    db.execute("CREATE STREAM pairs AS SELECT DISTINCT sym, px > 25 AS high FROM trades WHERE id % 7 <> 0")
    sub = db.subscribe_stream("pairs")
    rows = random_trades(11, n=4_000)
    for k in range(0, len(rows), 300):
        db.insert("trades", rows[k : k + 300])
    batches = poll_batches(sub, lambda bs: False, timeout=0.5)
    got = [(r["sym"], r["high"]) for b in batches for r in b.to_arrow().to_pylist()]
    assert all("_op" not in b.to_arrow().schema.names for b in batches)
    want = duckdb_rows(rows, "SELECT DISTINCT sym, px > 25 FROM trades WHERE id % 7 <> 0")
    assert sorted(got) == sorted(want)  # once each: no duplicates
    assert len(want) == 80
    now = db.query("SELECT sym, high FROM pairs").to_arrow().to_pylist()
    assert sorted((r["sym"], r["high"]) for r in now) == sorted(want)


def test_select_distinct_remembers_what_it_saw_across_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    config = laminardb.LaminarConfig(checkpoint_interval_ms=100_000)
    db = laminardb.open(path, config=config)
    db.execute(TRADES)
    db.execute("CREATE STREAM syms AS SELECT DISTINCT sym FROM trades")
    db.insert("trades", [{"id": 1, "ts": 1, "sym": "A", "px": 1.0}, {"id": 2, "ts": 2, "sym": "B", "px": 1.0}])
    db.checkpoint()
    db.insert("trades", [{"id": 3, "ts": 3, "sym": "C", "px": 1.0}])
    db.close()
    db = laminardb.open(path, config=config)
    try:
        sub = db.subscribe_stream("syms")
        db.insert("trades", [{"id": 4, "ts": 4, "sym": s, "px": 1.0} for s in ("A", "C", "D")])
        assert [r["sym"] for b in poll_batches(sub, lambda bs: False, timeout=0.5) for r in b.to_arrow().to_pylist()] == ["D"]
        assert sorted(r["sym"] for r in db.query("SELECT sym FROM syms").to_arrow().to_pylist()) == ["A", "B", "C", "D"]
    finally:
        db.close()
