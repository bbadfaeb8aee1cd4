"""The nexmark generator source (`WITH (connector = 'nexmark', …)`): rows generated inside
the shards, in event-time order, with exact per-table proportions; unknown source
connectors are refused; streams' latency histograms are visible in their metrics."""

from __future__ import annotations

import pytest

import laminardb
from conftest import wait_until

# The watermark a generator source reaches once every event has been produced.
END_OF_INPUT = 2**61 - 1
BASE_MS = 1_436_918_400_000


def bid_source(db, events: int = 100_000, name: str = "bid") -> None:
    db.execute(f"CREATE SOURCE {name} WITH (connector = 'nexmark', table = 'bid', events = '{events}')")


def finished(db, source: str) -> bool:
    return db.source_metrics(source).watermark >= END_OF_INPUT


def test_generated_bids_have_the_standard_schema_and_proportion(sharded_db):
    db = sharded_db
    bid_source(db)
    assert [f.name for f in db.schema("bid")] == ["auction", "bidder", "price", "channel", "url", "date_time", "extra"]
    assert db.sources()[0].watermark_column == "date_time"
    db.start()
    assert wait_until(lambda: finished(db, "bid"), timeout=30)
    # 46 of every 50 events are bids.
    assert db.query("SELECT COUNT(*) FROM bid").fetchall() == [(92_000,)]
    assert db.source_metrics("bid").total_events == 92_000


def test_results_are_the_same_on_one_and_two_shards():
    totals = []
    for shards in (1, 2):
        db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
        bid_source(db, events=60_000)
        db.start()
        assert wait_until(lambda: finished(db, "bid"), timeout=30)
        totals.append(
            db.query(
                "SELECT channel, COUNT(*), SUM(price), MIN(auction), MAX(bidder) FROM bid GROUP BY channel ORDER BY channel"
            ).fetchall()
        )
        db.close()
    assert totals[0] == totals[1]
    assert sum(row[1] for row in totals[0]) == 55_200


def test_tumble_counts_are_exact_and_the_end_of_input_closes_the_last_window(sharded_db):
    db = sharded_db
    bid_source(db)
    db.execute(
        "CREATE STREAM per_second AS SELECT window_start, COUNT(*) AS bids, MAX(price) AS top "
        "FROM bid GROUP BY TUMBLE(date_time, INTERVAL '1' SECOND)"
    )
    sub = db.subscribe_stream("per_second")
    db.start()
    rows = []
    while len(rows) < 10:
        batch = sub.next_timeout(20_000)
        assert batch is not None, f"only {len(rows)} windows arrived"
        rows.extend(batch.to_arrow().to_pylist())
    # 10,000 events per second of event time, 9,200 of them bids, in each of 10 windows.
    assert sorted(r["bids"] for r in rows) == [9_200] * 10
    starts = sorted(r["window_start"] for r in rows)
    assert [int(s.timestamp() * 1000) - BASE_MS for s in starts] == [k * 1000 for k in range(10)]
    top = db.query("SELECT MAX(price) FROM bid").fetchall()[0][0]
    assert max(r["top"] for r in rows) == top


def test_a_generator_created_after_start_produces_at_once(db):
    db.start()
    db.execute("CREATE SOURCE person WITH (connector = 'nexmark', table = 'person', events = '5000')")
    assert wait_until(lambda: finished(db, "person"), timeout=30)
    assert db.query("SELECT COUNT(*), MIN(id), MAX(id) FROM person").fetchall() == [(100, 1000, 1099)]


def test_nothing_is_generated_before_start(db):
    bid_source(db, events=5_000)
    assert db.query("SELECT COUNT(*) FROM bid").fetchall() == [(0,)]
    assert db.source_metrics("bid").total_events == 0


def test_dropping_a_generating_source_stops_it_and_the_engine_runs_on(db):
    bid_source(db, events=50_000_000)
    db.start()
    assert wait_until(lambda: db.source_metrics("bid").total_events > 0, timeout=30)
    db.execute("DROP SOURCE bid")
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.insert("t", {"a": 7})
    assert db.query("SELECT a FROM t").fetchall() == [(7,)]


def test_declared_columns_must_match_the_generated_ones(db):
    db.execute(
        "CREATE SOURCE auction (id BIGINT, item_name VARCHAR, description VARCHAR, initial_bid BIGINT, "
        "reserve BIGINT, date_time TIMESTAMP(3), expires TIMESTAMP(3), seller BIGINT, category BIGINT, "
        "extra VARCHAR) WITH (connector = 'nexmark', table = 'auction')"
    )
    with pytest.raises(laminardb.SchemaError) as ei:
        db.execute("CREATE SOURCE b2 (auction BIGINT) WITH (connector = 'nexmark', table = 'bid')")
    assert "price" in str(ei.value)


def test_a_reopened_generator_goes_on_from_its_checkpoint_and_counts_nothing_twice(tmp_path):
    # Each split's position is in the checkpoint close() takes: reopened and started again,
    # a finished generator produces nothing more, and a stream over it keeps its counts.
    path = str(tmp_path / "db")
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2))
    bid_source(db, events=50_000)
    db.execute("CREATE MATERIALIZED VIEW n AS SELECT COUNT(*) AS bids FROM bid")
    db.start()
    assert wait_until(lambda: finished(db, "bid"), timeout=30)
    assert wait_until(lambda: db.query("SELECT bids FROM n").fetchall() == [(46_000,)], timeout=30)
    db.close()
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2))
    db.start()
    assert not wait_until(lambda: db.query("SELECT COUNT(*) FROM bid").fetchall() != [(46_000,)], timeout=0.5)
    assert db.query("SELECT bids FROM n").fetchall() == [(46_000,)]
    assert finished(db, "bid")
    db.close()


@pytest.mark.parametrize(
    ("ddl", "named"),
    [
        ("CREATE SOURCE k (a BIGINT) WITH (connector = 'kafka', topic = 'x')", "kafka"),
        ("CREATE SOURCE n WITH (connector = 'nexmark')", "table"),
        ("CREATE SOURCE n WITH (connector = 'nexmark', table = 'bids')", "bids"),
        ("CREATE SOURCE n WITH (connector = 'nexmark', table = 'bid', events = 'lots')", "events"),
        ("CREATE SOURCE n WITH (connector = 'nexmark', table = 'bid', speed = '1')", "speed"),
    ],
)
def test_bad_source_connectors_are_refused(db, ddl, named):
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(ddl)
    assert named in str(ei.value)
    assert db.list_tables() == []


def test_stream_metrics_carry_an_end_to_end_latency_histogram(db):
    db.execute("CREATE SOURCE t (sym VARCHAR, px DOUBLE)")
    db.execute("CREATE STREAM hot AS SELECT sym, px FROM t WHERE px > 0")
    m = db.stream_metrics("hot")
    assert m.latency_count == 0 and m.latency_p50_us is None
    for i in range(20):
        db.insert("t", {"sym": "A", "px": 1.0 + i})
    m = db.stream_metrics("hot")
    assert m.latency_count == 20
    assert 0 < m.latency_p50_us <= m.latency_p99_us <= m.latency_p999_us <= m.latency_max_us


def test_stream_joins_equal_the_same_join_ad_hoc(sharded_db):
    """q3 and a bid ⋈ auction join over generated data: the stream's rows are exactly what
    the same join over the retained rows returns."""
    db = sharded_db
    for table in ("person", "auction", "bid"):
        db.execute(f"CREATE SOURCE {table} WITH (connector = 'nexmark', table = '{table}', events = '50000')")
    q3 = (
        "SELECT P.name, P.city, P.state, A.id FROM auction AS A INNER JOIN person AS P ON A.seller = P.id "
        "WHERE A.category = 10 AND (P.state = 'OR' OR P.state = 'ID' OR P.state = 'CA')"
    )
    hot = "SELECT B.auction, B.price, A.reserve FROM bid B JOIN auction A ON B.auction = A.id WHERE B.price > A.reserve"
    db.execute(f"CREATE STREAM q3 WITH (state_ttl = '1 hour') AS {q3}")
    db.execute(f"CREATE STREAM hot WITH (state_ttl = '1 hour') AS {hot}")
    db.start()
    for source in ("person", "auction", "bid"):
        assert wait_until(lambda: finished(db, source), timeout=60)
    for stream, sql in (("q3", q3), ("hot", hot)):
        assert wait_until(lambda: db.stream_metrics(stream).watermark >= END_OF_INPUT, timeout=60)
        got = sorted(db.query(f"SELECT * FROM {stream}").fetchall())
        want = sorted(db.query(sql).fetchall())
        assert len(want) > 0, stream
        assert got == want, stream


def test_an_interval_join_over_generators_ends_with_its_input(sharded_db):
    """q7: bids joined with each 10 s window's highest price by an interval on the time.
    The join holds back the watermark it passes on by the interval, but not the end of
    input: the stream finishes, with the rows of the same join ad hoc."""
    db = sharded_db
    db.execute("CREATE SOURCE bid WITH (connector = 'nexmark', table = 'bid', events = '50000')")
    db.execute(
        "CREATE STREAM q7_max AS SELECT window_end, MAX(price) AS maxprice FROM bid "
        "GROUP BY TUMBLE(date_time, INTERVAL '10' SECOND)"
    )
    q7 = (
        "SELECT B.auction, B.price FROM bid AS B JOIN q7_max AS M ON B.price = M.maxprice "
        "WHERE B.date_time BETWEEN M.window_end - INTERVAL '10' SECOND AND M.window_end"
    )
    db.execute(f"CREATE STREAM q7 AS {q7}")
    db.start()
    assert wait_until(lambda: finished(db, "bid"), timeout=60)
    assert wait_until(lambda: db.stream_metrics("q7").watermark >= END_OF_INPUT, timeout=60)
    got = sorted(db.query("SELECT * FROM q7").fetchall())
    assert len(got) > 0
    assert got == sorted(db.query(q7).fetchall())
