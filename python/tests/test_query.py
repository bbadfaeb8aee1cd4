"""F-PY-004 / F-PY-030: queries, result exports, fetch methods, stream(),
execute() variants, explain, stats, parameters, query_stream."""

from __future__ import annotations

import datetime
import time

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import count

TRADES = [
    {"ts": 1, "symbol": "AAPL", "price": 150.0},
    {"ts": 2, "symbol": "GOOG", "price": 2800.0},
    {"ts": 3, "symbol": "MSFT", "price": 90.5},
]


@pytest.fixture
def trades(db):
    db.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE)")
    db.insert("trades", TRADES)
    return db


@pytest.fixture
def result(trades):
    return trades.query("SELECT * FROM trades WHERE price > 100 ORDER BY ts")


# --------------------------------------------------------------------------- QueryResult basics


def test_query_returns_query_result(result):
    assert isinstance(result, laminardb.QueryResult)
    assert result.num_rows == 2
    assert result.num_columns == 3
    assert result.num_batches >= 1
    assert result.columns == ["ts", "symbol", "price"]
    assert result.schema == pa.schema([("ts", pa.int64()), ("symbol", pa.string()), ("price", pa.float64())])
    assert len(result) == 2
    assert repr(result) == "QueryResult(rows=2, columns=3)"


def test_sql_alias_delegates_to_query(trades):
    a = trades.sql("SELECT symbol, price FROM trades ORDER BY ts")
    b = trades.query("SELECT symbol, price FROM trades ORDER BY ts")
    assert isinstance(a, laminardb.QueryResult)
    assert a.to_arrow().equals(b.to_arrow())
    assert a.fetchall() == [("AAPL", 150.0), ("GOOG", 2800.0), ("MSFT", 90.5)]


def test_to_arrow_and_arrow(result):
    expected = pa.table(
        {"ts": [1, 2], "symbol": ["AAPL", "GOOG"], "price": [150.0, 2800.0]},
        schema=pa.schema([("ts", pa.int64()), ("symbol", pa.string()), ("price", pa.float64())]),
    )
    t = result.to_arrow()
    assert isinstance(t, pa.Table)
    assert t.equals(expected)
    assert result.arrow().equals(expected)


def test_to_pandas_and_df(result):
    expected = pd.DataFrame({"ts": [1, 2], "symbol": ["AAPL", "GOOG"], "price": [150.0, 2800.0]})
    for df in (result.to_pandas(), result.df()):
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == ["ts", "symbol", "price"]
        assert df["ts"].tolist() == [1, 2]
        assert df["symbol"].tolist() == ["AAPL", "GOOG"]
        assert df["price"].tolist() == [150.0, 2800.0]
        assert str(df["ts"].dtype) == "int64"
        assert str(df["price"].dtype) == "float64"
        pd.testing.assert_frame_equal(df, expected, check_dtype=False)


def test_to_polars_and_pl(result):
    expected = pl.DataFrame({"ts": [1, 2], "symbol": ["AAPL", "GOOG"], "price": [150.0, 2800.0]})
    for df in (result.to_polars(), result.pl(), result.pl(lazy=False)):
        assert isinstance(df, pl.DataFrame)
        assert df.equals(expected)
        assert df.schema == {"ts": pl.Int64, "symbol": pl.String, "price": pl.Float64}
    lazy = result.pl(lazy=True)
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.filter(pl.col("ts") > 1).collect().equals(expected.filter(pl.col("ts") > 1))


def test_to_dicts(result):
    assert result.to_dicts() == {"ts": [1, 2], "symbol": ["AAPL", "GOOG"], "price": [150.0, 2800.0]}


def test_to_df_prefers_polars(result):
    df = result.to_df()
    assert isinstance(df, pl.DataFrame)
    assert df.equals(result.to_polars())


def test_arrow_c_stream_export(result):
    capsule = result.__arrow_c_stream__()
    assert type(capsule).__name__ == "PyCapsule"
    reader = pa.RecordBatchReader._import_from_c_capsule(capsule)
    assert reader.read_all().equals(result.to_arrow())
    # consumers of the PyCapsule protocol
    assert pa.table(result).equals(result.to_arrow())
    assert pa.RecordBatchReader.from_stream(result).read_all().num_rows == 2
    assert pl.from_arrow(pa.RecordBatchReader.from_stream(result)).shape == (2, 3)
    # the export can be repeated
    assert pa.table(result).num_rows == 2


def test_arrow_c_stream_export_with_requested_schema(result):
    capsule = result.__arrow_c_stream__(result.schema.__arrow_c_schema__())
    assert pa.RecordBatchReader._import_from_c_capsule(capsule).read_all().num_rows == 2


def test_duckdb_can_scan_a_query_result(result):
    rel = result  # noqa: F841 - referenced by name from duckdb
    assert duckdb.sql("SELECT SUM(ts), COUNT(*) FROM rel").fetchall() == [(3, 2)]


def test_iteration_yields_tuples(result):
    items = list(result)
    assert items == [(1, "AAPL", 150.0), (2, "GOOG", 2800.0)]
    assert all(type(r) is tuple for r in items)
    # iteration can be repeated
    assert list(result) == items


def test_fetch_methods_without_cursor(result):
    assert result.fetchone() == (1, "AAPL", 150.0)
    assert result.fetchone() == (1, "AAPL", 150.0)  # no cursor: always the first row
    assert result.fetchall() == [(1, "AAPL", 150.0), (2, "GOOG", 2800.0)]
    assert result.fetchmany(1) == [(1, "AAPL", 150.0)]
    assert result.fetchmany() == [(1, "AAPL", 150.0)]
    assert result.fetchmany(2) == [(1, "AAPL", 150.0), (2, "GOOG", 2800.0)]
    assert result.fetchmany(size=100) == [(1, "AAPL", 150.0), (2, "GOOG", 2800.0)]
    assert result.fetchmany(0) == []
    assert type(result.fetchone()) is tuple
    assert all(type(r) is tuple for r in result.fetchall())


def test_empty_result(trades):
    res = trades.query("SELECT * FROM trades WHERE price > 1e9")
    assert res.num_rows == 0
    assert len(res) == 0
    assert res.num_columns == 3
    assert res.columns == ["ts", "symbol", "price"]
    assert res.fetchone() is None
    assert res.fetchall() == []
    assert res.fetchmany(5) == []
    assert list(res) == []
    assert res.to_dicts() == {"ts": [], "symbol": [], "price": []}
    assert res.to_arrow().num_rows == 0
    assert res.to_arrow().schema == res.schema
    assert res.to_pandas().shape == (0, 3)
    assert res.to_polars().shape == (0, 3)


def test_multi_batch_result_fetches_across_batches(db):
    db.execute("CREATE SOURCE e (id BIGINT)")
    for chunk in ([1, 2, 3], [4, 5], [6, 7]):
        db.insert("e", {"id": chunk})
    res = db.query("SELECT id FROM e")
    assert res.num_rows == 7
    assert sum(b.num_rows for b in res.to_arrow().to_batches()) == 7
    all_rows = res.fetchall()
    assert sorted(all_rows) == [(i,) for i in range(1, 8)]
    assert res.fetchmany(5) == all_rows[:5]
    assert res.fetchone() == all_rows[0]
    assert list(res) == all_rows
    assert sorted(res.to_dicts()["id"]) == list(range(1, 8))


def test_result_types_round_trip(db):
    db.execute(
        "CREATE SOURCE t (i INT, b BIGINT, f DOUBLE, s VARCHAR, ok BOOLEAN, ts TIMESTAMP)"
    )
    db.insert("t", {"i": 1, "b": 2**40, "f": 0.25, "s": "x", "ok": True, "ts": 1500})
    res = db.query("SELECT * FROM t")
    assert res.fetchone() == (1, 2**40, 0.25, "x", True, datetime.datetime(1970, 1, 1, 0, 0, 1, 500000))
    assert res.schema == pa.schema(
        [
            ("i", pa.int32()),
            ("b", pa.int64()),
            ("f", pa.float64()),
            ("s", pa.string()),
            ("ok", pa.bool_()),
            ("ts", pa.timestamp("us")),
        ]
    )
    assert str(res.to_pandas()["ts"].dtype).startswith("datetime64")


def test_show_prints_rows(db, capsys):
    db.execute("CREATE SOURCE t (id BIGINT, tag VARCHAR)")
    db.insert("t", {"id": [1, 2, 3, 4, 5], "tag": ["tag_one", "tag_two", "tag_three", "tag_four", "tag_five"]})
    res = db.query("SELECT id, tag FROM t ORDER BY id")
    res.show()
    out = capsys.readouterr().out
    for word in ("id", "tag", "tag_one", "tag_two", "tag_three", "tag_four", "tag_five"):
        assert word in out
    res.show(max_rows=2)
    out = capsys.readouterr().out
    assert "tag_one" in out and "tag_two" in out
    assert "tag_three" not in out and "tag_five" not in out
    res.show(2)
    out = capsys.readouterr().out
    assert "tag_two" in out and "tag_three" not in out


def test_repr_html(result):
    html = result._repr_html_()
    assert isinstance(html, str)
    assert "<table" in html and "</table>" in html
    for col in ("ts", "symbol", "price"):
        assert f"<th>{col}</th>" in html
    for val in ("AAPL", "GOOG", "2800"):
        assert val in html
    assert "MSFT" not in html


# --------------------------------------------------------------------------- stream()


def test_stream_produces_iterable_batches(trades):
    s = trades.stream("SELECT ts, price FROM trades ORDER BY ts")
    assert isinstance(s, laminardb.QueryStream)
    assert s.is_active is True
    assert s.schema == pa.schema([("ts", pa.int64()), ("price", pa.float64())])
    batches = list(s)
    assert batches and all(isinstance(b, laminardb.QueryResult) for b in batches)
    assert sum(b.num_rows for b in batches) == 3
    assert [row for b in batches for row in b.fetchall()] == [(1, 150.0), (2, 2800.0), (3, 90.5)]
    assert s.is_active is False
    with pytest.raises(StopIteration):
        next(s)
    assert s.try_next() is None


def test_stream_over_many_rows(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (a BIGINT)")
    for i in range(10):
        db.insert("t", {"a": list(range(i * 1000, (i + 1) * 1000))})
    total, rows = 0, 0
    for batch in db.stream("SELECT a FROM t"):
        t = batch.to_arrow()
        rows += t.num_rows
        total += sum(t.column("a").to_pylist())
    assert rows == 10_000
    assert total == sum(range(10_000))


def test_stream_try_next_eventually_returns_data(trades):
    s = trades.stream("SELECT ts FROM trades")
    got = []
    for _ in range(20_000):  # bounded polling: never hangs
        batch = s.try_next()
        if batch is not None:
            got.extend(batch.fetchall())
        if len(got) == 3:
            break
        if not s.is_active:
            break
        time.sleep(0.001)
    assert sorted(got) == [(1,), (2,), (3,)]


def test_stream_cancel(trades):
    s = trades.stream("SELECT ts FROM trades")
    s.cancel()
    assert s.is_active is False
    assert s.try_next() is None
    with pytest.raises(StopIteration):
        next(s)
    assert list(s) == []
    s.cancel()  # idempotent
    assert s.is_active is False


def test_stream_errors(trades):
    with pytest.raises(laminardb.QueryError) as ei:
        trades.stream("garbage")
    assert ei.value.code == codes.SQL_PARSE_ERROR == 401
    with pytest.raises(laminardb.QueryError) as ei:
        trades.stream("SELECT * FROM nope")
    assert ei.value.code == codes.QUERY_FAILED == 400


# --------------------------------------------------------------------------- cancel_query


def _active_query_id(db):
    active = [q for q in db.queries() if q.active]
    assert len(active) == 1
    return active[0].id


def test_cancel_query_cancels_an_active_stream(db):
    # a sort over 500k rows is still running when cancel_query() arrives
    db.execute("CREATE SOURCE big (id BIGINT)")
    db.insert("big", pa.record_batch({"id": pa.array(range(500_000), pa.int64())}))
    s = db.stream("SELECT id FROM big ORDER BY id DESC")
    qid = _active_query_id(db)
    assert db.active_query_count == 1
    assert db.cancel_query(qid) is None
    info = {q.id: q for q in db.queries()}[qid]
    assert info.active is False
    assert db.active_query_count == 0
    with pytest.raises(laminardb.QueryError) as ei:
        next(s)
    assert ei.value.code == codes.QUERY_CANCELLED == 402
    assert str(ei.value).startswith("Query cancelled (402): ")
    assert s.is_active is False
    with pytest.raises(StopIteration):
        next(s)


def test_cancel_query_is_honoured_when_results_are_buffered():
    outcomes = []
    for _ in range(10):
        with laminardb.open(":memory:") as conn:
            conn.execute("CREATE SOURCE t (ts BIGINT)")
            conn.insert("t", {"ts": [1, 2, 3]})
            s = conn.stream("SELECT ts FROM t")
            time.sleep(0.05)  # let the tiny query finish producing (not a timing assertion)
            qid = _active_query_id(conn)
            conn.cancel_query(qid)
            try:
                outcomes.append(("rows", sum(b.num_rows for b in s)))
            except laminardb.QueryError as exc:
                outcomes.append(("error", exc.code))
    assert outcomes == [("error", 402)] * 10, outcomes


def test_cancel_query_marks_stream_inactive(trades):
    s = trades.stream("SELECT ts FROM trades")
    trades.cancel_query(_active_query_id(trades))
    assert s.is_active is False


def test_cancel_unknown_query_raises(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.cancel_query(9999)
    assert ei.value.code == 400
    assert "9999" in str(ei.value)


# --------------------------------------------------------------------------- execute()


def test_execute_ddl(db):
    er = db.execute("CREATE SOURCE logs (msg VARCHAR)")
    assert isinstance(er, laminardb.ExecuteResult)
    assert er.result_type == "ddl"
    assert er.ddl_type == "CREATE SOURCE"
    assert er.ddl_object == "logs"
    assert er.rows_affected == 0
    assert int(er) == 0
    assert bool(er) is True
    assert er.to_query_result() is None
    assert repr(er) == "ExecuteResult(ddl, CREATE SOURCE logs)"
    er = db.execute("CREATE TABLE ref (k BIGINT)")
    assert (er.result_type, er.ddl_type, er.ddl_object) == ("ddl", "CREATE TABLE", "ref")


def test_execute_dml(trades):
    er = trades.execute("INSERT INTO trades VALUES (4, 'IBM', 120.0), (5, 'ORCL', 99.0)")
    assert er.result_type == "rows_affected"
    assert er.rows_affected == 2
    assert int(er) == 2
    assert bool(er) is True
    assert er.ddl_type is None and er.ddl_object is None
    assert er.to_query_result() is None
    assert repr(er) == "ExecuteResult(rows_affected=2)"
    er = trades.execute("INSERT INTO trades SELECT * FROM trades WHERE price > 1e9")
    assert er.result_type == "rows_affected"
    assert int(er) == 0
    assert bool(er) is False
    assert count(trades, "trades") == 5


def test_execute_query(trades):
    er = trades.execute("SELECT symbol FROM trades ORDER BY ts")
    assert er.result_type == "query"
    assert bool(er) is True
    assert er.ddl_type is None
    qr = er.to_query_result()
    assert isinstance(qr, laminardb.QueryResult)
    assert qr.fetchall() == [("AAPL",), ("GOOG",), ("MSFT",)]
    empty = trades.execute("SELECT symbol FROM trades WHERE ts > 100")
    assert empty.result_type == "query"
    assert empty.to_query_result().num_rows == 0


def test_execute_metadata(trades):
    er = trades.execute("DESCRIBE trades")
    assert er.result_type == "metadata"
    qr = er.to_query_result()
    assert qr.to_dicts()["column_name"] == ["ts", "symbol", "price"]


def test_execute_with_params(trades):
    er = trades.execute("INSERT INTO trades VALUES ($1, $2, $3)", [10, "NFLX", 400.0])
    assert er.rows_affected == 1
    assert trades.query("SELECT * FROM trades WHERE ts = 10").fetchall() == [(10, "NFLX", 400.0)]
    er = trades.execute("SELECT symbol FROM trades WHERE ts = $1", params=[10])
    assert er.to_query_result().fetchall() == [("NFLX",)]


# --------------------------------------------------------------------------- params


def test_sql_params(trades):
    assert trades.sql("SELECT symbol FROM trades WHERE price > $1 ORDER BY ts", [100]).fetchall() == [
        ("AAPL",),
        ("GOOG",),
    ]
    assert trades.sql(
        "SELECT ts FROM trades WHERE symbol = $1 OR symbol = $2 ORDER BY ts", ("AAPL", "MSFT")
    ).fetchall() == [(1,), (3,)]
    assert trades.sql("SELECT ts FROM trades WHERE ts = $1 OR ts = $1", params=[2]).fetchall() == [(2,)]


@pytest.mark.parametrize(
    "value", [1, -5, 1.5, "s", "O'Brien", True, None, b"ab", 2**62], ids=repr
)
def test_param_value_types(db, value):
    assert db.sql("SELECT $1 AS x", [value]).fetchall() == [(value,)]


def test_param_is_not_substituted_inside_string_literal(db):
    assert db.sql("SELECT '$1' AS x, $1 AS y", [5]).fetchall() == [("$1", 5)]


def test_param_injection_is_not_possible(trades):
    res = trades.sql("SELECT COUNT(*) FROM trades WHERE symbol = $1", ["x' OR '1'='1"])
    assert res.fetchall() == [(0,)]


def test_many_params(db):
    sql = "SELECT " + ", ".join(f"${i}" for i in range(1, 11)) + " AS last"
    assert db.sql(sql, list(range(10))).fetchone() == tuple(range(10))


def test_missing_param_raises_query_error(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.sql("SELECT $1 AS x, $2 AS y", [1])
    assert ei.value.code == 400
    with pytest.raises(laminardb.QueryError):
        db.query("SELECT $1 AS x")


def test_params_must_be_a_sequence(db):
    with pytest.raises(TypeError):
        db.sql("SELECT $1 AS x", "notalist")
    with pytest.raises(TypeError):
        db.sql("SELECT $1 AS x", {"a": 1})


def test_unsupported_param_type(db):
    with pytest.raises(TypeError):
        db.sql("SELECT $1 AS x", [object()])


# --------------------------------------------------------------------------- errors


def test_invalid_sql_raises_query_error(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.query("INVALID SQL")
    assert ei.value.code == codes.SQL_PARSE_ERROR == 401
    assert str(ei.value).startswith("SQL parse error (401): ")
    with pytest.raises(laminardb.QueryError) as ei:
        db.execute("")
    assert ei.value.code == 401


def test_unknown_table_and_column_raise_query_failed(trades):
    with pytest.raises(laminardb.QueryError) as ei:
        trades.query("SELECT * FROM nope")
    assert ei.value.code == 400
    assert "nope" in str(ei.value)
    with pytest.raises(laminardb.QueryError) as ei:
        trades.query("SELECT nocol FROM trades")
    assert ei.value.code == 400
    assert "nocol" in str(ei.value)


# --------------------------------------------------------------------------- explain / stats


def test_explain_returns_logical_and_physical_plan(trades):
    plan = trades.explain("SELECT symbol, SUM(price) FROM trades WHERE ts > 1 GROUP BY symbol")
    assert isinstance(plan, str)
    assert "logical_plan" in plan
    assert "physical_plan" in plan
    assert "trades" in plan
    assert plan.index("logical_plan") < plan.index("physical_plan")


def test_explain_does_not_execute(trades):
    plan = trades.explain("INSERT INTO trades VALUES (9, 'X', 1.0)")
    assert "logical_plan" in plan and "physical_plan" in plan
    assert count(trades, "trades") == 3


def test_explain_errors(trades):
    with pytest.raises(laminardb.QueryError) as ei:
        trades.explain("garbage")
    assert ei.value.code == 401
    with pytest.raises(laminardb.QueryError) as ei:
        trades.explain("SELECT * FROM nope")
    assert ei.value.code == 400


def test_stats(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE)")
    st = db.stats("trades")
    assert isinstance(st, dict)
    assert st["name"] == "trades"
    assert st["total_events"] == 0
    db.insert("trades", TRADES)
    db.execute("INSERT INTO trades VALUES (4, 'IBM', 1.0)")
    st = db.stats("trades")
    assert st["name"] == "trades"
    assert st["total_events"] == 4
    assert sum(st["rows_per_shard"]) == 4
    assert len(st["rows_per_shard"]) == db.shard_count


def test_stats_unknown_table(db):
    with pytest.raises(laminardb.SchemaError) as ei:
        db.stats("nope")
    assert ei.value.code == 200


# --------------------------------------------------------------------------- query_stream


def test_query_stream_on_source_with_and_without_filter(trades):
    res = trades.query_stream("trades")
    assert isinstance(res, laminardb.QueryResult)
    assert sorted(res.fetchall()) == [(1, "AAPL", 150.0), (2, "GOOG", 2800.0), (3, "MSFT", 90.5)]
    res = trades.query_stream("trades", filter="price > 100")
    assert sorted(res.fetchall()) == [(1, "AAPL", 150.0), (2, "GOOG", 2800.0)]
    res = trades.query_stream("trades", filter="symbol = 'MSFT'")
    assert res.fetchall() == [(3, "MSFT", 90.5)]


def test_query_stream_nonexistent_raises_query_error(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.query_stream("nope")
    assert ei.value.code == 400
    with pytest.raises(laminardb.QueryError):
        db.query_stream("nope", filter="x > 1")


# --------------------------------------------------------------------------- shard independence


def _load(db):
    db.execute("CREATE SOURCE t (ts BIGINT, sym VARCHAR, px DOUBLE) WITH (partition_key = 'sym')")
    db.execute("CREATE SOURCE u (id BIGINT, grp BIGINT)")
    db.execute("CREATE TABLE ref (sym VARCHAR, name VARCHAR)")
    db.insert("t", {"ts": list(range(100)), "sym": ["A"] * 100, "px": [1.0] * 100})
    db.insert(
        "t",
        {
            "ts": list(range(100, 200)),
            "sym": [f"S{i % 7}" for i in range(100)],
            "px": [float(i) for i in range(100)],
        },
    )
    db.insert("u", {"id": list(range(1000)), "grp": [i % 3 for i in range(1000)]})
    db.insert("ref", [{"sym": "A", "name": "alpha"}, {"sym": "S1", "name": "one"}])


SHARD_QUERIES = [
    (
        "SELECT sym, COUNT(*), SUM(px) FROM t GROUP BY sym ORDER BY sym",
        [
            ("A", 100, 100.0),
            ("S0", 15, 735.0),
            ("S1", 15, 750.0),
            ("S2", 14, 665.0),
            ("S3", 14, 679.0),
            ("S4", 14, 693.0),
            ("S5", 14, 707.0),
            ("S6", 14, 721.0),
        ],
    ),
    ("SELECT COUNT(*), SUM(ts), MIN(px), MAX(px) FROM t", [(200, 19900, 0.0, 99.0)]),
    ("SELECT COUNT(DISTINCT sym) FROM t", [(8,)]),
    ("SELECT ts FROM t ORDER BY ts DESC LIMIT 3", [(199,), (198,), (197,)]),
    (
        "SELECT ts, px, SUM(px) OVER (PARTITION BY sym ORDER BY ts) FROM t WHERE sym = 'S1' ORDER BY ts LIMIT 3",
        [(101, 1.0, 1.0), (108, 8.0, 9.0), (115, 15.0, 24.0)],
    ),
    (
        "SELECT r.name, COUNT(*) FROM t JOIN ref r ON t.sym = r.sym GROUP BY r.name ORDER BY r.name",
        [("alpha", 100), ("one", 15)],
    ),
    ("SELECT grp, COUNT(*), SUM(id) FROM u GROUP BY grp ORDER BY grp", [(0, 334, 166833), (1, 333, 166167), (2, 333, 166500)]),
    ("SELECT COUNT(*) FROM u a JOIN u b ON a.id = b.id + 1", [(999,)]),
    ("SELECT COUNT(*) FROM (SELECT * FROM u LIMIT 10)", [(10,)]),
]


@pytest.mark.parametrize("sql,expected", SHARD_QUERIES, ids=[f"q{i}" for i in range(len(SHARD_QUERIES))])
def test_results_identical_across_shard_counts(sharded_db, sql, expected):
    _load(sharded_db)
    assert sharded_db.query(sql).fetchall() == expected


def test_partition_key_routes_a_key_to_one_shard(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (ts BIGINT, sym VARCHAR) WITH (partition_key = 'sym')")
    db.insert("t", {"ts": list(range(100)), "sym": ["A"] * 100})
    per_shard = db.stats("t")["rows_per_shard"]
    assert sorted(per_shard, reverse=True) == [100] + [0] * (db.shard_count - 1)


# --------------------------------------------------------------------------- stream vs close


def _drain_after_close(rows: int):
    conn = laminardb.open(":memory:")
    conn.execute("CREATE SOURCE e (id BIGINT)")
    conn.insert("e", {"id": list(range(rows))})
    s = conn.stream("SELECT id FROM e")
    conn.close()
    got = 0
    try:
        for batch in s:
            got += batch.num_rows
    except laminardb.LaminarError as exc:
        return ("error", exc.code, str(exc))
    return ("rows", got)


def test_stream_closed_connection_yields_all_rows_or_shutdown():
    outcomes = {_drain_after_close(3)[:2] for _ in range(30)}
    assert outcomes <= {("rows", 3), ("error", codes.SHUTDOWN)}, outcomes


def test_query_stream_takes_one_filter_expression_and_runs_nothing_else(db):
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.execute("CREATE STREAM big AS SELECT a FROM t WHERE a > 1")
    db.insert("t", [{"a": 1}, {"a": 5}, {"a": 9}])
    assert db.query_stream("big", "a < 9").to_dicts() == {"a": [5]}
    assert sorted(db.query_stream("big").to_dicts()["a"]) == [5, 9]
    for bad in ["a < 9; DROP STREAM big", "a < 9) OR (1 = 1", "a <"]:
        with pytest.raises(laminardb.QueryError) as ei:
            db.query_stream("big", bad)
        assert ei.value.code == laminardb.codes.SQL_PARSE_ERROR, bad
    assert sorted(db.query("SELECT a FROM big").to_dicts()["a"]) == [5, 9]


def test_subscribe_takes_one_query_and_runs_nothing_else(db):
    db.execute("CREATE SOURCE t (a BIGINT)")
    with pytest.raises(laminardb.QueryError) as ei:
        db.subscribe("SELECT a FROM t; DROP SOURCE t")
    assert "one SELECT" in str(ei.value)
    db.insert("t", [{"a": 1}])
    assert db.query("SELECT a FROM t").to_dicts() == {"a": [1]}
