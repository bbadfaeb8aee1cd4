"""F-PY-018 / F-PY-027 / F-PY-028 with streams: CREATE SINK (framework), pipeline lifecycle
(start, shutdown, close, pipeline_state), topology, queries()/cancel_query(), and metrics
whose counters count rows."""

from __future__ import annotations

import re
import sys
import time
import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import call_with_timeout, drain, setup

SOURCE = "CREATE SOURCE t (ts BIGINT, sym VARCHAR, px DOUBLE)"
T_SCHEMA = pa.schema([("ts", pa.int64()), ("sym", pa.string()), ("px", pa.float64())])


def put(db, *rows, table="t"):
    """Insert (ts, sym, px) tuples as one insert."""
    db.insert(table, [{"ts": t, "sym": s, "px": p} for t, s, p in rows])


# --------------------------------------------------------------------------- CREATE SINK


def test_create_sink_from_stream(db):
    db.execute(SOURCE)
    db.execute("CREATE STREAM hi AS SELECT ts, sym, px FROM t WHERE px > 100")
    assert db.sink_count == 0
    er = db.execute("CREATE SINK out FROM hi")
    assert isinstance(er, laminardb.ExecuteResult)
    assert er.result_type == "ddl"
    assert er.ddl_type == "CREATE SINK"
    assert er.ddl_object == "out"
    assert db.list_sinks() == ["out"]
    sinks = db.sinks()
    assert len(sinks) == 1 and isinstance(sinks[0], laminardb.SinkInfo)
    assert sinks[0].name == "out"
    assert db.sink_count == 1
    assert db.metrics().sink_count == 1
    # a sink is neither a stream nor a source
    assert db.list_streams() == ["hi"]
    assert db.list_tables() == ["t"]


def test_create_sink_as_select_with_connector(db):
    db.execute(SOURCE)
    er = db.execute(
        "CREATE SINK alerts AS SELECT sym, px, ts FROM t WHERE px > 1000.0 "
        "WITH (connector = 'blackhole', 'note' = 'counts rows only')"
    )
    assert er.result_type == "ddl"
    assert er.ddl_type == "CREATE SINK"
    assert er.ddl_object == "alerts"
    assert db.list_sinks() == ["alerts"]
    assert [s.name for s in db.sinks()] == ["alerts"]
    assert db.sink_count == 1
    topo = db.topology()
    nodes = {n.name: n for n in topo.nodes}
    assert nodes["alerts"].node_type == "sink"
    assert {(e.from_node, e.to_node) for e in topo.edges} == {("t", "alerts")}


@pytest.mark.parametrize(
    "ddl,named",
    [
        ("CREATE SINK bad AS SELECT * FROM t WITH (connector = 'no_such_connector')", "no_such_connector"),
        ("CREATE SINK bad FROM hi WITH (connector = 'no_such_connector')", "no_such_connector"),
        ("CREATE SINK bad FROM hi WITH (connector = 'kafka', 'topic' = 'x')", "kafka"),
    ],
)
def test_unknown_connector_raises_connector_error(db, ddl, named):
    """Unknown connectors, and the spec's connectors not built yet (kafka), are refused."""
    db.execute(SOURCE)
    db.execute("CREATE STREAM hi AS SELECT ts, sym FROM t")
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(ddl)
    assert isinstance(ei.value, laminardb.LaminarError)
    assert isinstance(ei.value.code, int)
    assert named in str(ei.value)
    assert db.list_sinks() == []
    assert db.sink_count == 0


def test_sink_from_unknown_stream_raises(db):
    with pytest.raises(laminardb.LaminarError) as ei:
        db.execute("CREATE SINK out FROM nope")
    assert "nope" in str(ei.value)
    assert db.list_sinks() == []


def test_duplicate_sink_name_raises_table_exists(db):
    db.execute(SOURCE)
    db.execute("CREATE STREAM hi AS SELECT ts, sym FROM t")
    db.execute("CREATE SINK out FROM hi")
    with pytest.raises(laminardb.SchemaError) as ei:
        db.execute("CREATE SINK out FROM hi")
    assert ei.value.code == codes.TABLE_EXISTS == 201
    assert db.list_sinks() == ["out"]


def test_drop_sink(db):
    db.execute(SOURCE)
    db.execute("CREATE STREAM hi AS SELECT ts, sym FROM t")
    db.execute("CREATE SINK out FROM hi")
    er = db.execute("DROP SINK out")
    assert (er.result_type, er.ddl_type, er.ddl_object) == ("ddl", "DROP SINK", "out")
    assert db.list_sinks() == []
    assert db.sink_count == 0
    assert db.list_streams() == ["hi"]  # the stream stays


def test_sink_keeps_running_and_does_not_disturb_its_stream(db):
    setup(db, SOURCE, "CREATE STREAM hi AS SELECT ts, sym, px FROM t WHERE px > 100", "CREATE SINK out FROM hi")
    sub = db.subscribe_stream("hi")
    put(db, (1, "A", 150.0), (2, "B", 50.0))
    assert sorted(r for b in drain(sub) for r in b.fetchall()) == [(1, "A", 150.0)]
    assert db.query("SELECT ts, sym, px FROM hi").fetchall() == [(1, "A", 150.0)]


# --------------------------------------------------------------------------- lifecycle


def test_pipeline_state_transitions_with_streams(db):
    db.execute(SOURCE)
    db.execute("CREATE STREAM hi AS SELECT ts, sym FROM t WHERE px > 100")
    assert db.pipeline_state == "Created"
    assert db.metrics().state == "Created"
    assert db.start() is None
    assert db.pipeline_state == "Running"
    assert db.metrics().state == "Running"
    put(db, (1, "A", 150.0))
    assert db.shutdown() is None
    assert db.pipeline_state == "Stopped"
    assert db.metrics().state == "Stopped"
    # the stream's state survives shutdown
    assert db.query("SELECT ts, sym FROM hi").fetchall() == [(1, "A")]
    db.close()
    assert db.is_closed is True
    with pytest.raises(laminardb.ConnectionError):
        db.start()


def test_stream_created_after_start_runs(db):
    db.execute(SOURCE)
    db.start()
    db.execute("CREATE STREAM late AS SELECT sym, SUM(px) AS total FROM t GROUP BY sym")
    sub = db.subscribe_stream("late")
    put(db, (1, "A", 1.0), (2, "A", 2.0))
    assert drain(sub)
    assert db.query("SELECT sym, total FROM late").fetchall() == [("A", 3.0)]


def test_shutdown_drains_every_insert_through_streams(db):
    setup(db, SOURCE, "CREATE STREAM s AS SELECT sym, COUNT(*) AS n, SUM(ts) AS sum_ts FROM t GROUP BY sym")
    with db.writer("t") as w:
        for i in range(100):
            w.insert({"ts": list(range(i * 10, i * 10 + 10)), "sym": ["A"] * 5 + ["B"] * 5, "px": [1.0] * 10})
    db.shutdown()
    assert db.pipeline_state == "Stopped"
    a = sum(i * 10 + j for i in range(100) for j in range(5))
    b = sum(i * 10 + j for i in range(100) for j in range(5, 10))
    assert db.query("SELECT sym, n, sum_ts FROM s ORDER BY sym").fetchall() == [("A", 500, a), ("B", 500, b)]


def test_close_while_subscribed_does_not_hang(db):
    setup(db, SOURCE, "CREATE STREAM hi AS SELECT ts, sym FROM t")
    sub = db.subscribe_stream("hi")
    ssub = db.subscribe("SELECT ts FROM t")
    db.close()
    for s in (sub, ssub):
        try:
            call_with_timeout(lambda: list(s))
        except laminardb.LaminarError:
            pass
        assert s.is_active is False


# --------------------------------------------------------------------------- topology


def test_topology_nodes_and_edges(db):
    db.execute(SOURCE)
    db.execute("CREATE SOURCE unused (k BIGINT)")
    db.execute("CREATE STREAM hi AS SELECT ts, sym, px FROM t WHERE px > 100")
    db.execute("CREATE STREAM agg AS SELECT sym, COUNT(*) AS n FROM hi GROUP BY sym")
    db.execute("CREATE SINK out FROM agg")
    topo = db.topology()
    assert isinstance(topo, laminardb.PipelineTopology)
    assert all(isinstance(n, laminardb.PipelineNode) for n in topo.nodes)
    assert all(isinstance(e, laminardb.PipelineEdge) for e in topo.edges)
    nodes = {n.name: n for n in topo.nodes}
    assert sorted(nodes) == ["agg", "hi", "out", "t", "unused"]
    assert {name: n.node_type for name, n in nodes.items()} == {
        "t": "source",
        "unused": "source",
        "hi": "stream",
        "agg": "stream",
        "out": "sink",
    }
    assert nodes["t"].schema == T_SCHEMA
    assert nodes["unused"].schema == pa.schema([("k", pa.int64())])
    assert nodes["t"].sql is None
    assert "select" in nodes["hi"].sql.lower() and "px > 100" in nodes["hi"].sql
    assert "group by" in nodes["agg"].sql.lower()
    for name in ("hi", "agg"):
        if nodes[name].schema is not None:
            assert nodes[name].schema.names[:2] == db.schema(name).names[:2]
    assert sorted((e.from_node, e.to_node) for e in topo.edges) == [("agg", "out"), ("hi", "agg"), ("t", "hi")]
    # unchanged by start()
    db.start()
    assert sorted((e.from_node, e.to_node) for e in db.topology().edges) == [("agg", "out"), ("hi", "agg"), ("t", "hi")]


def test_topology_drops_removed_objects(db):
    db.execute(SOURCE)
    db.execute("CREATE STREAM hi AS SELECT ts FROM t")
    db.execute("CREATE SINK out FROM hi")
    db.execute("DROP SINK out")
    topo = db.topology()
    assert sorted(n.name for n in topo.nodes) == ["hi", "t"]
    assert [(e.from_node, e.to_node) for e in topo.edges] == [("t", "hi")]


# --------------------------------------------------------------------------- queries


def test_queries_lists_a_subscription_and_cancel_query_stops_it(db):
    setup(db, SOURCE)
    sql = "SELECT ts, sym FROM t WHERE px > 100"
    before = db.active_query_count
    sub = db.subscribe(sql)
    matching = [q for q in db.queries() if q.sql.strip() == sql]
    assert len(matching) == 1
    info = matching[0]
    assert isinstance(info, laminardb.QueryInfo)
    assert isinstance(info.id, int)
    assert info.active is True
    assert db.active_query_count == before + 1

    assert db.cancel_query(info.id) is None
    assert sub.is_active is False
    assert {q.id: q for q in db.queries()}[info.id].active is False
    assert db.active_query_count == before
    put(db, (1, "A", 150.0))
    try:
        assert sub.try_next() is None
    except laminardb.QueryError as exc:
        assert exc.code == codes.QUERY_CANCELLED
    # other subscriptions are unaffected
    other = db.subscribe(sql)
    put(db, (2, "B", 200.0))
    assert [r for b in drain(other) for r in b.fetchall()] == [(2, "B")]


def test_cancel_unknown_query_raises(db):
    with pytest.raises(laminardb.QueryError) as ei:
        db.cancel_query(987_654)
    assert "987654" in str(ei.value)


# --------------------------------------------------------------------------- metrics


def test_metrics_snapshot_shapes(db):
    setup(db, SOURCE, "CREATE STREAM pass AS SELECT ts, sym, px FROM t", "CREATE SINK out FROM pass")
    put(db, (1, "A", 1.0), (2, "B", 2.0))
    m = db.metrics()
    assert isinstance(m, laminardb.PipelineMetrics)
    assert m.state == "Running"
    assert (m.source_count, m.stream_count, m.sink_count) == (1, 1, 1)
    assert m.total_events_ingested == 2
    assert m.total_events_dropped == 0
    assert isinstance(m.total_cycles, int) and m.total_cycles >= 0
    assert isinstance(m.total_batches, int) and m.total_batches >= 1
    assert isinstance(m.uptime_secs, float) and m.uptime_secs >= 0.0
    assert m.pipeline_watermark == db.pipeline_watermark
    with pytest.raises(AttributeError):
        m.state = "x"  # frozen snapshot

    sm = db.source_metrics("t")
    assert isinstance(sm, laminardb.SourceMetrics)
    assert sm.name == "t"
    assert sm.total_events == 2
    assert sm.capacity > 0
    assert 0 <= sm.pending <= sm.capacity
    assert sm.is_backpressured is False
    assert 0.0 <= sm.utilization <= 1.0
    assert isinstance(sm.watermark, int)
    assert db.source_metrics("nope") is None

    st = db.stream_metrics("pass")
    assert isinstance(st, laminardb.StreamMetrics)
    assert st.name == "pass"
    assert st.total_events == 2
    assert "select" in st.sql.lower()
    assert st.capacity > 0 and 0 <= st.pending <= st.capacity
    assert st.is_backpressured is False
    assert isinstance(st.watermark, int)
    assert db.stream_metrics("nope") is None

    assert [s.name for s in db.all_source_metrics()] == ["t"]
    assert [s.name for s in db.all_stream_metrics()] == ["pass"]
    assert len(db.all_source_metrics()) == db.source_count == m.source_count


def test_counters_count_rows(shard_db):
    db = shard_db
    setup(
        db,
        SOURCE,
        "CREATE SOURCE u (ts BIGINT, sym VARCHAR, px DOUBLE)",
        "CREATE STREAM pass_t AS SELECT ts, sym, px FROM t",
        "CREATE STREAM pass_u AS SELECT ts, sym FROM u",
        "CREATE SINK out FROM pass_t",
    )
    emitted0 = db.metrics().total_events_emitted
    put(db, (1, "A", 1.0), (2, "B", 1.0), (3, "C", 1.0))
    put(db, (4, "A", 1.0))
    put(db, *[(10 + i, f"K{i}", 1.0) for i in range(3)])
    put(db, (1, "X", 1.0), (2, "Y", 1.0), table="u")
    assert db.source_metrics("t").total_events == 7
    assert db.source_metrics("u").total_events == 2
    assert db.stream_metrics("pass_t").total_events == 7
    assert db.stream_metrics("pass_u").total_events == 2
    m = db.metrics()
    assert m.total_events_ingested == 9
    assert db.total_events_processed == 9
    assert m.total_events_emitted - emitted0 >= 7  # the sink received every row of pass_t
    assert m.total_events_dropped == 0
    assert {s.name: s.total_events for s in db.all_source_metrics()} == {"t": 7, "u": 2}
    assert {s.name: s.total_events for s in db.all_stream_metrics()} == {"pass_t": 7, "pass_u": 2}


def test_metrics_wrapper(db):
    setup(db, SOURCE)
    put(db, *[(i, "A", 1.0) for i in range(10)])
    pm = db.metrics()
    m = laminardb.Metrics(pm)
    assert m.state == "Running"
    assert m.uptime_secs == pm.uptime_secs
    assert isinstance(m.events_per_second, float)
    if pm.uptime_secs > 0:
        assert m.events_per_second == pytest.approx(pm.total_events_ingested / pm.uptime_secs)
        assert m.events_per_second > 0


def test_metrics_wrapper_repr_and_checkpoint_status(db):
    setup(db, SOURCE)
    m = laminardb.Metrics(db.metrics())
    assert re.fullmatch(r"Metrics\(state='Running', eps=\d+\.\d, uptime=\d+\.\ds\)", repr(m)), repr(m)
    status = laminardb.CheckpointStatus(checkpoint_id=42, enabled=True)
    assert repr(status) == "CheckpointStatus(checkpoint_id=42, enabled=True)"
    assert (status.checkpoint_id, status.enabled) == (42, True)
    with pytest.raises(AttributeError):
        status.enabled = False  # type: ignore[misc]


def test_change_rows_take_the_op_first_and_schemas_give_their_arrow_schema(db):
    row = laminardb.ChangeRow("Insert", {"a": 1})
    assert (row.op, row["a"], row.to_dict()) == ("Insert", 1, {"a": 1})
    db.execute("CREATE SOURCE s (a BIGINT, b VARCHAR)")
    schema = laminardb.Schema(db.schema("s"))
    assert schema.arrow_schema is schema.arrow and schema.arrow_schema.names == ["a", "b"]


def test_surface_reprs_and_closed_objects(tmp_path, monkeypatch):
    db = laminardb.open(str(tmp_path / "db"), config=laminardb.LaminarConfig(checkpoint_interval_ms=3_600_000))
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    result = db.checkpoint()
    assert isinstance(result, int) and isinstance(result, laminardb.CheckpointResult)
    assert repr(result) == f"CheckpointResult(checkpoint_id={int(result)})" and result.checkpoint_id == int(result)
    assert db.checkpoint() == result + 1
    w = db.writer("trades")
    assert repr(w) == "Writer(source='trades', open)" and w.name == "trades"
    w.close()
    assert repr(w) == "Writer(closed)"
    with pytest.raises(laminardb.IngestionError):
        w.name
    with pytest.raises(laminardb.IngestionError):
        w.schema
    assert [repr(n) for n in db.topology().nodes] == ["PipelineNode(name='trades', type='source')"]
    with pytest.raises(laminardb.QueryError, match="query 12345 not found"):
        db.cancel_query(12345)
    res = db.query("SELECT 1 AS x")
    assert "<table" in res._repr_html_()
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas cannot be imported
    assert res._repr_html_() == "<pre>QueryResult(rows=1, columns=1)</pre>"
    db.close()
    with pytest.raises(laminardb.ConnectionError):
        db.is_checkpoint_enabled


def test_metrics_in_the_prometheus_format_and_served_over_http(tmp_path):
    import socket
    import urllib.request

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    config = laminardb.LaminarConfig(shards=2, metrics_port=port)
    assert config.metrics_port == port and f"metrics_port={port}" in repr(config)
    db = laminardb.open(":memory:", config=config)
    db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE)")
    db.execute("CREATE STREAM dear AS SELECT symbol, price FROM trades WHERE price > 10")
    db.execute(f"CREATE SINK out FROM dear WITH (connector = 'files', path = '{tmp_path}', format = 'csv')")
    sub = db.subscribe_stream("dear")
    db.insert("trades", [{"symbol": "A", "price": 11.0}, {"symbol": "B", "price": 1.0}, {"symbol": "C", "price": 20.0}])
    text = db.metrics_text()
    assert "# TYPE laminardb_source_events_total counter" in text
    assert 'laminardb_source_events_total{source="trades"} 3.0' in text
    assert 'laminardb_stream_events_total{stream="dear"} 2.0' in text
    assert 'laminardb_sink_events_total{sink="out",connector="files"} 2.0' in text
    assert '# TYPE laminardb_stream_latency_microseconds summary' in text
    assert re.search(r'laminardb_stream_latency_microseconds\{stream="dear",quantile="0.99"\} [0-9.e+]+', text)
    assert 'laminardb_stream_latency_microseconds_count{stream="dear"}' in text
    # Every sample line: a metric name, optional labels, a number.
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? -?[0-9.e+]+', line), line
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        served = answer.read().decode()
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'laminardb_source_events_total{source="trades"} 3.0' in served
    sub.cancel()
    db.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)
        except OSError:
            break  # the endpoint closed with the connection
        time.sleep(0.1)
    else:
        raise AssertionError("the metrics endpoint outlived its connection")


def test_a_streams_schema_shows_the_change_column_only_when_its_sql_asked_for_changes(db):
    db.execute("CREATE SOURCE t (k VARCHAR, v BIGINT)")
    db.execute("CREATE STREAM totals AS SELECT k, SUM(v) AS total FROM t GROUP BY k")
    db.execute("CREATE STREAM changes AS SELECT k, SUM(v) AS total FROM t GROUP BY k EMIT CHANGES")
    db.execute("CREATE MATERIALIZED VIEW counts AS SELECT k, COUNT(*) AS n FROM t GROUP BY k")
    assert db.schema("totals").names == ["k", "total"]
    assert db.schema("changes").names == ["k", "total", "_op"]
    view = laminardb.mv(db, "counts")
    assert view.sql == "CREATE MATERIALIZED VIEW counts AS SELECT k, COUNT(*) AS n FROM t GROUP BY k"
    assert view.schema().arrow_schema.names == ["k", "n"]
    db.insert("t", [{"k": "a", "v": 2}, {"k": "a", "v": 3}])
    # What the schema says is what a query of the stream returns.
    assert db.query("SELECT * FROM totals").to_dicts() == {"k": ["a"], "total": [5]}
    assert view.query().to_dicts() == {"k": ["a"], "n": [2]}
