"""F-PY-003: data ingestion in all input formats, casting, atomicity, Writer."""

from __future__ import annotations

import datetime
import threading

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import I64_MIN, count


@pytest.fixture
def events(db):
    db.create_table("events", {"ts": "int64", "value": "float64"})
    return db


def rows(db, table="events"):
    return db.query(f"SELECT * FROM {table} ORDER BY ts").fetchall()


class StreamCapsule:
    """An object exposing only the Arrow PyCapsule stream interface."""

    def __init__(self, table: pa.Table):
        self._table = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self._table.__arrow_c_stream__(requested_schema)


class ArrayCapsule:
    """An object exposing only the Arrow PyCapsule array interface (one batch)."""

    def __init__(self, batch: pa.RecordBatch):
        self._batch = batch

    def __arrow_c_array__(self, requested_schema=None):
        return self._batch.__arrow_c_array__(requested_schema)


# --------------------------------------------------------------------------- the ten formats


def test_insert_single_dict(events):
    assert events.insert("events", {"ts": 1, "value": 42.0}) == 1
    assert rows(events) == [(1, 42.0)]


def test_insert_list_of_dicts(events):
    n = events.insert("events", [{"ts": 2, "value": 43.0}, {"ts": 3, "value": 44.0}])
    assert n == 2
    assert rows(events) == [(2, 43.0), (3, 44.0)]


def test_insert_columnar_dict(events):
    assert events.insert("events", {"ts": [4, 5, 6], "value": [45.0, 46.0, 47.0]}) == 3
    assert rows(events) == [(4, 45.0), (5, 46.0), (6, 47.0)]


def test_insert_pandas_dataframe(events):
    df = pd.DataFrame({"ts": [7, 8], "value": [48.0, 49.0]})
    assert events.insert("events", df) == 2
    assert rows(events) == [(7, 48.0), (8, 49.0)]


def test_insert_polars_dataframe(events):
    df = pl.DataFrame({"ts": [9, 10], "value": [50.0, 51.0]})
    assert events.insert("events", df) == 2
    assert rows(events) == [(9, 50.0), (10, 51.0)]


def test_insert_pyarrow_record_batch(events):
    batch = pa.record_batch({"ts": [11, 12], "value": [52.0, 53.0]})
    assert events.insert("events", batch) == 2
    assert rows(events) == [(11, 52.0), (12, 53.0)]


def test_insert_pyarrow_table_with_several_chunks(events):
    table = pa.Table.from_batches(
        [
            pa.record_batch({"ts": [13, 14], "value": [54.0, 55.0]}),
            pa.record_batch({"ts": [15], "value": [56.0]}),
        ]
    )
    assert events.insert("events", table) == 3
    assert rows(events) == [(13, 54.0), (14, 55.0), (15, 56.0)]


def test_insert_pycapsule_stream_object(events):
    obj = StreamCapsule(pa.table({"ts": [16, 17], "value": [57.0, 58.0]}))
    assert not isinstance(obj, (pa.Table, pa.RecordBatch))
    assert events.insert("events", obj) == 2
    assert rows(events) == [(16, 57.0), (17, 58.0)]


def test_insert_pycapsule_array_object(events):
    obj = ArrayCapsule(pa.record_batch({"ts": [18], "value": [59.0]}))
    assert events.insert("events", obj) == 1
    assert rows(events) == [(18, 59.0)]


def test_insert_json_array(events):
    assert events.insert_json("events", '[{"ts": 13, "value": 54.0}, {"ts": 14, "value": 55.5}]') == 2
    assert rows(events) == [(13, 54.0), (14, 55.5)]


def test_insert_json_single_object_and_ndjson(events):
    assert events.insert_json("events", '{"ts": 14, "value": 55.0}') == 1
    ndjson = '{"ts": 20, "value": 61.0}\n\n{"ts": 21, "value": 62.0}\n'
    assert events.insert_json("events", ndjson) == 2
    assert rows(events) == [(14, 55.0), (20, 61.0), (21, 62.0)]


def test_insert_json_pretty_printed_array(events):
    text = '[\n  {"ts": 1, "value": 2.5},\n  {"ts": 2, "value": null}\n]\n'
    assert events.insert_json("events", text) == 2
    assert rows(events) == [(1, 2.5), (2, None)]


def test_insert_csv(events):
    assert events.insert_csv("events", "ts,value\n15,56.0\n16,57.0") == 2
    assert rows(events) == [(15, 56.0), (16, 57.0)]


def test_insert_csv_quoting(db):
    db.execute("CREATE SOURCE c (ts BIGINT, s VARCHAR)")
    text = 'ts,s\n1,"hello, world"\n2,"q""uote"\n3,plain\n'
    assert db.insert_csv("c", text) == 3
    assert db.query("SELECT ts, s FROM c ORDER BY ts").fetchall() == [
        (1, "hello, world"),
        (2, 'q"uote'),
        (3, "plain"),
    ]


def test_empty_inputs_insert_zero_rows(events):
    assert events.insert_json("events", "[]") == 0
    assert events.insert_csv("events", "ts,value\n") == 0
    assert events.insert("events", {"ts": [], "value": []}) == 0
    assert events.insert("events", pd.DataFrame({"ts": [], "value": []})) == 0
    assert count(events, "events") == 0


def test_all_formats_accumulate(events):
    total = 0
    total += events.insert("events", {"ts": 1, "value": 1.0})
    total += events.insert("events", [{"ts": 2, "value": 2.0}, {"ts": 3, "value": 3.0}])
    total += events.insert("events", {"ts": [4, 5], "value": [4.0, 5.0]})
    total += events.insert("events", pd.DataFrame({"ts": [6], "value": [6.0]}))
    total += events.insert("events", pl.DataFrame({"ts": [7], "value": [7.0]}))
    total += events.insert("events", pa.record_batch({"ts": [8], "value": [8.0]}))
    total += events.insert("events", pa.table({"ts": [9], "value": [9.0]}))
    total += events.insert("events", StreamCapsule(pa.table({"ts": [10], "value": [10.0]})))
    total += events.insert_json("events", '[{"ts": 11, "value": 11.0}]')
    total += events.insert_json("events", '{"ts": 12, "value": 12.0}\n{"ts": 13, "value": 13.0}')
    total += events.insert_csv("events", "ts,value\n14,14.0")
    assert total == 14
    assert events.query("SELECT COUNT(*), SUM(ts), SUM(value) FROM events").fetchall() == [
        (14, 105, 105.0)
    ]
    assert events.stats("events")["total_events"] == 14


def test_row_dicts_in_any_key_order_with_missing_columns_and_bytes(db):
    db.create_table("blobs", {"id": "int64", "name": "string", "blob": "bytes"})
    db.insert("blobs", {"blob": b"\x00\xff", "id": 1, "name": "a"})
    db.insert("blobs", [{"name": "b", "id": 2}, {"id": 3, "blob": b"xyz"}, {"blob": None, "name": None, "id": 4}])
    assert db.query("SELECT id, name, blob FROM blobs ORDER BY id").fetchall() == [
        (1, "a", b"\x00\xff"),
        (2, "b", None),
        (3, None, b"xyz"),
        (4, None, None),
    ]


def test_single_row_inserts_hold_only_their_rows_in_memory(events):
    # A dict row is built into arrays sized for it: a builder's default capacity (1,024
    # values, ~16 KB here) held by every retained row would be ~16 MB for these rows.
    writer = events.writer("events")
    for i in range(1_000):
        writer.insert({"ts": i, "value": float(i)})
    stats = events.stats("events")
    assert stats["total_events"] == 1_000
    assert 16_000 <= stats["memory_bytes"] < 400_000, stats
    assert events.query("SELECT COUNT(*), SUM(ts) FROM events").fetchall() == [(1_000, 499_500)]


# --------------------------------------------------------------------------- casting


def test_python_ints_cast_into_double(events):
    events.insert("events", {"ts": 1, "value": 42})
    events.insert("events", [{"ts": 2, "value": 43}, {"ts": 3, "value": 44.5}])
    events.insert("events", {"ts": [4, 5], "value": [45, 46]})
    events.insert("events", pd.DataFrame({"ts": [6], "value": [47]}))
    events.insert("events", pl.DataFrame({"ts": [7], "value": [48]}))
    events.insert_json("events", '{"ts": 8, "value": 49}')
    events.insert_csv("events", "ts,value\n9,50")
    res = events.query("SELECT ts, value FROM events ORDER BY ts")
    assert res.schema.field("value").type == pa.float64()
    assert res.fetchall() == [
        (1, 42.0),
        (2, 43.0),
        (3, 44.5),
        (4, 45.0),
        (5, 46.0),
        (6, 47.0),
        (7, 48.0),
        (8, 49.0),
        (9, 50.0),
    ]
    assert all(isinstance(v, float) for _, v in res.fetchall())


def test_narrower_and_wider_types_cast_to_declared_schema(db):
    db.execute("CREATE SOURCE n (i INT, f REAL, sm SMALLINT, big BIGINT)")
    db.insert("n", pl.DataFrame({"i": [1], "f": [2], "sm": [3], "big": [4]},
                                schema={"i": pl.Int64, "f": pl.Int64, "sm": pl.Int64, "big": pl.Int32}))
    db.insert("n", pa.table({"i": pa.array([5], pa.int8()), "f": [6.5], "sm": [7], "big": pa.array([8], pa.uint8())}))
    res = db.query("SELECT * FROM n ORDER BY i")
    assert res.schema == pa.schema(
        [("i", pa.int32()), ("f", pa.float32()), ("sm", pa.int16()), ("big", pa.int64())]
    )
    assert res.fetchall() == [(1, 2.0, 3, 4), (5, 6.5, 7, 8)]


def test_json_key_order_does_not_matter(events):
    events.insert_json("events", '[{"value": 1.5, "ts": 1}, {"ts": 2, "value": 2.5}]')
    events.insert_json("events", '{"value": 3.5, "ts": 3}')
    assert rows(events) == [(1, 1.5), (2, 2.5), (3, 3.5)]


def test_column_order_of_frames_and_csv_does_not_matter(events):
    events.insert("events", pd.DataFrame({"value": [1.5], "ts": [1]}))
    events.insert("events", pl.DataFrame({"value": [2.5], "ts": [2]}))
    events.insert("events", pa.table({"value": [3.5], "ts": [3]}))
    events.insert("events", [{"value": 4.5, "ts": 4}])
    events.insert_csv("events", "value,ts\n5.5,5\n")
    assert rows(events) == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 4.5), (5, 5.5)]


def test_missing_nullable_columns_are_null(db):
    db.execute("CREATE SOURCE e (id BIGINT, v DOUBLE, s VARCHAR)")
    assert db.insert("e", [{"id": 1, "v": 1.0}, {"id": 2, "s": "only"}]) == 2
    assert db.insert_csv("e", "s,id\nfoo,3\n") == 1
    assert db.insert_json("e", '{"id": 4}') == 1
    assert db.query("SELECT id, v, s FROM e ORDER BY id").fetchall() == [
        (1, 1.0, None),
        (2, None, "only"),
        (3, None, "foo"),
        (4, None, None),
    ]


def test_nulls_from_python_pandas_and_json(db):
    db.execute("CREATE SOURCE e (id BIGINT, v DOUBLE, s VARCHAR)")
    db.insert("e", {"id": 1, "v": None, "s": None})
    db.insert("e", pd.DataFrame({"id": [2, 3], "v": [1.0, None], "s": [None, "z"]}))
    db.insert("e", pd.DataFrame({"id": pd.array([4, None], dtype="Int64"), "v": [4.0, 5.0], "s": ["a", "b"]}))
    db.insert_json("e", '{"id": 6, "v": null, "s": null}')
    assert db.query("SELECT id, v, s FROM e ORDER BY v NULLS FIRST, id").fetchall() == [
        (1, None, None),
        (3, None, "z"),
        (6, None, None),
        (2, 1.0, None),
        (4, 4.0, "a"),
        (None, 5.0, "b"),
    ]


def test_categorical_columns_become_strings(db):
    db.execute("CREATE SOURCE e (id BIGINT, s VARCHAR)")
    db.insert("e", pd.DataFrame({"id": [1, 2], "s": pd.Categorical(["x", "y"])}))
    db.insert("e", pl.DataFrame({"id": [3], "s": ["z"]}, schema={"id": pl.Int64, "s": pl.Categorical}))
    assert db.query("SELECT id, s FROM e ORDER BY id").fetchall() == [(1, "x"), (2, "y"), (3, "z")]


def test_unicode_and_large_integers_round_trip(db):
    db.execute("CREATE SOURCE e (id BIGINT, s VARCHAR)")
    big = 2**53 + 1
    db.insert("e", {"id": big, "s": "ü€ 中文"})
    db.insert_json("e", '{"id": %d, "s": ""}' % (big + 2))
    db.insert("e", {"id": 2**63 - 1, "s": "max"})
    assert db.query("SELECT id, s FROM e ORDER BY id").fetchall() == [
        (big, "ü€ 中文"),
        (big + 2, ""),
        (2**63 - 1, "max"),
    ]


def test_timestamp_column_takes_epoch_milliseconds(db):
    db.execute("CREATE SOURCE s (ts TIMESTAMP, v DOUBLE)")
    db.insert("s", {"ts": 1000, "v": 1.0})
    db.insert("s", [{"ts": 1_700_000_000_123, "v": 2.0}])
    db.insert("s", {"ts": [2500], "v": [3.0]})
    db.insert_json("s", '{"ts": 60000, "v": 4.0}')
    res = db.query("SELECT ts, v FROM s ORDER BY v")
    assert res.schema.field("ts").type == pa.timestamp("us")
    assert res.fetchall() == [
        (datetime.datetime(1970, 1, 1, 0, 0, 1), 1.0),
        (datetime.datetime(2023, 11, 14, 22, 13, 20, 123000), 2.0),
        (datetime.datetime(1970, 1, 1, 0, 0, 2, 500000), 3.0),
        (datetime.datetime(1970, 1, 1, 0, 1, 0), 4.0),
    ]
    assert db.query("SELECT CAST(ts AS BIGINT) FROM s ORDER BY v").fetchall() == [
        (1_000_000,),
        (1_700_000_000_123_000,),
        (2_500_000,),
        (60_000_000,),
    ]


def test_timestamp_column_takes_datetime_values(db):
    db.execute("CREATE SOURCE s (id BIGINT, ts TIMESTAMP)")
    db.insert("s", {"id": 1, "ts": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)})
    db.insert("s", pd.DataFrame({"id": [2], "ts": pd.to_datetime(["2024-01-01T00:00:01"])}))
    db.insert("s", pl.DataFrame({"id": [3], "ts": [datetime.datetime(2024, 1, 1, 0, 0, 2)]}))
    assert db.query("SELECT id, CAST(ts AS BIGINT) FROM s ORDER BY id").fetchall() == [
        (1, 1_704_067_200_000_000),
        (2, 1_704_067_201_000_000),
        (3, 1_704_067_202_000_000),
    ]


def test_pandas_named_index_is_a_column(db):
    db.execute("CREATE SOURCE e (id BIGINT, v DOUBLE, s VARCHAR)")
    df = pd.DataFrame({"id": [90, 91], "v": [1.0, 2.0], "s": ["x", "y"]}).set_index("id")
    assert db.insert("e", df) == 2
    assert db.query("SELECT id, v, s FROM e ORDER BY v").fetchall() == [(90, 1.0, "x"), (91, 2.0, "y")]


# --------------------------------------------------------------------------- 302: nothing stored


def _assert_302_nothing_stored(db, table, fn, before):
    events_before = db.stats(table)["total_events"]
    with pytest.raises(laminardb.IngestionError) as ei:
        fn()
    assert ei.value.code == codes.BATCH_SCHEMA_MISMATCH == 302
    assert str(ei.value).startswith("Batch schema mismatch (302): ")
    assert count(db, table) == before
    assert db.stats(table)["total_events"] == events_before
    return ei.value


BAD_INSERTS = {
    "list_of_dicts_bad_row": lambda db: db.insert(
        "events", [{"ts": 100, "value": 1.0}, {"ts": "x", "value": 2.0}]
    ),
    "columnar_bad_value": lambda db: db.insert("events", {"ts": [101, 102], "value": [1.0, "bad"]}),
    "single_dict_bad_value": lambda db: db.insert("events", {"ts": "abc", "value": 1.0}),
    "extra_column": lambda db: db.insert("events", {"ts": 99, "value": 1.0, "extra": 3}),
    "table_bad_second_chunk": lambda db: db.insert(
        "events",
        pa.Table.from_batches(
            [
                pa.record_batch({"ts": ["1", "2"], "value": [1.0, 2.0]}),
                pa.record_batch({"ts": ["3", "x"], "value": [3.0, 4.0]}),
            ]
        ),
    ),
    "pandas_bad_value": lambda db: db.insert(
        "events", pd.DataFrame({"ts": [1, 2], "value": ["1.5", "nope"]})
    ),
    "polars_bad_value": lambda db: db.insert(
        "events", pl.DataFrame({"ts": ["1", "zz"], "value": [1.0, 2.0]})
    ),
    "ndjson_bad_second_line": lambda db: db.insert_json(
        "events", '{"ts": 12, "value": 1.0}\n{"ts": "bad", "value": 2.0}\n'
    ),
    "json_unknown_key": lambda db: db.insert_json("events", '[{"ts": 1, "value": 1.0, "zzz": 1}]'),
    "json_invalid": lambda db: db.insert_json("events", "not json"),
    "csv_bad_second_row": lambda db: db.insert_csv("events", "ts,value\n40,1.0\n41,notnum\n"),
    "csv_unknown_column": lambda db: db.insert_csv("events", "ts,value,zzz\n4,1,9\n"),
    "int_overflow": lambda db: db.insert("events", {"ts": 2**63, "value": 1.0}),
    "ragged_columns": lambda db: db.insert("events", {"ts": [1, 2], "value": [1.0]}),
    "mixed_scalar_and_list": lambda db: db.insert("events", {"ts": [1, 2], "value": 1.0}),
}


@pytest.mark.parametrize("case", sorted(BAD_INSERTS))
def test_uncastable_insert_raises_302_and_stores_nothing(events, case):
    events.insert("events", {"ts": [1, 2, 3], "value": [1.0, 2.0, 3.0]})
    _assert_302_nothing_stored(events, "events", lambda: BAD_INSERTS[case](events), 3)
    assert rows(events) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_narrowing_overflow_raises_302(db):
    db.execute("CREATE SOURCE n (i INT, sm SMALLINT)")
    _assert_302_nothing_stored(db, "n", lambda: db.insert("n", {"i": 2**40, "sm": 1}), 0)
    _assert_302_nothing_stored(db, "n", lambda: db.insert("n", [{"i": 1, "sm": 1}, {"i": 1, "sm": 70000}]), 0)


def test_not_null_violations_raise_302(db):
    db.execute("CREATE SOURCE s (id BIGINT NOT NULL, v DOUBLE)")
    db.insert("s", {"id": 1, "v": 1.0})
    err = _assert_302_nothing_stored(db, "s", lambda: db.insert("s", {"v": 2.0}), 1)
    assert "id" in str(err)
    _assert_302_nothing_stored(db, "s", lambda: db.insert("s", {"id": None, "v": 2.0}), 1)
    _assert_302_nothing_stored(
        db, "s", lambda: db.insert("s", [{"id": 2, "v": 2.5}, {"id": None, "v": 3.5}]), 1
    )
    _assert_302_nothing_stored(db, "s", lambda: db.insert_json("s", '{"v": 1.0}'), 1)
    assert db.query("SELECT * FROM s").fetchall() == [(1, 1.0)]


def test_error_message_names_the_column(events):
    with pytest.raises(laminardb.IngestionError) as ei:
        events.insert("events", {"ts": 1, "value": "abc"})
    assert "'value'" in str(ei.value)
    with pytest.raises(laminardb.IngestionError) as ei:
        events.insert("events", {"ts": 1, "value": 1.0, "extra": 3})
    assert "'extra'" in str(ei.value)


# --------------------------------------------------------------------------- TypeError / unknown table


@pytest.mark.parametrize(
    "data",
    [42, 4.2, "ts,value\n1,2", object(), ({"ts": 1, "value": 1.0},), None, [1, 2]],
    ids=["int", "float", "str", "object", "tuple", "None", "list_of_ints"],
)
def test_unsupported_type_raises_type_error(events, data):
    with pytest.raises(TypeError):
        events.insert("events", data)
    assert count(events, "events") == 0


def test_empty_list_raises_type_error(events):
    with pytest.raises(TypeError):
        events.insert("events", [])
    assert count(events, "events") == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda db: db.insert("nope", {"a": 1}),
        lambda db: db.insert("nope", pa.record_batch({"a": [1]})),
        lambda db: db.insert_json("nope", '{"a": 1}'),
        lambda db: db.insert_csv("nope", "a\n1"),
        lambda db: db.writer("nope"),
    ],
    ids=["insert", "insert_batch", "insert_json", "insert_csv", "writer"],
)
def test_unknown_table_raises_table_not_found(db, call):
    with pytest.raises(laminardb.SchemaError) as ei:
        call(db)
    assert ei.value.code == codes.TABLE_NOT_FOUND == 200
    assert str(ei.value) == "Table not found (200): 'nope' does not exist"


# --------------------------------------------------------------------------- read-your-writes


def test_read_your_writes(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (id BIGINT, sym VARCHAR)")
    expected = 0
    for i in range(25):
        n = i % 4 + 1
        assert db.insert("t", {"id": list(range(expected, expected + n)), "sym": ["a"] * n}) == n
        expected += n
        assert db.query("SELECT COUNT(*), SUM(id) FROM t").fetchall() == [
            (expected, expected * (expected - 1) // 2)
        ]
    db.start()
    db.insert_json("t", '{"id": 1000, "sym": "b"}')
    assert db.query("SELECT id FROM t WHERE sym = 'b'").fetchall() == [(1000,)]


def test_read_your_writes_through_writer(db):
    db.execute("CREATE SOURCE t (id BIGINT)")
    w = db.writer("t")
    for i in range(10):
        w.insert({"id": i})
        assert count(db, "t") == i + 1
    w.close()


def test_insert_into_sql(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (a BIGINT, b VARCHAR)")
    er = db.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    assert er.result_type == "rows_affected"
    assert er.rows_affected == 3
    er = db.execute("INSERT INTO t SELECT a + 10, b FROM t WHERE a < 3")
    assert er.rows_affected == 2
    assert db.query("SELECT a, b FROM t ORDER BY a").fetchall() == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
        (11, "a"),
        (12, "b"),
    ]


def test_concurrent_inserts_from_threads(db):
    db.execute("CREATE SOURCE t (k BIGINT, v DOUBLE)")
    errors = []

    def worker(k):
        try:
            for i in range(50):
                db.insert("t", {"k": [k * 1000 + i] * 10, "v": [1.0] * 10})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db.query("SELECT COUNT(*), SUM(v), COUNT(DISTINCT k) FROM t").fetchall() == [(2000, 2000.0, 200)]


# --------------------------------------------------------------------------- Writer


def test_writer_properties(db):
    db.execute("CREATE SOURCE w (ts BIGINT, sym VARCHAR)")
    w = db.writer("w")
    assert isinstance(w, laminardb.Writer)
    assert laminardb.BatchWriter is laminardb.Writer
    assert w.name == "w"
    assert w.schema == pa.schema([("ts", pa.int64()), ("sym", pa.string())])
    assert w.current_watermark == I64_MIN
    w.close()


def test_writer_insert_flush_watermark(db):
    db.create_table("events", {"ts": "int64", "value": "float64"})
    w = db.writer("events")
    assert w.insert({"ts": 20, "value": 60.0}) is None
    w.insert({"ts": 21, "value": 61})
    assert w.flush() == 0
    assert w.watermark(21) is None
    assert w.current_watermark == 21
    assert db.stats("events")["watermark"] == 21
    assert db.pipeline_watermark == 21
    w.watermark(100)
    assert w.current_watermark == 100
    # a lower watermark never moves it back
    w.watermark(50)
    assert w.current_watermark == 100
    assert db.stats("events")["watermark"] == 100
    w.close()
    assert rows(db) == [(20, 60.0), (21, 61.0)]


def test_writer_accepts_all_formats(db):
    db.create_table("events", {"ts": "int64", "value": "float64"})
    with db.writer("events") as w:
        w.insert({"ts": 1, "value": 1})
        w.insert([{"ts": 2, "value": 2.0}])
        w.insert({"ts": [3], "value": [3.0]})
        w.insert(pd.DataFrame({"ts": [4], "value": [4.0]}))
        w.insert(pl.DataFrame({"ts": [5], "value": [5.0]}))
        w.insert(pa.record_batch({"ts": [6], "value": [6.0]}))
        w.insert(pa.table({"ts": [7], "value": [7.0]}))
        w.insert(StreamCapsule(pa.table({"ts": [8], "value": [8.0]})))
        with pytest.raises(TypeError):
            w.insert([])
        with pytest.raises(TypeError):
            w.insert(5)
    assert db.query("SELECT COUNT(*), SUM(ts), SUM(value) FROM events").fetchall() == [(8, 36, 36.0)]


def test_writer_bad_batch_raises_302_and_stores_nothing(db):
    db.create_table("events", {"ts": "int64", "value": "float64"})
    with db.writer("events") as w:
        w.insert({"ts": 1, "value": 1.0})
        with pytest.raises(laminardb.IngestionError) as ei:
            w.insert([{"ts": 2, "value": 2.0}, {"ts": "x", "value": 3.0}])
        assert ei.value.code == 302
        # the writer stays usable
        w.insert({"ts": 3, "value": 3.0})
    assert rows(db) == [(1, 1.0), (3, 3.0)]


def test_writer_context_manager_auto_closes(db):
    db.create_table("events", {"ts": "int64", "value": "float64"})
    with db.writer("events") as w:
        w.insert({"ts": 20, "value": 60.0})
        w.insert({"ts": 21, "value": 61.0})
        w.watermark(21)
        assert w.current_watermark == 21
    with pytest.raises(laminardb.IngestionError) as ei:
        w.insert({"ts": 22, "value": 62.0})
    assert ei.value.code == codes.WRITER_CLOSED == 301
    assert rows(db) == [(20, 60.0), (21, 61.0)]


def test_writer_context_manager_closes_on_exception(db):
    db.create_table("events", {"ts": "int64", "value": "float64"})
    with pytest.raises(RuntimeError):
        with db.writer("events") as w:
            w.insert({"ts": 1, "value": 1.0})
            raise RuntimeError("boom")
    with pytest.raises(laminardb.IngestionError) as ei:
        w.insert({"ts": 2, "value": 2.0})
    assert ei.value.code == 301
    assert rows(db) == [(1, 1.0)]


def test_closed_writer_raises_writer_closed(db):
    db.execute("CREATE SOURCE w (ts BIGINT, sym VARCHAR)")
    w = db.writer("w")
    w.insert({"ts": 5, "sym": "A"})
    w.close()
    w.close()  # idempotent
    for op in (lambda: w.insert({"ts": 6, "sym": "A"}), w.flush, lambda: w.watermark(200)):
        with pytest.raises(laminardb.IngestionError) as ei:
            op()
        assert ei.value.code == codes.WRITER_CLOSED == 301
        assert str(ei.value) == "Writer closed (301): the writer for 'w' is closed"
    assert db.query("SELECT * FROM w").fetchall() == [(5, "A")]
    # a new writer on the same source works
    with db.writer("w") as w2:
        w2.insert({"ts": 7, "sym": "B"})
    assert count(db, "w") == 2


def test_columnar_dict_of_numpy_pandas_and_arrow_arrays(events):
    assert events.insert("events", {"ts": np.arange(3), "value": np.ones(3)}) == 3
    assert events.insert("events", {"ts": np.int64(10), "value": np.float64(2.5)}) == 1
    assert events.insert("events", {"ts": pa.array([20]), "value": pa.array([1.0])}) == 1
    assert events.insert("events", {"ts": pd.Series([30, 31]), "value": pd.Series([1.0, 2.0])}) == 2
    assert rows(events) == [(0, 1.0), (1, 1.0), (2, 1.0), (10, 2.5), (20, 1.0), (30, 1.0), (31, 2.0)]


def test_date_and_timestamp_strings_in_json_and_csv(db):
    db.execute("CREATE SOURCE d (day DATE, ts TIMESTAMP)")
    db.insert("d", {"day": datetime.date(2024, 1, 2), "ts": pd.Timestamp("2024-01-02T03:04:05Z")})
    db.insert_json("d", '{"day": "2024-01-03", "ts": "2024-01-03T00:00:00"}')
    db.insert_csv("d", "day,ts\n2024-01-04,2024-01-04T00:00:00\n")
    assert db.query("SELECT * FROM d ORDER BY day").fetchall() == [
        (datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 2, 3, 4, 5)),
        (datetime.date(2024, 1, 3), datetime.datetime(2024, 1, 3)),
        (datetime.date(2024, 1, 4), datetime.datetime(2024, 1, 4)),
    ]


def test_float_with_a_fraction_into_bigint_is_refused_and_nothing_stored(db):
    db.execute("CREATE SOURCE f (a BIGINT)")
    db.insert("f", {"a": [51.0]})  # integral floats are fine
    with pytest.raises(laminardb.IngestionError) as ei:
        db.insert("f", {"a": [1.0, 51.7]})
    assert ei.value.code == 302
    assert "51.7" in str(ei.value)
    assert db.query("SELECT a FROM f").fetchall() == [(51,)]
