"""F-PY-002: schema management, catalog listing and info classes, DDL."""

from __future__ import annotations

import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import count


# --------------------------------------------------------------------------- create_table


def test_create_table_with_pyarrow_schema_round_trip(db):
    schema = pa.schema(
        [
            ("ts", pa.timestamp("us")),
            ("symbol", pa.utf8()),
            ("price", pa.float64()),
            pa.field("qty", pa.int32(), nullable=False),
            ("day", pa.date32()),
            ("flag", pa.bool_()),
            ("small", pa.int8()),
            ("f32", pa.float32()),
            ("blob", pa.binary()),
            ("big_text", pa.large_string()),
            ("u64", pa.uint64()),
            ("ts_ms", pa.timestamp("ms")),
            ("ts_tz", pa.timestamp("us", tz="UTC")),
        ]
    )
    assert db.create_table("trades", schema) is None
    got = db.schema("trades")
    assert isinstance(got, pa.Schema)
    assert got.equals(schema)
    assert got.field("qty").nullable is False
    assert got.field("price").nullable is True
    assert db.list_tables() == ["trades"]


DICT_TYPES = [
    ("int8", pa.int8()),
    ("i8", pa.int8()),
    ("int16", pa.int16()),
    ("i16", pa.int16()),
    ("int32", pa.int32()),
    ("i32", pa.int32()),
    ("int", pa.int32()),
    ("int64", pa.int64()),
    ("i64", pa.int64()),
    ("uint8", pa.uint8()),
    ("uint16", pa.uint16()),
    ("uint32", pa.uint32()),
    ("uint64", pa.uint64()),
    ("float16", pa.float16()),
    ("f16", pa.float16()),
    ("float32", pa.float32()),
    ("f32", pa.float32()),
    ("float", pa.float32()),
    ("float64", pa.float64()),
    ("f64", pa.float64()),
    ("double", pa.float64()),
    ("bool", pa.bool_()),
    ("boolean", pa.bool_()),
    ("string", pa.string()),
    ("str", pa.string()),
    ("utf8", pa.string()),
    ("large_string", pa.large_string()),
    ("large_utf8", pa.large_string()),
    ("binary", pa.binary()),
    ("bytes", pa.binary()),
    ("date32", pa.date32()),
    ("date", pa.date32()),
    ("timestamp", pa.timestamp("us")),
    ("datetime", pa.timestamp("us")),
]


@pytest.mark.parametrize("type_str,expected", DICT_TYPES, ids=[t for t, _ in DICT_TYPES])
def test_create_table_dict_type_strings(db, type_str, expected):
    db.create_table("t", {"c": type_str})
    assert db.schema("t") == pa.schema([("c", expected)])


def test_create_table_dict_schema_round_trip(db):
    db.create_table("sensors", {"ts": "timestamp", "value": "float64", "id": "int32"})
    assert db.schema("sensors") == pa.schema(
        [("ts", pa.timestamp("us")), ("value", pa.float64()), ("id", pa.int32())]
    )
    info = {s.name: s for s in db.sources()}["sensors"]
    assert info.schema == db.schema("sensors")
    assert info.watermark_column is None


def test_create_table_unknown_type_string_is_invalid_schema(db):
    with pytest.raises(laminardb.SchemaError) as ei:
        db.create_table("bad", {"c": "notatype"})
    assert ei.value.code == codes.INVALID_SCHEMA == 203
    assert str(ei.value).startswith("Invalid schema (203): ")
    assert "notatype" in str(ei.value)
    assert db.list_tables() == []


def test_create_table_empty_schema_is_invalid_schema(db):
    with pytest.raises(laminardb.SchemaError) as ei:
        db.create_table("bad", {})
    assert ei.value.code == 203
    assert db.list_tables() == []


@pytest.mark.parametrize("schema", [5, "a INT", ["a", "int"]])
def test_create_table_wrong_schema_type_is_type_error(db, schema):
    with pytest.raises(TypeError):
        db.create_table("bad", schema)
    assert db.list_tables() == []


def test_create_table_duplicate_raises_table_exists(db):
    db.create_table("t", {"a": "int32"})
    with pytest.raises(laminardb.SchemaError) as ei:
        db.create_table("t", {"a": "int32"})
    assert ei.value.code == codes.TABLE_EXISTS == 201
    assert str(ei.value) == "Table exists (201): 't' already exists"


def test_sql_duplicate_source_raises_table_exists(db):
    db.execute("CREATE SOURCE t (a INT)")
    for ddl in ("CREATE SOURCE t (b BIGINT)", "CREATE TABLE t (b BIGINT)"):
        with pytest.raises(laminardb.SchemaError) as ei:
            db.execute(ddl)
        assert ei.value.code == 201
    assert db.schema("t") == pa.schema([("a", pa.int32())])


def test_create_source_if_not_exists_keeps_existing(db):
    db.execute("CREATE SOURCE src (id BIGINT)")
    db.insert("src", {"id": [1, 2]})
    er = db.execute("CREATE SOURCE IF NOT EXISTS src (other VARCHAR)")
    assert er.result_type == "ddl"
    assert er.ddl_type == "CREATE SOURCE"
    assert db.schema("src") == pa.schema([("id", pa.int64())])
    assert count(db, "src") == 2


def test_schema_of_nonexistent_table_raises_table_not_found(db):
    with pytest.raises(laminardb.SchemaError) as ei:
        db.schema("nonexistent")
    assert ei.value.code == codes.TABLE_NOT_FOUND == 200
    assert str(ei.value) == "Table not found (200): 'nonexistent' does not exist"


# --------------------------------------------------------------------------- SQL DDL


def test_create_source_sql_types_and_not_null(db):
    db.execute(
        "CREATE SOURCE s (id BIGINT NOT NULL, i INT, sm SMALLINT, f REAL, d DOUBLE, "
        "b BOOLEAN, name VARCHAR, ts TIMESTAMP)"
    )
    assert db.schema("s") == pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            ("i", pa.int32()),
            ("sm", pa.int16()),
            ("f", pa.float32()),
            ("d", pa.float64()),
            ("b", pa.bool_()),
            ("name", pa.string()),
            ("ts", pa.timestamp("us")),
        ]
    )


def test_watermark_for_clause_sets_watermark_column(db):
    db.execute(
        "CREATE SOURCE trades (ts TIMESTAMP, sym VARCHAR, px DOUBLE, "
        "WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)"
    )
    db.execute("CREATE SOURCE quotes (ts BIGINT, sym VARCHAR, WATERMARK FOR ts)")
    db.execute("CREATE SOURCE plain (ts BIGINT)")
    db.execute(
        "CREATE SOURCE w (ts BIGINT, sym VARCHAR) WITH (watermark_column = 'ts', partition_key = 'sym')"
    )
    infos = {s.name: s for s in db.sources()}
    assert sorted(infos) == ["plain", "quotes", "trades", "w"]
    assert infos["trades"].watermark_column == "ts"
    assert infos["quotes"].watermark_column == "ts"
    assert infos["w"].watermark_column == "ts"
    assert infos["plain"].watermark_column is None
    # the WATERMARK clause is not a column
    assert db.schema("trades").names == ["ts", "sym", "px"]
    assert db.schema("w").names == ["ts", "sym"]


def test_sources_info_properties(db):
    schema = pa.schema([("ts", pa.int64()), ("symbol", pa.string()), ("price", pa.float64())])
    db.create_table("trades", schema)
    infos = db.sources()
    assert len(infos) == 1
    info = infos[0]
    assert isinstance(info, laminardb.SourceInfo)
    assert info.name == "trades"
    assert isinstance(info.schema, pa.Schema)
    assert info.schema.equals(schema)
    assert info.watermark_column is None
    with pytest.raises(AttributeError):
        info.name = "other"  # frozen


def test_list_functions_and_aliases(db):
    assert db.list_tables() == []
    db.create_table("trades", {"ts": "int64"})
    db.create_table("sensors", {"ts": "int64"})
    db.execute("CREATE TABLE ref (k BIGINT, name VARCHAR)")
    assert sorted(db.list_tables()) == ["ref", "sensors", "trades"]
    assert db.tables() == db.list_tables()
    assert sorted(s.name for s in db.sources()) == ["ref", "sensors", "trades"]
    assert db.list_streams() == []
    assert db.materialized_views() == db.list_streams() == []
    assert db.list_sinks() == []
    assert db.sinks() == []
    assert db.streams() == []


def test_drop_source_and_table(db):
    db.execute("CREATE SOURCE a (x BIGINT)")
    db.execute("CREATE TABLE b (x BIGINT)")
    er = db.execute("DROP SOURCE a")
    assert (er.result_type, er.ddl_type, er.ddl_object) == ("ddl", "DROP SOURCE", "a")
    assert db.list_tables() == ["b"]
    er = db.execute("DROP TABLE b")
    assert (er.result_type, er.ddl_type, er.ddl_object) == ("ddl", "DROP TABLE", "b")
    assert db.list_tables() == []
    with pytest.raises(laminardb.QueryError):
        db.query("SELECT * FROM a")


def test_drop_nonexistent_raises_and_if_exists_does_not(db):
    with pytest.raises(laminardb.SchemaError) as ei:
        db.execute("DROP SOURCE nope")
    assert ei.value.code == 200
    assert str(ei.value) == "Table not found (200): 'nope' does not exist"
    er = db.execute("DROP SOURCE IF EXISTS nope")
    assert er.result_type == "ddl"
    er = db.execute("DROP TABLE IF EXISTS nope")
    assert er.result_type == "ddl"


def test_recreate_after_drop_is_empty_with_new_schema(db):
    db.execute("CREATE SOURCE r (x BIGINT)")
    db.insert("r", {"x": [1, 2, 3]})
    db.execute("DROP SOURCE r")
    db.execute("CREATE SOURCE r (y DOUBLE, z VARCHAR)")
    assert db.schema("r") == pa.schema([("y", pa.float64()), ("z", pa.string())])
    assert count(db, "r") == 0
    db.insert("r", {"y": 1, "z": "a"})
    assert db.query("SELECT * FROM r").fetchall() == [(1.0, "a")]


def test_create_table_reference_table_is_queryable_and_joinable(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE trades (sym VARCHAR, qty BIGINT)")
    db.execute("CREATE TABLE names (sym VARCHAR, name VARCHAR)")
    db.insert("names", [{"sym": "A", "name": "alpha"}, {"sym": "B", "name": "beta"}])
    db.insert("trades", {"sym": ["A", "B", "A", "C"], "qty": [1, 2, 3, 4]})
    rows = db.query(
        "SELECT n.name, SUM(t.qty) FROM trades t JOIN names n ON t.sym = n.sym "
        "GROUP BY n.name ORDER BY n.name"
    ).fetchall()
    assert rows == [("alpha", 4), ("beta", 2)]


def test_create_table_primary_key_not_supported_yet(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.execute("CREATE TABLE ref (id BIGINT PRIMARY KEY, name VARCHAR)")
    assert "PRIMARY KEY" in str(ei.value)
    assert db.list_tables() == []


def test_multi_statement_ddl(db):
    er = db.execute("CREATE SOURCE a1 (x INT); CREATE SOURCE a2 (y INT)")
    assert er.ddl_object == "a2"
    assert sorted(db.list_tables()) == ["a1", "a2"]


def test_quoted_identifiers_preserve_case(db):
    db.execute('CREATE SOURCE "Quoted" ("MixedCol" BIGINT)')
    assert db.schema("Quoted") == pa.schema([("MixedCol", pa.int64())])
    db.insert("Quoted", {"MixedCol": 5})
    assert db.query('SELECT "MixedCol" FROM "Quoted"').fetchall() == [(5,)]


# --------------------------------------------------------------------------- not runnable in a stream


@pytest.mark.parametrize(
    "ddl,named",
    [
        ("CREATE STREAM s AS SELECT a FROM t ORDER BY a", "ORDER BY"),
        ("CREATE STREAM s AS SELECT a FROM t LIMIT 3", "LIMIT"),
        ("CREATE STREAM s AS SELECT t.a FROM t LEFT JOIN t u ON t.a = u.a", "LEFT JOIN"),
        ("CREATE STREAM s AS SELECT t.a FROM t JOIN t u ON t.a = u.a JOIN t w ON u.a = w.a", "over another JOIN"),
        ("CREATE STREAM s AS SELECT a, SUM(a) OVER (ORDER BY a) FROM t", "window functions"),
        ("CREATE STREAM s AS SELECT a, MEDIAN(a) FROM t GROUP BY a", "MEDIAN"),
        ("CREATE VIEW v AS SELECT a FROM t", "CREATE VIEW"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT DISTINCT ON (a) a FROM t", "SELECT DISTINCT ON"),
    ],
)
def test_streaming_ddl_is_rejected_with_named_feature(db, ddl, named):
    db.execute("CREATE SOURCE t (a BIGINT)")
    with pytest.raises(laminardb.QueryError) as ei:
        db.execute(ddl)
    assert ei.value.code == codes.QUERY_FAILED == 400
    msg = str(ei.value)
    assert msg.startswith("Query failed (400): ")
    assert "unsupported" in msg
    assert named in msg
    # nothing was created
    assert db.list_streams() == []
    assert db.list_sinks() == []
    assert db.list_tables() == ["t"]


def test_create_stream_through_query_creates_it(db):
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.query("CREATE STREAM s AS SELECT a FROM t")
    assert [s.name for s in db.streams()] == ["s"]


def test_query_stream_of_unknown_stream_raises_query_error(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.query_stream("nope")
    assert ei.value.code == 400
    assert "nope" in str(ei.value)


# --------------------------------------------------------------------------- queries()


def test_queries_reflect_completed_and_active(db):
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.insert("t", {"a": [1, 2, 3]})
    assert db.queries() == []
    db.query("SELECT a FROM t ORDER BY a")
    db.query("SELECT SUM(a) FROM t")
    infos = db.queries()
    assert [type(q) for q in infos] == [laminardb.QueryInfo, laminardb.QueryInfo]
    assert [(q.sql, q.active) for q in infos] == [
        ("SELECT a FROM t ORDER BY a", False),
        ("SELECT SUM(a) FROM t", False),
    ]
    assert len({q.id for q in infos}) == 2
    assert infos[0].id < infos[1].id

    stream = db.stream("SELECT a FROM t")
    infos = db.queries()
    assert len(infos) == 3
    assert (infos[-1].sql, infos[-1].active) == ("SELECT a FROM t", True)
    assert db.active_query_count == 1
    rows = sum(batch.num_rows for batch in stream)
    assert rows == 3
    assert [q.active for q in db.queries()] == [False, False, False]
    assert db.active_query_count == 0
