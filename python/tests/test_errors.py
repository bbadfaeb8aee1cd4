"""F-PY-005: exception hierarchy, error codes, messages, and engine panics."""

from __future__ import annotations

import pyarrow as pa
import pytest

import laminardb
from laminardb import codes

SUBCLASSES = [
    laminardb.ConnectionError,
    laminardb.SchemaError,
    laminardb.IngestionError,
    laminardb.QueryError,
    laminardb.SubscriptionError,
    laminardb.StreamError,
    laminardb.CheckpointError,
    laminardb.ConnectorError,
]

EXPECTED_CODES = {
    "CONNECTION_FAILED": 100,
    "CONNECTION_CLOSED": 101,
    "CONNECTION_IN_USE": 102,
    "TABLE_NOT_FOUND": 200,
    "TABLE_EXISTS": 201,
    "SCHEMA_MISMATCH": 202,
    "INVALID_SCHEMA": 203,
    "INGESTION_FAILED": 300,
    "WRITER_CLOSED": 301,
    "BATCH_SCHEMA_MISMATCH": 302,
    "QUERY_FAILED": 400,
    "SQL_PARSE_ERROR": 401,
    "QUERY_CANCELLED": 402,
    "SUBSCRIPTION_FAILED": 500,
    "SUBSCRIPTION_CLOSED": 501,
    "SUBSCRIPTION_TIMEOUT": 502,
    "INTERNAL_ERROR": 900,
    "SHUTDOWN": 901,
}


# --------------------------------------------------------------------------- hierarchy


def test_laminar_error_is_an_exception():
    assert issubclass(laminardb.LaminarError, Exception)
    assert not issubclass(laminardb.LaminarError, laminardb.QueryError)


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_all_exception_types_subclass_laminar_error(cls):
    assert issubclass(cls, laminardb.LaminarError)
    assert issubclass(cls, Exception)
    assert cls.__name__ in laminardb.__all__


def test_exception_types_are_distinct():
    assert len(set(SUBCLASSES)) == 8
    for a in SUBCLASSES:
        for b in SUBCLASSES:
            if a is not b:
                assert not issubclass(a, b)


def test_exceptions_are_catchable_by_base_class(db):
    with pytest.raises(laminardb.LaminarError) as ei:
        db.schema("nonexistent")
    assert type(ei.value) is laminardb.SchemaError
    assert ei.value.code == 200


# --------------------------------------------------------------------------- codes module


def test_codes_module_has_all_18_constants():
    names = {n for n in dir(codes) if n.isupper()}
    assert names == set(EXPECTED_CODES)
    assert len(names) == 18


@pytest.mark.parametrize("name,value", sorted(EXPECTED_CODES.items()))
def test_code_values(name, value):
    got = getattr(codes, name)
    assert type(got) is int
    assert got == value


# --------------------------------------------------------------------------- each failure mode


def _closed(db):
    db.close()
    db.query("SELECT 1")


def _closed_writer(db):
    w = db.writer("t")
    w.close()
    w.insert({"a": 1})


def _cancelled(db):
    # a sort over 500k rows is still running when cancel_query() arrives
    db.execute("CREATE SOURCE big (id BIGINT)")
    db.insert("big", pa.record_batch({"id": pa.array(range(500_000), pa.int64())}))
    s = db.stream("SELECT id FROM big ORDER BY id DESC")
    qid = [q.id for q in db.queries() if q.active][0]
    db.cancel_query(qid)
    next(s)


FAILURES = [
    # (id, action, exception class, code, message prefix)
    ("connect_bad_uri", lambda db: laminardb.connect("bogus://x"), laminardb.ConnectionError, 100, "Connection failed (100): "),
    ("closed_connection", _closed, laminardb.ConnectionError, 101, "Connection closed (101): "),
    ("table_not_found", lambda db: db.schema("nope"), laminardb.SchemaError, 200, "Table not found (200): 'nope' does not exist"),
    ("table_exists", lambda db: db.create_table("t", {"a": "int64"}), laminardb.SchemaError, 201, "Table exists (201): 't' already exists"),
    ("invalid_schema", lambda db: db.create_table("x", {"a": "nonsense"}), laminardb.SchemaError, 203, "Invalid schema (203): "),
    ("writer_closed", _closed_writer, laminardb.IngestionError, 301, "Writer closed (301): "),
    ("batch_schema_mismatch", lambda db: db.insert("t", {"a": "abc"}), laminardb.IngestionError, 302, "Batch schema mismatch (302): "),
    ("query_failed", lambda db: db.query("SELECT * FROM nope"), laminardb.QueryError, 400, "Query failed (400): "),
    ("sql_parse_error", lambda db: db.query("INVALID SQL"), laminardb.QueryError, 401, "SQL parse error (401): "),
    ("query_cancelled", _cancelled, laminardb.QueryError, 402, "Query cancelled (402): "),
    ("create_stream_unsupported", lambda db: db.execute("CREATE STREAM s AS SELECT a FROM t ORDER BY a"), laminardb.QueryError, 400, "Query failed (400): "),
]


@pytest.mark.parametrize(
    "action,cls,code,prefix", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_failure_modes_raise_typed_errors_with_codes(db, action, cls, code, prefix):
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.insert("t", {"a": [1, 2, 3]})
    with pytest.raises(cls) as ei:
        action(db)
    err = ei.value
    assert type(err) is cls
    assert isinstance(err, laminardb.LaminarError)
    assert err.code == code
    assert type(err.code) is int
    assert str(err).startswith(prefix)
    # the message carries the numeric code, and the code is one of the constants
    assert f"({code})" in str(err)
    assert code in EXPECTED_CODES.values()


def test_error_message_exact_table_not_found(db):
    with pytest.raises(laminardb.SchemaError) as ei:
        db.insert("x", {"a": 1})
    assert str(ei.value) == "Table not found (200): 'x' does not exist"
    assert ei.value.code == codes.TABLE_NOT_FOUND


def test_checkpoint_error(db):
    with pytest.raises(laminardb.CheckpointError) as ei:
        db.checkpoint()
    assert type(ei.value) is laminardb.CheckpointError
    assert isinstance(ei.value.code, int)
    assert f"({ei.value.code})" in str(ei.value)


def test_python_side_type_errors_are_not_laminar_errors(db):
    db.execute("CREATE SOURCE t (a BIGINT)")
    with pytest.raises(TypeError) as ei:
        db.insert("t", 42)
    assert not isinstance(ei.value, laminardb.LaminarError)


# --------------------------------------------------------------------------- panics (code 900)


@pytest.mark.parametrize("site", ["shard", "coordinator"])
def test_engine_panic_raises_internal_error_and_connection_survives(sharded_db, site):
    db = sharded_db
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.insert("t", {"a": list(range(100))})
    with pytest.raises(laminardb.LaminarError) as ei:
        db._inject_panic(site)
    err = ei.value
    # unknown / internal codes fall back to the base class
    assert type(err) is laminardb.LaminarError
    assert err.code == codes.INTERNAL_ERROR == 900
    assert str(err).startswith("Internal error (900): ")
    assert "panic" in str(err)
    # the connection keeps working, with its data
    assert db.is_closed is False
    assert db.query("SELECT COUNT(*), SUM(a) FROM t").fetchall() == [(100, 4950)]
    assert db.insert("t", {"a": [1000]}) == 1
    assert db.query("SELECT COUNT(*), SUM(a) FROM t").fetchall() == [(101, 5950)]
    db.execute("CREATE SOURCE t2 (b VARCHAR)")
    db.insert("t2", {"b": "x"})
    assert db.query("SELECT b FROM t2").fetchall() == [("x",)]
    assert sorted(db.list_tables()) == ["t", "t2"]
    assert db.stats("t")["total_events"] == 101


def test_repeated_panics(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (a BIGINT)")
    for i, site in enumerate(["shard", "coordinator", "shard", "coordinator", "shard"]):
        with pytest.raises(laminardb.LaminarError) as ei:
            db._inject_panic(site)
        assert ei.value.code == 900
        db.insert("t", {"a": [i]})
        assert db.query("SELECT COUNT(*) FROM t").fetchall() == [(i + 1,)]
    with db.writer("t") as w:
        w.insert({"a": [10, 11]})
    assert db.query("SELECT SUM(a) FROM t").fetchall() == [(0 + 1 + 2 + 3 + 4 + 10 + 11,)]
    db.close()
    assert db.is_closed
