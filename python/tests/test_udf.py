"""Python scalar functions in SQL (`@laminardb.udf`, `register_udf`): vectorized over
pyarrow arrays or row by row, in ad-hoc queries, subscriptions and streams on every shard;
errors named; streams calling them refused where they could not be recovered."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import laminardb
from conftest import poll_rows, records


@laminardb.udf(return_type=pa.float64())
def zscore(values, mean, stddev):
    assert isinstance(values, pa.Array) and isinstance(mean, pa.Scalar), (type(values), type(mean))
    return pc.divide(pc.subtract(values, mean), stddev)


@laminardb.udf(return_type=pa.string(), vectorized=False)
def tag(symbol, price):
    return None if price is None else f"{symbol}:{price:.1f}"


@laminardb.udf(return_type=pa.int64())
def bucket(prices):
    return pc.cast(pc.floor(pc.divide(prices, 10.0)), pa.int64())


@laminardb.udf(return_type=pa.bool_())
def dear(prices):
    return pc.greater(prices, 100.0)


def readings(db):
    db.execute("CREATE SOURCE readings (sensor_id INT, value DOUBLE)")
    db.insert("readings", [{"sensor_id": 1, "value": 10.0}, {"sensor_id": 2, "value": 20.0}, {"sensor_id": 3, "value": 15.0}])


def test_a_vectorized_function_gets_arrays_and_scalars_in_a_query(db):
    db.register_udf("zscore", zscore)
    readings(db)
    got = db.query("SELECT sensor_id, zscore(value, 15.0, 5.0) AS z FROM readings ORDER BY sensor_id").to_dicts()
    assert got == {"sensor_id": [1, 2, 3], "z": [-1.0, 1.0, 0.0]}
    # Still an ordinary Python function.
    assert zscore(pa.array([20.0]), pa.scalar(15.0), pa.scalar(5.0)).to_pylist() == [1.0]


def test_a_row_by_row_function_and_one_registered_without_the_decorator(db):
    db.register_udf("tag", tag)
    db.register_udf("Twice", lambda v: pc.multiply(v, 2), pa.float64())
    readings(db)
    got = db.query("SELECT tag('S' || CAST(sensor_id AS VARCHAR), value) AS t, TWICE(value) AS w FROM readings ORDER BY sensor_id")
    assert got.to_dicts() == {"t": ["S1:10.0", "S2:20.0", "S3:15.0"], "w": [20.0, 40.0, 30.0]}


def test_functions_run_in_streams_on_every_shard_in_filters_projections_and_group_keys():
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    for name, fn in [("bucket", bucket), ("dear", dear), ("tag", tag)]:
        db.register_udf(name, fn)
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    db.execute("CREATE STREAM hot AS SELECT symbol, tag(symbol, price) AS label FROM trades WHERE dear(price)")
    db.execute("CREATE MATERIALIZED VIEW buckets AS SELECT bucket(price) AS b, COUNT(*) AS n FROM trades GROUP BY bucket(price)")
    sub = db.subscribe_stream("hot")
    prices = [95.0, 101.5, 99.0, 250.0, 105.0, 12.0]
    rows = [{"symbol": f"S{i}", "price": p} for i, p in enumerate(prices)]
    # From another Python thread too: the shards take the GIL between its calls.
    t = threading.Thread(target=lambda: db.insert("trades", rows[3:]))
    db.insert("trades", rows[:3])
    t.start()
    t.join()
    hot = sorted(poll_rows(sub, ("symbol", "label"), 3))
    assert hot == [("S1", "S1:101.5"), ("S3", "S3:250.0"), ("S4", "S4:105.0")]
    got = db.query("SELECT b, n FROM buckets ORDER BY b").to_dicts()
    assert got == {"b": [1, 9, 10, 25], "n": [1, 2, 2, 1]}
    db.close()


def test_errors_name_the_function_and_the_engine_goes_on(db):
    @laminardb.udf(return_type=pa.float64(), vectorized=False)
    def inverse(v):
        return 1 / v

    db.register_udf("inverse", inverse)
    db.register_udf("ints", lambda v: pc.cast(v, pa.int64()), pa.float64())
    db.register_udf("short", lambda v: v[:0], pa.float64())
    db.execute("CREATE SOURCE t (v DOUBLE)")
    db.insert("t", [{"v": 2.0}, {"v": 0.0}, {"v": 4.0}])
    with pytest.raises(laminardb.QueryError, match=r"(?s)function 'inverse': raised Traceback.*ZeroDivisionError"):
        db.query("SELECT inverse(v) FROM t")
    with pytest.raises(laminardb.QueryError, match="function 'ints': returned Int64 values; it was registered returning Float64"):
        db.query("SELECT ints(v) FROM t")
    with pytest.raises(laminardb.QueryError, match=r"function 'short': returned 0 values for \d+ rows"):
        db.query("SELECT short(v) FROM t")
    assert db.query("SELECT inverse(v) AS i FROM t WHERE v > 0 ORDER BY v").to_dicts() == {"i": [0.5, 0.25]}
    # In a stream, only the rows the function fails on are rejected.
    db.execute("CREATE STREAM inv AS SELECT v, inverse(v) AS i FROM t")
    sub = db.subscribe_stream("inv")
    db.insert("t", [{"v": 8.0}, {"v": 0.0}, {"v": 10.0}])
    assert sorted(poll_rows(sub, ("v", "i"), 2)) == [(8.0, 0.125), (10.0, 0.1)]
    metrics = db.stream_metrics("inv")
    assert "ZeroDivisionError" in metrics.last_error


@pytest.mark.parametrize(
    ("name", "function", "return_type", "message"),
    [
        ("abs", lambda v: v, pa.float64(), "'abs' is a built-in SQL function"),
        ("sum", lambda v: v, pa.float64(), "'sum' is a built-in SQL function"),
        ("f", lambda v: v, None, "needs return_type"),
        ("bad name", lambda v: v, pa.float64(), "not a plain SQL name"),
        ("f", 42, pa.float64(), "not callable"),
    ],
)
def test_bad_registrations_are_refused(db, name, function, return_type, message):
    with pytest.raises(laminardb.QueryError, match=message):
        db.register_udf(name, function, return_type)


def test_an_unregistered_function_is_a_query_error(db):
    readings(db)
    with pytest.raises(laminardb.LaminarError, match="nothing_here"):
        db.query("SELECT nothing_here(value) FROM readings")


def test_a_stored_database_refuses_streams_calling_a_lambda_but_queries_and_subscriptions_work(tmp_path):
    db = laminardb.open(str(tmp_path / "db"))
    db.register_udf("bucket", lambda p: pc.cast(pc.floor(pc.divide(p, 10.0)), pa.int64()), pa.int64())
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    with pytest.raises(laminardb.LaminarError, match="calls the Python function 'bucket' in a database with storage"):
        db.execute("CREATE STREAM b AS SELECT bucket(price) AS b FROM trades")
    sub = db.subscribe("SELECT symbol, bucket(price) AS b FROM trades")
    db.insert("trades", [{"symbol": "A", "price": 42.0}])
    assert poll_rows(sub, ("symbol", "b"), 1) == [("A", 4)]
    assert db.query("SELECT bucket(price) AS b FROM trades").to_dicts() == {"b": [4]}
    db.close()
    # Nothing of the refused stream was stored: the database reopens.
    db = laminardb.open(str(tmp_path / "db"))
    assert [s.name for s in db.streams()] == []
    db.close()


def test_a_stored_database_keeps_a_module_level_function_for_its_streams(tmp_path):
    """`bucket` is importable (`test_udf.bucket`): the database stores where it lives, and
    the reopened database imports it before its stream is planned again."""
    db = laminardb.open(str(tmp_path / "db"))
    db.register_udf("bucket", bucket)
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    db.execute("CREATE STREAM b AS SELECT symbol, bucket(price) AS b FROM trades")
    db.insert("trades", [{"symbol": "A", "price": 42.0}])
    db.close()
    db = laminardb.open(str(tmp_path / "db"))
    try:
        sub = db.subscribe_stream("b")
        db.insert("trades", [{"symbol": "B", "price": 57.0}])
        assert poll_rows(sub, ("symbol", "b"), 1) == [("B", 5)]
        # Registered again under the name as a lambda: no longer stored, and new
        # streams calling it are refused.
        db.register_udf("bucket", lambda p: p, pa.float64())
        with pytest.raises(laminardb.LaminarError, match="imported again"):
            db.execute("CREATE STREAM c AS SELECT bucket(price) AS b FROM trades")
    finally:
        db.close()
    # The lambda lasted for that session only; the stored function still opens the stream.
    db = laminardb.open(str(tmp_path / "db"))
    try:
        assert sorted(records(db.query("SELECT symbol, b FROM b"), "symbol", "b")) == [("A", 4), ("B", 5)]
    finally:
        db.close()


def test_declared_argument_types_are_checked_and_cast_at_planning(db):
    @laminardb.udf(return_type=pa.float64(), arg_types=[pa.float64(), pa.float64()])
    def ratio(a, b):
        assert a.type == pa.float64() and b.type == pa.float64()
        return pc.divide(a, b)

    db.register_udf("ratio", ratio)
    db.execute("CREATE SOURCE t (a BIGINT, b DOUBLE, s VARCHAR)")
    db.insert("t", {"a": 3, "b": 2.0, "s": "x"})
    # BIGINT is cast to DOUBLE as SQL casts it; a third argument or a text one is refused.
    assert db.query("SELECT ratio(a, b) AS r FROM t").to_dicts() == {"r": [1.5]}
    with pytest.raises(laminardb.LaminarError, match="ratio"):
        db.query("SELECT ratio(a, b, b) FROM t")
    with pytest.raises(laminardb.LaminarError, match="ratio"):
        db.execute("CREATE STREAM bad AS SELECT ratio(s, b) AS r FROM t")


@laminardb.udf(return_type=pa.float64())
def vwap(prices: pa.Array, volumes: pa.Array) -> pa.Array:
    """The specification's example, as written (`pa.compute` without importing it)."""
    return pa.compute.divide(pa.compute.sum(pa.compute.multiply(prices, volumes)), pa.compute.sum(volumes))


VWAP_ROWS = [("A", 10.0, 1.0, 0), ("A", 12.0, 3.0, 100), ("B", 5.0, 2.0, 200), ("A", 14.0, 4.0, 1_500), ("B", 7.0, 2.0, 1_600)]


def vwap_of(rows):
    return sum(p * v for p, v in rows) / sum(v for _, v in rows)


def vwap_source(conn):
    conn.register_udf("vwap", vwap)
    conn.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, volume DOUBLE, ts TIMESTAMP(3), "
        "WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)"
    )


def test_a_vectorized_function_over_a_group_runs_once_per_group_as_the_spec_writes_it(sharded_db):
    vwap_source(sharded_db)
    for sym, p, v, at in VWAP_ROWS:
        sharded_db.insert("trades", {"symbol": sym, "price": p, "volume": v, "ts": at})
    result = sharded_db.query("SELECT symbol, vwap(price, volume) FROM trades GROUP BY symbol")
    assert result.to_arrow().schema.names == ["symbol", "vwap(trades.price,trades.volume)"]
    want = {s: vwap_of([(p, v) for sym, p, v, _ in VWAP_ROWS if sym == s]) for s in "AB"}
    assert dict(result.fetchall()) == want
    # Inside another expression, and under a window in a stream: per group, exact.
    rounded = sharded_db.query("SELECT symbol, ROUND(vwap(price, volume), 1) AS v FROM trades GROUP BY symbol")
    assert dict(rounded.fetchall()) == {s: round(x, 1) for s, x in want.items()}
    sharded_db.execute(
        "CREATE STREAM bars AS SELECT symbol, window_start, vwap(price, volume) AS v FROM trades "
        "GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)"
    )
    sub = sharded_db.subscribe_stream("bars")
    sharded_db.insert("trades", {"symbol": "A", "price": 20.0, "volume": 1.0, "ts": 1_700})
    sharded_db.writer("trades").watermark(10_000)
    got = sorted(poll_rows(sub, ("symbol", "v"), 2))
    second = [(s, p, v) for s, p, v, at in VWAP_ROWS if at >= 1000] + [("A", 20.0, 1.0)]
    assert got == sorted((s, vwap_of([(p, v) for sym, p, v in second if sym == s])) for s in "AB")


def test_a_function_over_a_group_is_refused_where_it_would_keep_every_row(db):
    vwap_source(db)
    with pytest.raises(laminardb.LaminarError, match="without a window"):
        db.execute("CREATE STREAM s AS SELECT symbol, vwap(price, volume) AS v FROM trades GROUP BY symbol")


def test_a_function_over_a_group_must_return_one_value(db):
    db.register_udf("double_all", lambda x: pc.multiply(x, 2.0), pa.float64())
    db.execute("CREATE SOURCE t (k VARCHAR, x DOUBLE)")
    db.insert("t", [{"k": "a", "x": 1.0}, {"k": "a", "x": 2.0}])
    # Per row it is fine; over a group of two rows it returns two values.
    assert sorted(db.query("SELECT double_all(x) AS y FROM t").to_dicts()["y"]) == [2.0, 4.0]
    with pytest.raises(laminardb.QueryError, match="double_all"):
        db.query("SELECT k, double_all(x) FROM t GROUP BY k").fetchall()
