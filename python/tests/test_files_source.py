"""The `files` source connector: the CSV/JSON/Parquet files of a directory read into a
source once each, new ones picked up as they appear, where it was across a restart."""

from __future__ import annotations

import time

import pytest

import laminardb
from conftest import wait_until


def put(directory, name: str, rows) -> None:
    """Writes a CSV file under a hidden name, then renames it into place (whole at once)."""
    hidden = directory / f".{name}"
    hidden.write_text("ts,symbol,price\n" + "".join(f"{ts},{sym},{price}\n" for ts, sym, price in rows))
    hidden.rename(directory / name)


def count(db) -> int:
    return db.query("SELECT COUNT(*) FROM trades").fetchall()[0][0]


def test_files_appended_to_a_watched_directory_appear_once_each_across_a_restart(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    path = str(tmp_path / "db")
    config = laminardb.LaminarConfig(shards=2)
    db = laminardb.open(path, config=config)
    db.execute(
        "CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE) "
        f"WITH (connector = 'files', path = '{inbox}/*.csv', poll_interval_ms = '10')"
    )
    db.execute("CREATE MATERIALIZED VIEW totals AS SELECT symbol, COUNT(*) AS n, SUM(price) AS total FROM trades GROUP BY symbol")
    db.start()
    put(inbox, "001.csv", [(1, "A", 1.0), (2, "B", 2.0)])
    put(inbox, "002.csv", [(3, "A", 3.0)])
    assert wait_until(lambda: count(db) == 3)
    db.close()
    put(inbox, "003.csv", [(4, "B", 4.0)])  # arrives while the database is closed
    db = laminardb.open(path, config=config)
    assert count(db) == 3
    db.start()
    put(inbox, "004.csv", [(5, "A", 5.0)])
    assert wait_until(lambda: count(db) == 5)
    time.sleep(0.1)  # ten more polls of every split: nothing is read twice
    assert count(db) == 5
    assert db.query("SELECT symbol, n, total FROM totals ORDER BY symbol").fetchall() == [("A", 3, 9.0), ("B", 2, 6.0)]
    db.close()


def test_the_path_may_name_an_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMINARDB_TEST_INBOX", str(tmp_path))
    (tmp_path / "t.json").write_text('{"ts": 1, "symbol": "J", "price": 2.5}\n')
    db = laminardb.open(":memory:")
    db.execute(
        "CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE) "
        "WITH (connector = 'files', path = '${LAMINARDB_TEST_INBOX}/*.json', poll_interval_ms = '10')"
    )
    db.start()
    assert wait_until(lambda: count(db) == 1)
    assert db.query("SELECT symbol, price FROM trades").fetchall() == [("J", 2.5)]
    db.close()


@pytest.mark.parametrize(
    ("with_", "named"),
    [
        ("connector = 'files'", "'path'"),
        ("connector = 'files', path = '/tmp/x/*.csv', speed = '2'", "'speed'"),
        ("connector = 'files', path = '/tmp/x'", "format"),
        ("connector = 'files', path = '${LAMINARDB_TEST_SURELY_UNSET}/*.csv'", "LAMINARDB_TEST_SURELY_UNSET"),
    ],
)
def test_bad_files_options_are_connector_errors_at_create(db, with_, named):
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(f"CREATE SOURCE trades (ts BIGINT) WITH ({with_})")
    assert named in str(ei.value)
    assert db.list_tables() == []


@pytest.mark.parametrize(("shards", "splits"), [(1, 1), (3, 1), (3, 3)])
def test_a_files_source_with_a_watermark_closes_windows_on_every_shard(tmp_path, shards, splits):
    # With three splits, the two that get no file go idle after idle_timeout_ms: the
    # windows close on the third one's watermark.
    inbox = tmp_path / "in"
    inbox.mkdir()
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards, idle_timeout_ms=100))
    db.execute(
        "CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE, WATERMARK FOR ts AS ts) "
        f"WITH (connector = 'files', path = '{inbox}/*.csv', poll_interval_ms = '10', splits = '{splits}')"
    )
    db.execute(
        "CREATE STREAM per_second AS SELECT symbol, window_start, COUNT(*) AS n FROM trades "
        "GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND) EMIT ON WINDOW CLOSE"
    )
    sub = db.subscribe_stream("per_second")
    db.start()
    put(inbox, "a.csv", [(100, "A", 1.0), (900, "A", 2.0), (1_500, "B", 3.0), (2_100, "A", 4.0)])
    rows = []
    while len(rows) < 2:
        batch = sub.next_timeout(10_000)
        assert batch is not None, f"only {rows} arrived"
        rows.extend(batch.to_arrow().to_pylist())
    got = sorted((r["symbol"], millis(r["window_start"]), r["n"]) for r in rows)
    assert got == [("A", 0, 2), ("B", 1_000, 1)]
    db.close()


def millis(value) -> int:
    return value if isinstance(value, int) else round(value.timestamp() * 1000)
