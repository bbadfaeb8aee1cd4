"""No crash, no silent loss: inputs that used to kill the process or lose rows silently.

Each case that once killed the interpreter runs in a child process, so a regression fails
this test instead of taking pytest down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import laminardb

TS = 1_700_000_000_000


def run_child(body: str, timeout: float = 240) -> dict:
    """Runs `body` in a fresh interpreter; it fills `out` (a dict), printed as JSON."""
    script = textwrap.dedent(
        """
        import json, laminardb
        out = {}
        def attempt(key, fn):
            try:
                out[key] = ["ok", fn()]
            except laminardb.LaminarError as e:
                out[key] = [type(e).__name__, e.code, str(e)]
        db = laminardb.open(":memory:")
        db.execute("CREATE SOURCE t (ts TIMESTAMP(3), a BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)")
        db.insert("t", {"ts": %d, "a": 1})
        """
        % TS
    ) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_deep_statements_run_or_are_refused_never_crash():
    out = run_child(
        """
        plus = "+".join(["a"] * 300)
        ors = " OR ".join(f"a = {i}" for i in range(2000))
        unions = " UNION ALL ".join(["SELECT a FROM t"] * 2000)
        attempt("plus_query", lambda: db.query(f"SELECT {plus} AS x FROM t").to_dicts()["x"])
        def plus_stream():
            db.execute(f"CREATE STREAM p AS SELECT {plus} AS x FROM t")
            db.insert("t", {"ts": %d, "a": 2})
            return db.query("SELECT x FROM p").to_dicts()["x"]
        attempt("plus_stream", plus_stream)
        attempt("or_query", lambda: db.query(f"SELECT a FROM t WHERE {ors}").to_dicts())
        attempt("or_stream", lambda: db.execute(f"CREATE STREAM o AS SELECT a FROM t WHERE {ors}"))
        attempt("union_query", lambda: db.query(unions).to_dicts())
        attempt("union_stream", lambda: db.execute(f"CREATE STREAM u AS {unions}"))
        attempt("in_list", lambda: db.query(f"SELECT a FROM t WHERE a IN ({', '.join(map(str, range(5000)))})").to_dicts()["a"])
        attempt("after", lambda: db.query("SELECT COUNT(*) AS n FROM t").to_dicts()["n"])
        """
        % (TS + 1)
    )
    assert out["plus_query"] == ["ok", [300]]
    # The stream starts from the row already in `t` (backfill), then takes the new one.
    assert sorted(out["plus_stream"][1]) == [300, 600] and out["plus_stream"][0] == "ok"
    for key in ("or_query", "or_stream", "union_query", "union_stream"):
        kind, code, message = out[key]
        assert (kind, code) == ("QueryError", laminardb.codes.SQL_PARSE_ERROR), out[key]
        assert "nests too deeply" in message and "at most 1000" in message, message
    # Wide but shallow statements are not refused.
    assert out["in_list"] == ["ok", [1, 2]]
    assert out["after"] == ["ok", [2]]


def test_nul_characters_in_names_are_refused_and_in_values_kept():
    out = run_child(
        """
        attempt("alias", lambda: db.query('SELECT 1 AS "a\\x00b"').to_arrow().num_rows)
        attempt("unnamed", lambda: db.query("SELECT 'a\\x00b'").to_arrow().num_rows)
        attempt("value", lambda: db.query("SELECT 'a\\x00b' AS v").to_arrow().column(0).to_pylist())
        attempt("column", lambda: db.execute('CREATE SOURCE c ("a\\x00b" BIGINT)'))
        attempt("source", lambda: db.execute('CREATE SOURCE "s\\x00x" (a BIGINT)'))
        attempt("stream", lambda: db.execute('CREATE STREAM s AS SELECT a AS "x\\x00" FROM t'))
        attempt("empty", lambda: db.execute('CREATE SOURCE "" (a BIGINT)'))
        attempt("sources", lambda: [s.name for s in db.sources()])
        """
    )
    assert out["alias"][:2] == ["QueryError", laminardb.codes.QUERY_FAILED] and "NUL" in out["alias"][2]
    assert out["unnamed"][:2] == ["QueryError", laminardb.codes.QUERY_FAILED]
    assert out["value"] == ["ok", ["a\x00b"]]
    for key in ("column", "source", "stream", "empty"):
        assert out[key][:2] == ["SchemaError", laminardb.codes.INVALID_SCHEMA], out[key]
    assert out["sources"] == ["ok", ["t"]]


@pytest.mark.parametrize(
    "window",
    ["HOP(ts, INTERVAL '1' MILLISECOND, INTERVAL '10' DAY)", "CUMULATE(ts, INTERVAL '1' MILLISECOND, INTERVAL '1' DAY)"],
)
def test_a_window_giving_each_row_too_many_windows_is_refused(db, window):
    db.execute("CREATE SOURCE t (ts TIMESTAMP(3), a BIGINT, WATERMARK FOR ts AS ts)")
    db.insert("t", {"ts": TS, "a": 1})
    for attempt in (
        lambda: db.execute(f"CREATE STREAM h AS SELECT COUNT(*) AS c FROM t GROUP BY {window}"),
        lambda: db.query(f"SELECT COUNT(*) AS c FROM t GROUP BY {window}"),
    ):
        with pytest.raises(laminardb.QueryError) as e:
            attempt()
        assert "at most 10000 are supported" in str(e.value)
    # A hop within the cap runs: 1 s slides over 10 s, each row in 10 windows (the next
    # row's watermark closes them): the row already in `t` (backfill) and the next one.
    db.execute("CREATE STREAM ok AS SELECT COUNT(*) AS c FROM t GROUP BY HOP(ts, INTERVAL '1' SECOND, INTERVAL '10' SECOND)")
    db.insert("t", {"ts": TS + 60_000, "a": 2})
    db.insert("t", {"ts": TS + 200_000, "a": 3})
    assert sum(db.query("SELECT c FROM ok").to_dicts()["c"]) == 20


def test_a_failing_expression_rejects_only_its_rows(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (k VARCHAR, a BIGINT, s VARCHAR)")
    db.execute("CREATE STREAM q AS SELECT k, 100 / a AS d FROM t")
    db.execute("CREATE STREAM c AS SELECT k, CAST(s AS BIGINT) AS n FROM t WHERE k <> 'skip'")
    db.execute("CREATE STREAM g AS SELECT k, SUM(100 / a) AS total, COUNT(*) AS n FROM t GROUP BY k")
    sub = db.subscribe_stream("q")
    rows = [(1, "1"), (0, "2"), (4, "zz"), (5, "5"), (0, "x"), (10, "10")]
    db.insert("t", [{"k": "x", "a": a, "s": s} for a, s in rows])
    assert sorted(db.query("SELECT d FROM q").to_dicts()["d"]) == [10, 20, 25, 100]
    assert sorted(db.query("SELECT n FROM c").to_dicts()["n"]) == [1, 2, 5, 10]
    assert db.query("SELECT * FROM g").to_dicts() == {"k": ["x"], "total": [155], "n": [4]}
    delivered = []
    while (batch := sub.try_next()) is not None:
        delivered += batch.to_dicts()["d"]
    assert sorted(delivered) == [10, 20, 25, 100]
    q = db.stream_metrics("q")
    assert q.rejected_rows == 2 and "rejected" in q.last_error and "Divide by zero" in q.last_error
    c = db.stream_metrics("c")
    assert c.rejected_rows == 2 and "Cannot cast string" in c.last_error
    assert db.stream_metrics("g").rejected_rows == 2
    assert db.metrics().total_events_dropped == 6 == db.total_events_dropped
    # The source kept every row, and later good rows flow as before.
    assert db.query("SELECT COUNT(*) AS n FROM t").to_dicts()["n"] == [6]
    db.insert("t", {"k": "y", "a": 50, "s": "7"})
    assert sorted(db.query("SELECT d FROM q").to_dicts()["d"]) == [2, 10, 20, 25, 100]


# ------------------------------------------------------------ accepted, then ignored: refused


@pytest.mark.parametrize(
    "ddl",
    ["CREATE SOURCE d (a BIGINT, a BIGINT)", "CREATE SOURCE d (a BIGINT, A DOUBLE)", 'CREATE SOURCE "" (a BIGINT)'],
)
def test_sources_without_usable_names_are_refused(db, ddl):
    with pytest.raises(laminardb.SchemaError) as e:
        db.execute(ddl)
    assert e.value.code == laminardb.codes.INVALID_SCHEMA
    assert db.sources() == []


def test_tablesample_is_refused_not_ignored(db):
    db.execute("CREATE SOURCE t (a BIGINT)")
    db.insert("t", {"a": list(range(100))})
    for sql in (
        "SELECT * FROM t TABLESAMPLE BERNOULLI (10)",
        "SELECT * FROM t TABLESAMPLE (10 ROWS)",
        "CREATE STREAM s AS SELECT * FROM t TABLESAMPLE BERNOULLI (10)",
    ):
        with pytest.raises(laminardb.QueryError, match="TABLESAMPLE"):
            db.execute(sql)
    assert [s.name for s in db.streams()] == []


@pytest.mark.parametrize(
    "sql,needle",
    [
        ("CREATE STREAM e AS SELECT a FROM t EMIT ON WINDOW CLOSE", "need a window"),
        ("CREATE STREAM e AS SELECT a, COUNT(*) AS c FROM t GROUP BY a EMIT FINAL", "need a window"),
        (
            "CREATE STREAM e AS SELECT COUNT(*) AS c FROM t GROUP BY TUMBLE(ts, INTERVAL '1' SECOND) "
            "ALLOW LATENESS INTERVAL '-5' SECOND",
            "must not be negative",
        ),
        ("CREATE STREAM e AS SELECT a, COUNT(*) AS c FROM t GROUP BY a ALLOW LATENESS INTERVAL '5' SECOND", "needs a window"),
    ],
)
def test_emit_and_lateness_that_could_not_apply_are_refused(db, sql, needle):
    db.execute("CREATE SOURCE t (ts TIMESTAMP(3), a BIGINT, WATERMARK FOR ts AS ts)")
    with pytest.raises(laminardb.QueryError, match=needle):
        db.execute(sql)
    assert db.streams() == []


def test_csv_that_names_no_column_is_refused(db):
    db.execute("CREATE SOURCE t (ts BIGINT, a BIGINT)")
    for text in ("hello world", "\x01\x02garbage;;;\n", "x,y\n1,2\n"):
        with pytest.raises(laminardb.IngestionError) as e:
            db.insert_csv("t", text)
        assert e.value.code == laminardb.codes.BATCH_SCHEMA_MISMATCH
    # A header alone that names the columns is an empty insert.
    assert db.insert_csv("t", "ts,a\n") == 0
    assert db.insert_csv("t", "ts,a\n1,2\n") == 1
    assert db.query("SELECT * FROM t").to_dicts() == {"ts": [1], "a": [2]}


def test_after_shutdown_rows_are_refused_and_nothing_is_lost(db):
    db.execute("CREATE SOURCE t (ts BIGINT, a BIGINT)")
    db.execute("CREATE STREAM s AS SELECT a FROM t")
    db.start()
    db.insert("t", {"ts": 1, "a": 1})
    w = db.writer("t")
    db.shutdown()
    for attempt in (
        lambda: db.insert("t", {"ts": 2, "a": 2}),
        lambda: db.insert_json("t", '[{"ts": 3, "a": 3}]'),
        lambda: db.execute("INSERT INTO t VALUES (4, 4)"),
        lambda: w.insert({"ts": 5, "a": 5}),
        lambda: db.start(),
    ):
        with pytest.raises(laminardb.LaminarError) as e:
            attempt()
        assert e.value.code == laminardb.codes.SHUTDOWN, e.value
    assert db.query("SELECT a FROM t").to_dicts() == {"a": [1]}
    assert db.query("SELECT a FROM s").to_dicts() == {"a": [1]}


def test_a_row_far_ahead_of_the_clock_does_not_move_the_watermark(sharded_db):
    db = sharded_db
    db.execute("CREATE SOURCE t (ts TIMESTAMP(3), v BIGINT, WATERMARK FOR ts AS ts)")
    db.execute("CREATE STREAM bars AS SELECT COUNT(*) AS n, SUM(v) AS s FROM t GROUP BY TUMBLE(ts, INTERVAL '1' SECOND)")
    # A microsecond timestamp in a millisecond column: ~50,000 years ahead.
    db.insert("t", [{"ts": TS, "v": 1}, {"ts": TS * 1000, "v": 1000}])
    db.insert("t", {"ts": TS + 1500, "v": 2})
    db.insert("t", {"ts": TS + 3000, "v": 3})
    # Every later row still counts: the first two seconds' windows closed in order.
    assert db.query("SELECT n, s FROM bars ORDER BY s").fetchall() == [(1, 1), (1, 2)]
    assert db.source_metrics("t").future_events == 1
    assert db.source_metrics("t").watermark == TS + 3000
    assert db.total_events_dropped == 0
    assert db.query("SELECT COUNT(*) AS n FROM t").to_dicts()["n"] == [4]


def test_the_bound_on_future_event_times_can_be_lifted():
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(max_event_ahead_ms=None))
    try:
        db.execute("CREATE SOURCE t (ts BIGINT, WATERMARK FOR ts AS ts)")
        db.insert("t", {"ts": TS * 1000})
        assert db.source_metrics("t").watermark == TS * 1000
        assert db.source_metrics("t").future_events == 0
    finally:
        db.close()
    assert laminardb.LaminarConfig().max_event_ahead_ms == 86_400_000


def test_a_repeated_group_key_groups_once(sharded_db):
    """Found by sql_fuzz_harness.py (seed 1): `GROUP BY k, k` panicked in the planner (900)."""
    db = sharded_db
    db.execute("CREATE SOURCE g (ts BIGINT, k VARCHAR, WATERMARK FOR ts)")
    db.execute("CREATE STREAM a AS SELECT k, COUNT(*) AS n FROM g GROUP BY k, k")
    db.execute(
        "CREATE STREAM b AS SELECT k, window_start, COUNT(*) AS n FROM g GROUP BY k, k, TUMBLE(ts, INTERVAL '1' SECOND)"
    )
    db.insert("g", [{"ts": 10, "k": "x"}, {"ts": 20, "k": "x"}, {"ts": 30, "k": "y"}, {"ts": 5000, "k": "y"}])
    assert db.query("SELECT k, n FROM a ORDER BY k").fetchall() == [("x", 2), ("y", 2)]
    assert db.query("SELECT k, window_start, n FROM b ORDER BY k").fetchall() == [("x", 0, 2), ("y", 0, 1)]


@pytest.mark.parametrize(
    "case",
    [
        "db.insert_json('t', '{\"a\":' * 200000 + '1' + '}' * 200000)",
        "db.insert_json('t', '[' * 200000)",
        "db.insert_json('t', '[{\"a\": 1, \"s\": ' + '[' * 100000 + ']' * 100000 + '}]')",
        "x = []\nfor _ in range(100000): x = [x]\ndb.insert('t', {'a': [1], 's': [x]})",
        "x = {}\nfor _ in range(100000): x = {'k': x}\ndb.insert('t', [{'a': 1, 's': x}])",
    ],
    ids=["json-objects", "json-arrays", "json-value", "python-lists", "python-dicts"],
)
def test_deeply_nested_input_is_refused_not_fatal(case):
    body = (
        "db.execute('DROP SOURCE t')\n"
        "db.execute('CREATE SOURCE t (a BIGINT, s VARCHAR)')\n"
        "def go():\n" + textwrap.indent(case, "    ") + "\n"
        "attempt('insert', go)\n"
        "attempt('count', lambda: db.query('SELECT COUNT(*) AS n FROM t').to_dicts()['n'])\n"
    )
    out = run_child(body)
    assert out["insert"][:2] == ["IngestionError", laminardb.codes.BATCH_SCHEMA_MISMATCH], out["insert"]
    assert "deeper than" in out["insert"][2] or "recursion limit" in out["insert"][2]
    assert out["count"] == ["ok", [0]]


def test_nested_casts_are_refused_before_the_parser_backtracks(db):
    """Found by sql_fuzz_harness.py (seed 2): sqlparser's time doubles with each nested CAST
    it cannot parse; 375 unclosed ones hung the coordinator."""
    db.execute("CREATE SOURCE web (ts BIGINT, ms BIGINT)")
    for sql in (
        "SELECT " + "CAST ( " * 375 + "ms AS DOUBLE ) FROM web",
        "CREATE STREAM s AS SELECT " + "CAST ( " * 30 + "ms AS DOUBLE ) FROM web",
        "SELECT " + "ROW ( " * 20 + "ms" + " )" * 20 + " FROM web",
        "SELECT " + "(" * 40 + "ms" + ")" * 40 + " FROM web",
    ):
        with pytest.raises(laminardb.QueryError) as e:
            db.execute(sql)
        assert e.value.code == laminardb.codes.SQL_PARSE_ERROR
    db.insert("web", {"ts": 1, "ms": 2})
    nested = "SELECT " + "CAST(" * 10 + "ms" + " AS DOUBLE)" * 10 + " AS x FROM web"
    assert db.query(nested).to_dicts() == {"x": [2.0]}
