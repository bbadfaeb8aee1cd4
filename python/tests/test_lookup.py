"""Issue 24: lookup joins — a stream enriched from a table outside the engine.

`CREATE LOOKUP TABLE … WITH (connector = 'postgres' | 'parquet', …)`: each stream row joins
the rows of its key as the table is when the row is processed, through a per-shard cache
bounded in rows and age. The PostgreSQL tests run against this machine's real server on
127.0.0.1 (the `postgres` fixture starts it if it is down and fails if it cannot)."""

from __future__ import annotations

import datetime
import time
import uuid

import pyarrow as pa
import psycopg
import pyarrow.parquet as pq
import pytest

import laminardb

from conftest import poll_rows, wait_until



DSN = "postgresql://postgres@127.0.0.1:5432/test"
T0 = datetime.datetime(2024, 1, 2, 3, 4, 5, 678000)


@pytest.fixture(scope="session")
def postgres():
    """A connection to the machine's PostgreSQL (started if it is not running)."""
    import glob
    import subprocess

    try:
        conn = psycopg.connect(DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        versions = [p.rsplit("/", 1)[1] for p in glob.glob("/etc/postgresql/*")]
        for v in versions:
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", v, "main", "start"], check=False)
        conn = psycopg.connect(DSN, autocommit=True, connect_timeout=10)
    yield conn
    conn.close()


@pytest.fixture
def instruments(postgres):
    """A fresh PostgreSQL table of instruments; its name."""
    name = f"instruments_{uuid.uuid4().hex[:10]}"
    postgres.execute(
        f"CREATE TABLE {name} (sym text PRIMARY KEY, name text, lot int, listed timestamp, active bool, px double precision)"
    )
    postgres.execute(
        f"INSERT INTO {name} VALUES "
        "('AAPL', 'Apple', 100, %s, true, 1.5), ('MSFT', 'Microsoft', 10, NULL, false, NULL), "
        "('GOOG', NULL, NULL, NULL, NULL, 2.25)",
        (T0,),
    )
    yield name
    postgres.execute(f"DROP TABLE IF EXISTS {name}")


def lookup_ddl(pg_table: str, name: str = "instruments", extra: str = "") -> str:
    return (
        f"CREATE LOOKUP TABLE {name} (sym VARCHAR PRIMARY KEY, name VARCHAR, lot INT, listed TIMESTAMP(3), "
        f"active BOOLEAN, px DOUBLE) WITH (connector = 'postgres', connection = '{DSN}', table = '{pg_table}'{extra})"
    )


TRADES = "CREATE SOURCE trades (id BIGINT, sym VARCHAR, qty BIGINT)"
TRADE_ROWS = [
    {"id": 1, "sym": "AAPL", "qty": 2},
    {"id": 2, "sym": "IBM", "qty": 3},
    {"id": 3, "sym": None, "qty": 4},
    {"id": 4, "sym": "MSFT", "qty": 5},
    {"id": 5, "sym": "GOOG", "qty": 6},
    {"id": 6, "sym": "AAPL", "qty": 7},
]


def test_a_stream_joins_each_row_with_its_keys_postgres_row(sharded_db, instruments):
    db = sharded_db
    db.execute(TRADES)
    db.execute(lookup_ddl(instruments))
    db.execute(
        "CREATE STREAM enriched AS SELECT t.id, t.sym, i.name, i.lot * t.qty AS shares, i.listed, i.active, i.px "
        "FROM trades t JOIN instruments i ON t.sym = i.sym"
    )
    sub = db.subscribe_stream("enriched")
    db.insert("trades", TRADE_ROWS)
    cols = ("id", "sym", "name", "shares", "listed", "active", "px")
    rows = sorted(poll_rows(sub, cols, 4))
    assert rows == [
        (1, "AAPL", "Apple", 200, T0, True, 1.5),
        (4, "MSFT", "Microsoft", 50, None, False, None),
        (5, "GOOG", None, None, None, None, 2.25),
        (6, "AAPL", "Apple", 700, T0, True, 1.5),
    ]
    m = db.stream_metrics("enriched")
    assert m.rejected_rows == 0 and m.last_error is None
    # Keys cached on the shards: at most the 4 distinct non-NULL keys (IBM without rows).
    assert 0 < m.join_right_rows <= 4 * db.shard_count


def test_left_join_pads_rows_without_a_match_and_on_conditions_decide_matches(sharded_db, instruments):
    db = sharded_db
    db.execute(TRADES)
    db.execute(lookup_ddl(instruments))
    db.execute(
        "CREATE STREAM enriched AS SELECT t.id, i.name FROM trades t LEFT JOIN instruments i "
        "ON t.sym = i.sym AND i.active"
    )
    db.execute(
        "CREATE STREAM filtered AS SELECT t.id, i.name FROM trades t JOIN instruments i ON t.sym = i.sym "
        "WHERE t.qty > 2 AND i.lot IS NOT NULL"
    )
    left, inner = db.subscribe_stream("enriched"), db.subscribe_stream("filtered")
    db.insert("trades", TRADE_ROWS)
    assert sorted(poll_rows(left, ("id", "name"), 6)) == [
        (1, "Apple"), (2, None), (3, None), (4, None), (5, None), (6, "Apple")
    ]
    assert sorted(poll_rows(inner, ("id", "name"), 2)) == [(4, "Microsoft"), (6, "Apple")]


def test_the_cache_keeps_a_row_for_its_ttl_then_reads_the_table_again(db, postgres, instruments):
    db.execute(TRADES)
    db.execute(lookup_ddl(instruments, "slow"))
    db.execute(lookup_ddl(instruments, "fast", ", 'cache.ttl' = '100 ms'"))
    for name in ("slow", "fast"):
        db.execute(f"CREATE STREAM via_{name} AS SELECT t.id, i.name FROM trades t JOIN {name} i ON t.sym = i.sym")
    subs = {name: db.subscribe_stream(f"via_{name}") for name in ("slow", "fast")}
    db.insert("trades", [{"id": 1, "sym": "AAPL", "qty": 1}])
    for sub in subs.values():
        assert poll_rows(sub, ("id", "name"), 1) == [(1, "Apple")]
    postgres.execute(f"UPDATE {instruments} SET name = 'Apple Inc.' WHERE sym = 'AAPL'")
    time.sleep(0.3)
    db.insert("trades", [{"id": 2, "sym": "AAPL", "qty": 1}])
    # The default TTL (one minute) still has the row read first; 100 ms has not.
    assert poll_rows(subs["slow"], ("id", "name"), 1) == [(2, "Apple")]
    assert poll_rows(subs["fast"], ("id", "name"), 1) == [(2, "Apple Inc.")]


def test_the_cache_stays_under_its_row_bound(db, postgres, instruments):
    postgres.execute(
        f"INSERT INTO {instruments} (sym, lot) SELECT 'S' || g, g FROM generate_series(1, 2000) g"
    )
    db.execute(TRADES)
    db.execute(lookup_ddl(instruments, extra=", 'cache.max_rows' = '50'"))
    db.execute("CREATE STREAM enriched AS SELECT t.id, i.lot FROM trades t JOIN instruments i ON t.sym = i.sym")
    sub = db.subscribe_stream("enriched")
    peak = 0
    for b in range(20):
        db.insert("trades", [{"id": b * 100 + k, "sym": f"S{b * 100 + k + 1}", "qty": 1} for k in range(100)])
        peak = max(peak, db.stream_metrics("enriched").join_right_rows)
    rows = poll_rows(sub, ("id", "lot"), 2000)
    assert sorted(rows) == [(k, k + 1) for k in range(2000)]
    assert 0 < peak <= 50 * db.shard_count


def test_ad_hoc_queries_read_the_whole_table_and_join_it(db, instruments):
    db.execute(TRADES)
    db.execute(lookup_ddl(instruments))
    db.insert("trades", TRADE_ROWS)
    got = db.query("SELECT sym, lot FROM instruments ORDER BY sym").to_arrow().to_pylist()
    assert got == [{"sym": "AAPL", "lot": 100}, {"sym": "GOOG", "lot": None}, {"sym": "MSFT", "lot": 10}]
    joined = db.query(
        "SELECT t.id, i.name FROM trades t JOIN instruments i ON t.sym = i.sym ORDER BY t.id"
    ).to_arrow().to_pylist()
    assert [(r["id"], r["name"]) for r in joined] == [(1, "Apple"), (4, "Microsoft"), (5, None), (6, "Apple")]


def test_what_a_lookup_table_cannot_do_is_refused(db, instruments):
    db.execute(TRADES)
    with pytest.raises(laminardb.LaminarError, match="needs the option 'table'"):
        db.execute(f"CREATE LOOKUP TABLE x (a INT) WITH (connector = 'postgres', connection = '{DSN}')")
    with pytest.raises(laminardb.LaminarError, match="has no option 'tabel'"):
        db.execute(f"CREATE LOOKUP TABLE x (a INT) WITH (connector = 'postgres', connection = '{DSN}', tabel = 't')")
    with pytest.raises(laminardb.LaminarError, match="unknown lookup connector 'kafka'"):
        db.execute("CREATE LOOKUP TABLE x (a INT) WITH (connector = 'kafka')")
    with pytest.raises(laminardb.LaminarError, match="does not exist"):
        db.execute(lookup_ddl("no_such_table_here", "x"))
    with pytest.raises(laminardb.LaminarError, match="(?i)connect|refused"):
        db.execute(
            "CREATE LOOKUP TABLE x (a INT) WITH (connector = 'postgres', "
            "connection = 'postgresql://postgres@127.0.0.1:1/test', table = 't')"
        )
    with pytest.raises(laminardb.LaminarError, match="columns are BOOLEAN"):
        db.execute(
            f"CREATE LOOKUP TABLE x (a DECIMAL(10, 2)) WITH (connector = 'postgres', connection = '{DSN}', table = 't')"
        )
    with pytest.raises(laminardb.LaminarError, match="cache.ttl = 'soon'"):
        db.execute(lookup_ddl(instruments, "x", ", 'cache.ttl' = 'soon'"))
    assert "x" not in db.list_tables()
    db.execute(lookup_ddl(instruments))
    with pytest.raises(laminardb.LaminarError, match="inserting into the lookup table 'instruments'"):
        db.insert("instruments", [{"sym": "X"}])
    with pytest.raises(laminardb.LaminarError, match="reading the lookup table 'instruments' as a stream"):
        db.execute("CREATE STREAM s AS SELECT * FROM instruments")
    with pytest.raises(laminardb.LaminarError, match="keeps the lookup table 'instruments''s unmatched rows"):
        db.execute("CREATE STREAM s AS SELECT t.id, i.name FROM trades t RIGHT JOIN instruments i ON t.sym = i.sym")
    with pytest.raises(laminardb.LaminarError, match="the key"):
        db.execute("CREATE STREAM s AS SELECT t.id FROM trades t JOIN instruments i ON t.sym = upper(i.sym)")
    db.execute("CREATE STREAM s AS SELECT t.id, i.name FROM instruments i JOIN trades t ON t.sym = i.sym")
    with pytest.raises(laminardb.LaminarError, match="is read by s"):
        db.execute("DROP LOOKUP TABLE instruments")
    db.execute("DROP STREAM s")
    db.execute("DROP LOOKUP TABLE instruments")
    assert "instruments" not in db.list_tables()


def test_a_reopened_database_joins_again_and_a_vanished_table_is_reported_not_fatal(tmp_path, postgres, instruments):
    path = str(tmp_path / "db")
    db = laminardb.open(path)
    db.execute(TRADES)
    db.execute(lookup_ddl(instruments))
    db.execute("CREATE STREAM enriched AS SELECT t.id, i.name FROM trades t JOIN instruments i ON t.sym = i.sym")
    db.close()
    db = laminardb.open(path)
    try:
        sub = db.subscribe_stream("enriched")
        db.insert("trades", [{"id": 1, "sym": "AAPL", "qty": 1}])
        assert poll_rows(sub, ("id", "name"), 1) == [(1, "Apple")]
    finally:
        db.close()
    postgres.execute(f"DROP TABLE {instruments}")
    db = laminardb.open(path)
    try:
        db.insert("trades", [{"id": 2, "sym": "MSFT", "qty": 1}])
        assert wait_until(lambda: db.stream_metrics("enriched").rejected_rows == 1)
        assert "does not exist" in db.stream_metrics("enriched").last_error
        assert db.query("SELECT count(*) AS n FROM trades").to_arrow().to_pylist() == [{"n": 2}]
    finally:
        db.close()


def test_a_parquet_file_is_a_lookup_table(sharded_db, tmp_path):
    db = sharded_db
    path = tmp_path / "ref.parquet"
    pq.write_table(
        pa.table({"sym": ["AAPL", "MSFT", "GOOG", "AAPL"], "venue": ["XNAS", "XNAS", None, "BATS"], "tick": [1, 2, 3, 4]}),
        path,
    )
    db.execute(TRADES)
    db.execute(
        f"CREATE LOOKUP TABLE venues (sym VARCHAR, venue VARCHAR, tick BIGINT) WITH (connector = 'parquet', path = '{path}')"
    )
    db.execute(
        "CREATE STREAM enriched AS SELECT t.id, v.venue, v.tick FROM trades t LEFT JOIN venues v ON t.sym = v.sym"
    )
    sub = db.subscribe_stream("enriched")
    db.insert("trades", TRADE_ROWS)
    assert sorted(poll_rows(sub, ("id", "venue", "tick"), 8), key=lambda r: (r[0], r[2] or 0)) == [
        (1, "XNAS", 1), (1, "BATS", 4), (2, None, None), (3, None, None), (4, "XNAS", 2),
        (5, None, 3), (6, "XNAS", 1), (6, "BATS", 4),
    ]
    assert db.query("SELECT count(*) AS n FROM venues").to_arrow().to_pylist() == [{"n": 4}]
    with pytest.raises(laminardb.LaminarError, match="parquet lookup"):
        db.execute(
            f"CREATE LOOKUP TABLE gone (sym VARCHAR) WITH (connector = 'parquet', path = '{tmp_path / 'none.parquet'}')"
        )


def test_two_streams_joining_one_column_with_keys_of_other_types(db, instruments):
    """Each fetch's statement is prepared for its key types (was: one per key column)."""
    db.execute("CREATE SOURCE wide (q BIGINT)")
    db.execute("CREATE SOURCE narrow (q INT)")
    db.execute(lookup_ddl(instruments))
    db.execute("CREATE STREAM by_wide AS SELECT w.q, i.sym FROM wide w JOIN instruments i ON w.q = i.lot")
    db.execute("CREATE STREAM by_narrow AS SELECT n.q, i.sym FROM narrow n JOIN instruments i ON n.q = i.lot")
    subs = [db.subscribe_stream("by_wide"), db.subscribe_stream("by_narrow")]
    db.insert("wide", [{"q": 100}, {"q": 7}])
    db.insert("narrow", [{"q": 10}])
    assert poll_rows(subs[0], ("q", "sym"), 1) == [(100, "AAPL")]
    assert poll_rows(subs[1], ("q", "sym"), 1) == [(10, "MSFT")]
    assert db.stream_metrics("by_narrow").rejected_rows == 0
