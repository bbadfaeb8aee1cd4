"""F-PY-001 (connection & database management), F-PY-029 (configuration) and
the pipeline lifecycle properties of the Connection."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import I64_MIN, count


# --------------------------------------------------------------------------- open / close


def test_open_memory_and_close():
    conn = laminardb.open(":memory:")
    assert isinstance(conn, laminardb.Connection)
    assert conn.is_closed is False
    assert repr(conn) == "Connection(open)"
    conn.close()
    assert conn.is_closed is True
    assert repr(conn) == "Connection(closed)"
    # close() is idempotent
    conn.close()
    assert conn.is_closed is True


def test_open_path_is_usable(tmp_path):
    conn = laminardb.open(str(tmp_path / "mydb"))
    try:
        conn.execute("CREATE SOURCE events (ts BIGINT, value DOUBLE)")
        assert conn.insert("events", {"ts": 1, "value": 42.0}) == 1
        assert conn.query("SELECT ts, value FROM events").fetchall() == [(1, 42.0)]
    finally:
        conn.close()


@pytest.mark.parametrize("uri", ["memory://", ":memory:", "laminar://localhost:5432/mydb"])
def test_connect_uris(uri):
    conn = laminardb.connect(uri)
    try:
        assert isinstance(conn, laminardb.Connection)
        assert repr(conn) == "Connection(open)"
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.insert("t", {"a": [1, 2, 3]})
        assert conn.query("SELECT SUM(a) FROM t").fetchall() == [(6,)]
    finally:
        conn.close()
    assert conn.is_closed


def test_connect_plain_path(tmp_path):
    conn = laminardb.connect(str(tmp_path / "db"))
    try:
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.insert("t", {"a": [5]})
        assert conn.query("SELECT a FROM t").fetchall() == [(5,)]
    finally:
        conn.close()


@pytest.mark.parametrize("uri", ["bogus://x", ""])
def test_connect_unsupported_uri_raises_connection_failed(uri):
    with pytest.raises(laminardb.ConnectionError) as ei:
        laminardb.connect(uri)
    assert ei.value.code == codes.CONNECTION_FAILED == 100
    assert str(ei.value).startswith("Connection failed (100): ")


def test_open_config_must_be_laminar_config():
    with pytest.raises(TypeError):
        laminardb.open(":memory:", config="not a config")


def test_open_config_is_keyword_only():
    with pytest.raises(TypeError):
        laminardb.open(":memory:", laminardb.LaminarConfig())  # type: ignore[misc]


# --------------------------------------------------------------------------- config (F-PY-029)


def test_config_defaults():
    cfg = laminardb.LaminarConfig()
    assert cfg.buffer_size == 65536
    assert cfg.storage_dir is None
    assert cfg.checkpoint_interval_ms is None
    assert cfg.table_spill_threshold == 1_000_000
    assert isinstance(cfg.shards, int) and cfg.shards >= 1
    assert repr(cfg) == (
        "LaminarConfig(buffer_size=65536, storage_dir=None, checkpoint_interval_ms=None, "
        f"table_spill_threshold=1000000, shards={cfg.shards}, idle_timeout_ms=10000, wal_fsync=True, "
        "max_event_ahead_ms=86400000, subscriber_queue_bytes=67108864, "
        "recovery='strict', metrics_port=None)"
    )
    assert cfg.idle_timeout_ms == 10_000
    assert cfg.subscriber_queue_bytes == 64 << 20
    assert cfg.wal_fsync is True


def test_config_custom_properties_and_repr():
    cfg = laminardb.LaminarConfig(
        buffer_size=1024,
        storage_dir="/tmp/laminar_data",
        checkpoint_interval_ms=5000,
        table_spill_threshold=10_000_000,
        shards=1,
    )
    assert cfg.buffer_size == 1024
    assert cfg.storage_dir == "/tmp/laminar_data"
    assert cfg.checkpoint_interval_ms == 5000
    assert cfg.table_spill_threshold == 10_000_000
    assert cfg.shards == 1
    assert repr(cfg) == (
        "LaminarConfig(buffer_size=1024, storage_dir='/tmp/laminar_data', "
        "checkpoint_interval_ms=5000, table_spill_threshold=10000000, shards=1, idle_timeout_ms=10000, "
        "wal_fsync=True, max_event_ahead_ms=86400000, subscriber_queue_bytes=67108864, "
        "recovery='strict', metrics_port=None)"
    )


def test_config_alias():
    assert laminardb.Config is laminardb.LaminarConfig
    cfg = laminardb.Config(buffer_size=2048)
    assert isinstance(cfg, laminardb.LaminarConfig)
    assert cfg.buffer_size == 2048


@pytest.mark.parametrize(
    "attr", ["buffer_size", "storage_dir", "checkpoint_interval_ms", "table_spill_threshold", "shards"]
)
def test_config_properties_are_read_only(attr):
    cfg = laminardb.LaminarConfig()
    with pytest.raises(AttributeError):
        setattr(cfg, attr, 1)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        laminardb.LaminarConfig(1024)  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [{"shards": 0}, {"buffer_size": 0}])
def test_config_rejects_zero(kwargs):
    with pytest.raises(ValueError):
        laminardb.LaminarConfig(**kwargs)


def test_open_with_custom_config(tmp_path):
    cfg = laminardb.LaminarConfig(
        buffer_size=1024,
        storage_dir=str(tmp_path / "data"),
        checkpoint_interval_ms=5000,
        table_spill_threshold=10,
        shards=1,
    )
    conn = laminardb.open(str(tmp_path / "mydb"), config=cfg)
    try:
        assert conn.shard_count == 1
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.insert("t", {"a": list(range(100))})
        assert conn.query("SELECT COUNT(*), SUM(a) FROM t").fetchall() == [(100, 4950)]
    finally:
        conn.close()


def test_config_reusable_across_connections():
    cfg = laminardb.LaminarConfig(shards=1, buffer_size=4096)
    conns = [laminardb.open(":memory:", config=cfg) for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            assert c.shard_count == 1
            c.execute("CREATE SOURCE t (a BIGINT)")
            c.insert("t", {"a": [i] * (i + 1)})
        for i, c in enumerate(conns):
            assert c.query("SELECT COUNT(*), SUM(a) FROM t").fetchall() == [(i + 1, i * (i + 1))]
    finally:
        for c in conns:
            c.close()
    # the config object itself is unchanged
    assert cfg.shards == 1 and cfg.buffer_size == 4096


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shards_config_sets_shard_count(n):
    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=n))
    try:
        assert conn.shard_count == n
        conn.execute("CREATE SOURCE t (a BIGINT)")
        conn.insert("t", {"a": list(range(1000))})
        st = conn.stats("t")
        assert len(st["rows_per_shard"]) == n
        assert sum(st["rows_per_shard"]) == 1000
    finally:
        conn.close()


# --------------------------------------------------------------------------- context managers


def test_context_manager_closes():
    with laminardb.open(":memory:") as conn:
        assert conn.is_closed is False
        conn.execute("CREATE SOURCE events (ts TIMESTAMP, value DOUBLE)")
        conn.insert("events", {"ts": 1, "value": 42.0})
        assert conn.query("SELECT value FROM events").fetchall() == [(42.0,)]
    assert conn.is_closed is True
    assert repr(conn) == "Connection(closed)"


def test_context_manager_enter_returns_same_object():
    conn = laminardb.open(":memory:")
    with conn as entered:
        assert entered is conn
    assert conn.is_closed


def test_context_manager_closes_on_exception_and_propagates():
    with pytest.raises(KeyError):
        with laminardb.open(":memory:") as conn:
            raise KeyError("boom")
    assert conn.is_closed is True


async def test_async_context_manager_closes():
    async with laminardb.open(":memory:") as conn:
        assert conn.is_closed is False
        conn.execute("CREATE SOURCE events (ts TIMESTAMP, value DOUBLE)")
        conn.insert("events", {"ts": 1, "value": 42.0})
        conn.insert("events", [{"ts": 2, "value": 1.5}])
        assert conn.query("SELECT COUNT(*), SUM(value) FROM events").fetchall() == [(2, 43.5)]
    assert conn.is_closed is True
    assert repr(conn) == "Connection(closed)"


async def test_async_context_manager_closes_on_exception():
    with pytest.raises(ValueError):
        async with laminardb.open(":memory:") as conn:
            raise ValueError("boom")
    assert conn.is_closed is True


# --------------------------------------------------------------------------- closed connection


CLOSED_CALLS = {
    "start": lambda c: c.start(),
    "shutdown": lambda c: c.shutdown(),
    "checkpoint": lambda c: c.checkpoint(),
    "create_table": lambda c: c.create_table("x", {"a": "int64"}),
    "schema": lambda c: c.schema("t"),
    "list_tables": lambda c: c.list_tables(),
    "tables": lambda c: c.tables(),
    "list_streams": lambda c: c.list_streams(),
    "materialized_views": lambda c: c.materialized_views(),
    "list_sinks": lambda c: c.list_sinks(),
    "sources": lambda c: c.sources(),
    "sinks": lambda c: c.sinks(),
    "streams": lambda c: c.streams(),
    "queries": lambda c: c.queries(),
    "cancel_query": lambda c: c.cancel_query(1),
    "insert": lambda c: c.insert("t", {"a": 1}),
    "insert_json": lambda c: c.insert_json("t", '{"a": 1}'),
    "insert_csv": lambda c: c.insert_csv("t", "a\n1"),
    "writer": lambda c: c.writer("t"),
    "query": lambda c: c.query("SELECT 1"),
    "sql": lambda c: c.sql("SELECT 1"),
    "execute": lambda c: c.execute("SELECT 1"),
    "query_stream": lambda c: c.query_stream("t"),
    "stream": lambda c: c.stream("SELECT 1"),
    "explain": lambda c: c.explain("SELECT 1"),
    "stats": lambda c: c.stats("t"),
    "pipeline_watermark": lambda c: c.pipeline_watermark,
    "source_count": lambda c: c.source_count,
    "sink_count": lambda c: c.sink_count,
}


@pytest.mark.parametrize("op", sorted(CLOSED_CALLS))
def test_operations_on_closed_connection_raise_connection_error(op):
    conn = laminardb.open(":memory:")
    conn.execute("CREATE SOURCE t (a BIGINT)")
    conn.close()
    with pytest.raises(laminardb.ConnectionError) as ei:
        CLOSED_CALLS[op](conn)
    assert ei.value.code == codes.CONNECTION_CLOSED == 101
    assert str(ei.value) == "Connection closed (101): the connection is closed"


@pytest.mark.parametrize(
    "prop",
    [
        "pipeline_state",
        "total_events_processed",
        "active_query_count",
    ],
)
def test_runtime_properties_on_closed_connection_raise(prop):
    conn = laminardb.open(":memory:")
    conn.execute("CREATE SOURCE t (a BIGINT)")
    conn.insert("t", {"a": [1, 2, 3]})
    conn.stream("SELECT a FROM t")  # one query still active when the connection closes
    conn.close()
    with pytest.raises(laminardb.ConnectionError) as ei:
        getattr(conn, prop)
    assert ei.value.code == 101


def test_closed_connection_keeps_materialized_results():
    conn = laminardb.open(":memory:")
    conn.execute("CREATE SOURCE t (a BIGINT)")
    conn.insert("t", {"a": [1, 2, 3]})
    result = conn.query("SELECT a FROM t ORDER BY a")
    conn.close()
    assert result.fetchall() == [(1,), (2,), (3,)]
    assert result.to_arrow().column("a").to_pylist() == [1, 2, 3]


def test_writer_of_closed_connection_raises_connection_error():
    conn = laminardb.open(":memory:")
    conn.execute("CREATE SOURCE t (a BIGINT)")
    w = conn.writer("t")
    conn.close()
    with pytest.raises(laminardb.ConnectionError) as ei:
        w.insert({"a": 1})
    assert ei.value.code == 101


# --------------------------------------------------------------------------- module-level default


def test_module_level_sql_and_execute_use_default_connection():
    name = "logs_" + uuid.uuid4().hex[:8]
    er = laminardb.execute(f"CREATE SOURCE {name} (msg VARCHAR)")
    assert isinstance(er, laminardb.ExecuteResult)
    assert er.result_type == "ddl"
    assert er.ddl_type == "CREATE SOURCE"
    assert er.ddl_object == name
    assert int(laminardb.execute(f"INSERT INTO {name} VALUES ('a'), ('b'), ('c')")) == 3
    res = laminardb.sql(f"SELECT msg FROM {name} ORDER BY msg")
    assert isinstance(res, laminardb.QueryResult)
    assert res.fetchall() == [("a",), ("b",), ("c",)]
    # params are forwarded
    assert laminardb.sql(f"SELECT msg FROM {name} WHERE msg = $1", ["b"]).fetchall() == [("b",)]
    assert laminardb.execute(f"SELECT COUNT(*) FROM {name}").to_query_result().fetchall() == [(3,)]


def test_module_level_default_is_in_memory_and_shared():
    name = "shared_" + uuid.uuid4().hex[:8]
    laminardb.execute(f"CREATE SOURCE {name} (x BIGINT)")
    laminardb.execute(f"INSERT INTO {name} VALUES (7)")
    # a second call sees the state created by the first one
    assert laminardb.sql(f"SELECT x FROM {name}").fetchall() == [(7,)]
    # an explicitly opened connection does not
    with laminardb.open(":memory:") as conn:
        with pytest.raises(laminardb.QueryError):
            conn.query(f"SELECT x FROM {name}")


# --------------------------------------------------------------------------- pipeline


def test_pipeline_state_transitions(db):
    assert db.pipeline_state == "Created"
    db.start()
    assert db.pipeline_state == "Running"
    db.shutdown()
    assert db.pipeline_state == "Stopped"


def test_fresh_connection_counters(db):
    assert db.pipeline_watermark == I64_MIN
    assert db.total_events_processed == 0
    assert db.source_count == 0
    assert db.sink_count == 0
    assert db.active_query_count == 0
    assert isinstance(db.pipeline_watermark, int)


def test_total_events_processed_counts_inserted_rows(db):
    db.execute("CREATE SOURCE a (x BIGINT)")
    db.execute("CREATE SOURCE b (x BIGINT)")
    db.insert("a", {"x": list(range(10))})
    assert db.total_events_processed == 10
    db.insert("b", [{"x": 1}, {"x": 2}])
    assert db.total_events_processed == 12
    db.execute("INSERT INTO a VALUES (1), (2), (3)")
    assert db.total_events_processed == 15
    # a rejected insert does not count
    with pytest.raises(laminardb.IngestionError):
        db.insert("a", {"x": ["not a number"]})
    assert db.total_events_processed == 15
    db.start()
    db.insert("a", {"x": [1]})
    assert db.total_events_processed == 16


def test_source_and_sink_counts(db):
    db.execute("CREATE SOURCE a (x BIGINT)")
    db.create_table("b", {"x": "int64"})
    assert db.source_count == 2
    db.execute("DROP SOURCE a")
    assert db.source_count == 1
    assert db.sink_count == 0


def test_pipeline_watermark_is_min_over_sources_with_watermarks(db):
    db.execute("CREATE SOURCE e (ts BIGINT, v DOUBLE)")
    db.execute("CREATE SOURCE f (ts BIGINT, v DOUBLE)")
    assert db.pipeline_watermark == I64_MIN
    we = db.writer("e")
    we.watermark(100)
    assert db.pipeline_watermark == 100
    wf = db.writer("f")
    wf.watermark(30)
    assert db.pipeline_watermark == 30
    wf.watermark(300)
    assert db.pipeline_watermark == 100
    # watermarks never go back
    we.watermark(50)
    assert db.pipeline_watermark == 100


def test_checkpointing_disabled(db):
    assert db.is_checkpoint_enabled is False
    with pytest.raises(laminardb.CheckpointError) as ei:
        db.checkpoint()
    assert isinstance(ei.value, laminardb.LaminarError)
    assert isinstance(ei.value.code, int)
    assert "checkpoint" in str(ei.value).lower()


def test_checkpointing_enabled_by_the_interval(tmp_path):
    cfg = laminardb.LaminarConfig(storage_dir=str(tmp_path), checkpoint_interval_ms=5000)
    with laminardb.open(str(tmp_path / "db"), config=cfg) as conn:
        assert conn.is_checkpoint_enabled is True
        first = conn.checkpoint()
        assert isinstance(first, int) and conn.checkpoint() == first + 1
    # A path without the interval: durable (WAL), but no checkpoints on demand.
    with laminardb.open(str(tmp_path / "other")) as conn:
        assert conn.is_checkpoint_enabled is False
        with pytest.raises(laminardb.CheckpointError):
            conn.checkpoint()


def test_checkpoints_on_an_in_memory_database_use_a_temporary_directory():
    cfg = laminardb.LaminarConfig(checkpoint_interval_ms=60_000)
    with laminardb.open(":memory:", config=cfg) as conn:
        conn.execute("CREATE SOURCE t (id BIGINT)")
        conn.insert("t", {"id": [1, 2, 3]})
        assert conn.checkpoint() >= 1
        assert conn.metrics().last_checkpoint_bytes > 0


def test_shutdown_drains_in_flight_events(db):
    db.execute("CREATE SOURCE t (id BIGINT, v DOUBLE)")
    db.start()
    with db.writer("t") as w:
        for i in range(100):
            w.insert({"id": list(range(i * 100, i * 100 + 100)), "v": [1.0] * 100})
    db.insert("t", pa.record_batch({"id": [10_000], "v": [0.5]}))
    db.shutdown()
    assert db.pipeline_state == "Stopped"
    assert db.total_events_processed == 10_001
    assert db.query("SELECT COUNT(*), SUM(id), SUM(v) FROM t").fetchall() == [
        (10_001, sum(range(10_000)) + 10_000, 10_000.5)
    ]
    assert count(db, "t") == 10_001
