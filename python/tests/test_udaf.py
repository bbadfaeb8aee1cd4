"""Issue 23, item 2: Python aggregate functions (`@laminardb.udaf`, `register_udaf`) in
ad-hoc GROUP BY and in streams (windowed, unwindowed, sessions), exact against the same
numbers computed here; exceptions become errors naming the function."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import laminardb
from laminardb import codes

from conftest import poll_rows, records

STATE = pa.struct([("num", pa.float64()), ("den", pa.float64())])


@laminardb.udaf(return_type=pa.float64(), accumulator_type=STATE)
class Vwap:
    def __init__(self):
        self.num = 0.0
        self.den = 0.0

    def accumulate(self, price: pa.Array, qty: pa.Array) -> None:
        self.num += pc.sum(pc.multiply(price, qty)).as_py() or 0.0
        self.den += pc.sum(qty).as_py() or 0.0

    def merge(self, other: "Vwap") -> None:
        self.num += other.num
        self.den += other.den

    def evaluate(self):
        return self.num / self.den if self.den else None


@laminardb.udaf(return_type=pa.float64(), accumulator_type=pa.struct([("value", pa.float64())]))
class Ema:
    """Order-sensitive: the exponential moving average of the rows in arrival order."""

    alpha = 0.5

    def __init__(self):
        self.value = None

    def accumulate(self, values: pa.Array) -> None:
        for v in values.to_pylist():
            self.value = v if self.value is None else self.alpha * v + (1 - self.alpha) * self.value

    def merge(self, other: "Ema") -> None:
        if self.value is None:
            self.value = other.value

    def evaluate(self):
        return pa.scalar(self.value, type=pa.float64())


def ema(values, alpha=0.5):
    out = None
    for v in values:
        out = v if out is None else alpha * v + (1 - alpha) * out
    return out


TRADES = [
    ("A", 10.0, 1.0, 0),
    ("B", 20.0, 2.0, 100),
    ("A", 12.0, 3.0, 200),
    ("A", 11.0, 2.0, 1_100),
    ("B", 22.0, 1.0, 1_200),
    ("B", 21.0, 5.0, 2_300),
]


def vwap(rows):
    return sum(p * q for p, q in rows) / sum(q for _, q in rows)


def setup_trades(conn):
    conn.register_udaf("vwap", Vwap)
    conn.register_udaf("ema", Ema)
    conn.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty DOUBLE, ts TIMESTAMP(3), "
        "WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)"
    )


def insert_trades(conn, base=1_700_000_000_000):
    for sym, price, qty, at in TRADES:
        conn.insert("trades", {"symbol": sym, "price": price, "qty": qty, "ts": base + at})


def test_ad_hoc_group_by_matches_the_formula(sharded_db):
    setup_trades(sharded_db)
    insert_trades(sharded_db)
    got = records(
        sharded_db.query("SELECT symbol, vwap(price, qty) AS v, COUNT(*) AS n FROM trades GROUP BY symbol ORDER BY symbol"),
        "symbol",
        "v",
        "n",
    )
    per = {s: [(p, q) for sym, p, q, _ in TRADES if sym == s] for s in "AB"}
    assert got == [("A", vwap(per["A"]), 3), ("B", vwap(per["B"]), 3)]
    whole = sharded_db.query("SELECT vwap(price, qty) AS v FROM trades").fetchall()[0][0]
    assert whole == pytest.approx(vwap([(p, q) for _, p, q, _ in TRADES]), rel=1e-12)


def test_tumbling_window_stream_is_exact_on_every_shard_count(sharded_db):
    setup_trades(sharded_db)
    sharded_db.execute(
        "CREATE STREAM bars AS SELECT symbol, window_start, vwap(price, qty) AS v, ema(price) AS e, COUNT(*) AS n "
        "FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)"
    )
    sub = sharded_db.subscribe_stream("bars")
    insert_trades(sharded_db)
    w = sharded_db.writer("trades")
    w.watermark(1_700_000_010_000)
    got = sorted(poll_rows(sub, ("symbol", "window_start", "v", "e", "n"), 5))
    want = []
    for s in "AB":
        for second in range(3):
            rows = [(p, q) for sym, p, q, at in TRADES if sym == s and at // 1000 == second]
            if rows:
                start = laminardb_ts(1_700_000_000_000 + second * 1000)
                want.append((s, start, vwap(rows), ema([p for p, _ in rows]), len(rows)))
    assert got == sorted(want)


def laminardb_ts(ms):
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).replace(tzinfo=None)


def test_unwindowed_group_by_stream_updates_each_group(db):
    setup_trades(db)
    db.execute("CREATE STREAM running AS SELECT symbol, ema(price) AS e FROM trades GROUP BY symbol")
    insert_trades(db)
    got = dict(records(db.query("SELECT symbol, e FROM running"), "symbol", "e"))
    assert got == {s: ema([p for sym, p, _, _ in TRADES if sym == s]) for s in "AB"}


def test_sessions_that_merge_merge_their_state(db):
    """Two sessions of A, bridged by a later row: their Vwap states are merged."""
    db.register_udaf("vwap", Vwap)
    db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty DOUBLE, ts TIMESTAMP(3), "
        "WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)"
    )
    db.execute(
        "CREATE STREAM sessions AS SELECT symbol, vwap(price, qty) AS v, COUNT(*) AS n "
        "FROM trades GROUP BY symbol, SESSION(ts, INTERVAL '1' SECOND)"
    )
    sub = db.subscribe_stream("sessions")
    base = 1_700_000_000_000
    rows = [(10.0, 1.0, 0), (20.0, 3.0, 1_500), (30.0, 2.0, 800)]  # the last bridges the gap
    for p, q, at in rows:
        db.insert("trades", {"symbol": "A", "price": p, "qty": q, "ts": base + at})
    db.writer("trades").watermark(base + 10_000)
    got = poll_rows(sub, ("symbol", "v", "n"), 1)
    assert got == [("A", vwap([(p, q) for p, q, _ in rows]), 3)]


def test_decorator_and_explicit_types(db):
    class Total:
        def __init__(self):
            self.total = 0

        def accumulate(self, v):
            self.total += pc.sum(v).as_py() or 0

        def merge(self, other):
            self.total += other.total

        def evaluate(self):
            return self.total

    with pytest.raises(laminardb.LaminarError, match="needs return_type"):
        db.register_udaf("total", Total)
    db.register_udaf("total", Total, pa.int64(), pa.struct([("total", pa.int64())]), arg_types=[pa.int64()])
    db.execute("CREATE SOURCE t (k VARCHAR, v BIGINT)")
    db.insert("t", [{"k": "x", "v": 3}, {"k": "x", "v": 4}, {"k": "y", "v": None}])
    assert records(db.query("SELECT k, total(v) AS s FROM t GROUP BY k ORDER BY k"), "k", "s") == [("x", 7), ("y", 0)]
    with pytest.raises(laminardb.LaminarError):
        db.query("SELECT total(k) FROM t")  # VARCHAR where BIGINT is declared
    with pytest.raises(TypeError):
        laminardb.udaf(pa.int64(), pa.int64())  # the state must be a struct
    with pytest.raises(TypeError, match="lacks merge"):

        @laminardb.udaf(pa.int64(), pa.struct([("x", pa.int64())]))
        class NoMerge:
            def accumulate(self, v): ...

            def evaluate(self): ...


class Boom:
    def __init__(self):
        self.n = 0

    def accumulate(self, v):
        if pc.max(v).as_py() > 100:
            raise ValueError("too big")
        self.n += len(v)

    def merge(self, other):
        self.n += other.n

    def evaluate(self):
        return self.n


def test_exceptions_name_the_function_and_the_engine_goes_on(db):
    db.register_udaf("boom", Boom, pa.int64(), pa.struct([("n", pa.int64())]))
    db.execute("CREATE SOURCE t (k VARCHAR, v BIGINT)")
    db.insert("t", [{"k": "a", "v": 1}, {"k": "b", "v": 500}])
    with pytest.raises(laminardb.QueryError) as e:
        db.query("SELECT k, boom(v) FROM t GROUP BY k").fetchall()
    assert "boom" in str(e.value) and "too big" in str(e.value) and "ValueError" in str(e.value)
    assert db.query("SELECT 1 AS one").fetchall() == [(1,)]


def test_an_exception_in_a_stream_refuses_its_batch_whole():
    """One shard: the batch the function raised on leaves no trace in any aggregate of
    the stream (COUNT agrees with the function), it is counted in the stream's errors with
    the traceback, and the stream goes on."""
    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1))
    try:
        conn.register_udaf("boom", Boom, pa.int64(), pa.struct([("n", pa.int64())]))
        conn.execute("CREATE SOURCE t (k VARCHAR, v BIGINT)")
        conn.execute("CREATE STREAM s AS SELECT k, boom(v) AS n, COUNT(*) AS c, SUM(v) AS total FROM t GROUP BY k")
        conn.insert("t", [{"k": "a", "v": 1}, {"k": "b", "v": 5}])
        conn.insert("t", [{"k": "a", "v": 1000}, {"k": "b", "v": 6}])
        conn.insert("t", {"k": "a", "v": 2})
        m = conn.stream_metrics("s")
        assert m.errors == 1
        assert "boom" in m.last_error and "too big" in m.last_error
        got = records(conn.query("SELECT k, n, c, total FROM s ORDER BY k"), "k", "n", "c", "total")
        assert got == [("a", 2, 2, 3), ("b", 1, 1, 5)]
    finally:
        conn.close()


def test_wrong_result_type_is_an_error(db):
    class Bad:
        def __init__(self):
            self.n = 0

        def accumulate(self, v):
            self.n += len(v)

        def merge(self, other):
            self.n += other.n

        def evaluate(self):
            return "not a number"

    db.register_udaf("bad", Bad, pa.int64(), pa.struct([("n", pa.int64())]))
    db.execute("CREATE SOURCE t (v BIGINT)")
    db.insert("t", {"v": 1})
    with pytest.raises(laminardb.QueryError, match="bad"):
        db.query("SELECT bad(v) FROM t").fetchall()


def test_a_durable_database_refuses_a_stream_calling_a_local_class(tmp_path):
    class LocalSum:
        def __init__(self):
            self.total = 0.0

        def accumulate(self, v):
            self.total += pc.sum(v).as_py() or 0.0

        def merge(self, other):
            self.total += other.total

        def evaluate(self):
            return self.total

    conn = laminardb.open(str(tmp_path / "db"))
    try:
        conn.register_udaf("local_sum", LocalSum, pa.float64(), pa.struct([("total", pa.float64())]))
        conn.execute("CREATE SOURCE t (v DOUBLE)")
        with pytest.raises(laminardb.LaminarError) as e:
            conn.execute("CREATE STREAM s AS SELECT local_sum(v) AS s FROM t")
        assert "local_sum" in str(e.value) and "imported again" in str(e.value)
        conn.insert("t", [{"v": 1.5}, {"v": 2.0}])
        assert conn.query("SELECT local_sum(v) AS s FROM t").fetchall() == [(3.5,)]  # ad hoc it runs
    finally:
        conn.close()


def test_a_durable_database_continues_a_window_across_a_reopen(tmp_path):
    """A module-level class is stored: the reopened database imports it again, and the
    open window's state comes back from the checkpoint."""
    path = str(tmp_path / "db")
    base = 1_700_000_000_000
    first, second = TRADES[:3], TRADES[3:]
    conn = laminardb.open(path)
    setup_trades(conn)
    conn.execute(
        "CREATE STREAM bars AS SELECT symbol, window_start, vwap(price, qty) AS v, ema(price) AS e, COUNT(*) AS n "
        "FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '10' SECOND)"
    )
    for sym, price, qty, at in first:
        conn.insert("trades", {"symbol": sym, "price": price, "qty": qty, "ts": base + at})
    conn.close()
    conn = laminardb.open(path)  # no register_udaf: the functions come back by themselves
    try:
        sub = conn.subscribe_stream("bars")
        for sym, price, qty, at in second:
            conn.insert("trades", {"symbol": sym, "price": price, "qty": qty, "ts": base + at})
        conn.writer("trades").watermark(base + 60_000)
        got = sorted(poll_rows(sub, ("symbol", "v", "e", "n"), 2))
        want = []
        for s in "AB":
            rows = [(p, q) for sym, p, q, _ in TRADES if sym == s]
            want.append((s, vwap(rows), ema([p for p, _ in rows]), len(rows)))
        assert got == want
    finally:
        conn.close()


def test_a_checkpoint_saves_the_functions_state_and_the_stream_goes_on(db):
    db.close()
    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(checkpoint_interval_ms=3_600_000))
    try:
        setup_trades(conn)
        conn.execute("CREATE STREAM running AS SELECT symbol, vwap(price, qty) AS v FROM trades GROUP BY symbol")
        insert_trades(conn)
        assert int(conn.checkpoint()) >= 1
        conn.insert("trades", {"symbol": "A", "price": 50.0, "qty": 10.0, "ts": 1_700_000_009_000})
        got = dict(records(conn.query("SELECT symbol, v FROM running"), "symbol", "v"))
        a = [(p, q) for s, p, q, _ in TRADES if s == "A"] + [(50.0, 10.0)]
        assert got["A"] == vwap(a)
        assert not math.isnan(got["B"])
    finally:
        conn.close()


@laminardb.udaf(
    return_type=pa.float64(),
    accumulator_type=pa.struct([("sum", pa.float64()), ("count", pa.int64())]),
)
class ExponentialMovingAverage:
    """The specification's example, its bodies filled in: `sum` holds the average so far."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self.sum = 0.0
        self.count = 0

    def accumulate(self, values: pa.Array) -> None:
        for v in values.to_pylist():
            self.sum = v if self.count == 0 else self.alpha * v + (1 - self.alpha) * self.sum
            self.count += 1

    def merge(self, other: "ExponentialMovingAverage") -> None:
        if self.count == 0:
            self.sum, self.count = other.sum, other.count

    def evaluate(self) -> pa.Scalar:
        return pa.scalar(self.sum if self.count else None, type=pa.float64())


def test_the_specs_ema_example_runs_as_written(sharded_db):
    sharded_db.register_udaf("ema", ExponentialMovingAverage)
    # An EMA depends on the order of rows: each symbol's rows stay on one shard, in order.
    sharded_db.execute("CREATE SOURCE trades (symbol VARCHAR, price DOUBLE) WITH (partition_key = 'symbol')")
    prices = {"A": [10.0, 20.0, 15.0], "B": [7.0]}
    sharded_db.insert("trades", [{"symbol": s, "price": p} for s in "AB" for p in prices[s]])
    result = sharded_db.query("SELECT symbol, ema(price) FROM trades GROUP BY symbol")
    assert dict(result.fetchall()) == {s: ema(ps, alpha=0.1) for s, ps in prices.items()}
