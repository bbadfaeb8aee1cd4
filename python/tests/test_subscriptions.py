"""F-PY-006 / F-PY-010 / F-PY-024 / F-PY-025: continuous subscriptions (sync, async, named
stream, callback), MaterializedView / ChangeEvent / ChangeRow, and reading a stream's
current state with query_stream() and query().

A subscription delivers only batches emitted after it was created. insert() returns after
its rows have passed through every stream, so a subscription has the resulting batches
ready (try_next) as soon as insert() returns."""

from __future__ import annotations

import asyncio
import threading
import time

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import laminardb
from laminardb import codes
from conftest import (
    call_with_timeout,
    drain,
    fold_changelog,
    iterate_to_end,
    records,
    setup,
    wait_until,
)

HI_SQL = "SELECT ts, sym, px FROM t WHERE px > 100"
TOTALS_SQL = "SELECT sym, SUM(px) AS total FROM t GROUP BY sym"
HI_SCHEMA = pa.schema([("ts", pa.int64()), ("sym", pa.string()), ("px", pa.float64())])


@pytest.fixture
def ticks(db):
    """Source `t`, append-only stream `hi` (px > 100) and changelog stream `totals`; started."""
    setup(
        db,
        "CREATE SOURCE t (ts BIGINT, sym VARCHAR, px DOUBLE)",
        f"CREATE STREAM hi AS {HI_SQL}",
        f"CREATE STREAM totals AS {TOTALS_SQL}",
    )
    return db


def put(db, *rows, table="t"):
    """Insert (ts, sym, px) tuples as one insert."""
    db.insert(table, [{"ts": t, "sym": s, "px": p} for t, s, p in rows])


def rows_of(batches):
    return sorted(r for b in batches for r in b.fetchall())


def quiet(fn):
    """A Timer callback that never raises (the connection may be closed by then)."""

    def run():
        try:
            fn()
        except Exception:  # noqa: BLE001
            pass

    return run


# =========================================================================== subscribe(sql)


def test_subscribe_returns_an_active_subscription(ticks):
    sub = ticks.subscribe(HI_SQL)
    assert isinstance(sub, laminardb.Subscription)
    assert sub.is_active is True
    assert repr(sub) == "Subscription(active)"
    assert sub.try_next() is None  # nothing yet, and it does not block


def test_subscribe_is_continuous_and_sees_only_new_rows(ticks):
    put(ticks, (1, "OLD", 500.0))
    sub = ticks.subscribe(HI_SQL)
    assert sub.try_next() is None
    put(ticks, (2, "A", 150.0), (3, "B", 50.0), (4, "C", 101.0))
    batches = drain(sub)
    assert batches and all(isinstance(b, laminardb.QueryResult) for b in batches)
    assert all(b.columns == ["ts", "sym", "px"] for b in batches)
    assert rows_of(batches) == [(2, "A", 150.0), (4, "C", 101.0)]
    assert sub.try_next() is None
    put(ticks, (5, "A", 200.0))
    assert rows_of(drain(sub)) == [(5, "A", 200.0)]
    assert sub.is_active is True


def test_subscribe_iterator_protocol(ticks):
    sub = ticks.subscribe(HI_SQL)
    assert iter(sub) is sub
    put(ticks, (1, "A", 150.0))
    batch = call_with_timeout(lambda: next(sub))
    assert isinstance(batch, laminardb.QueryResult)
    assert batch.fetchall() == [(1, "A", 150.0)]


def test_subscribe_next_blocks_until_rows_arrive(ticks):
    sub = ticks.subscribe(HI_SQL)
    timer = threading.Timer(0.2, lambda: put(ticks, (7, "Z", 700.0)))
    timer.start()
    try:
        batch = call_with_timeout(lambda: next(sub))
    finally:
        timer.join()
    assert batch.fetchall() == [(7, "Z", 700.0)]


def test_subscribe_to_aggregate_query_delivers_changes(ticks):
    sub = ticks.subscribe(TOTALS_SQL)
    put(ticks, (1, "A", 1.0), (2, "B", 2.0))
    put(ticks, (3, "A", 4.0))
    changes = [r for b in drain(sub) for r in records(b, "sym", "total", "_op")]
    assert fold_changelog(changes, 1) == {("A",): ("A", 5.0), ("B",): ("B", 2.0)}
    assert ("A", 1.0, "-U") in changes and ("A", 5.0, "+U") in changes


def test_subscribe_cancel(ticks):
    sub = ticks.subscribe(HI_SQL)
    assert sub.cancel() is None
    assert sub.is_active is False
    assert repr(sub) == "Subscription(cancelled)"
    put(ticks, (1, "A", 150.0))
    assert sub.try_next() is None
    with pytest.raises(StopIteration):
        next(sub)
    assert list(sub) == []
    sub.cancel()  # idempotent
    assert sub.is_active is False
    assert repr(sub) == "Subscription(cancelled)"


def test_subscribe_errors(ticks):
    with pytest.raises(laminardb.QueryError) as ei:
        ticks.subscribe("garbage")
    assert ei.value.code == codes.SQL_PARSE_ERROR == 401
    with pytest.raises(laminardb.LaminarError) as ei:
        ticks.subscribe("SELECT * FROM nope")
    assert "nope" in str(ei.value)


def test_subscription_finishes_after_shutdown(ticks):
    sub = ticks.subscribe(HI_SQL)
    put(ticks, (1, "A", 150.0), (2, "B", 250.0))
    ticks.shutdown()
    batches = iterate_to_end(sub)
    assert rows_of(batches) == [(1, "A", 150.0), (2, "B", 250.0)]
    assert sub.is_active is False
    assert repr(sub) == "Subscription(finished)"
    with pytest.raises(StopIteration):
        next(sub)
    assert sub.try_next() is None


@pytest.mark.parametrize("kind", ["subscribe", "subscribe_stream"])
def test_2000_rows_then_shutdown_are_all_delivered(ticks, kind):
    sub = ticks.subscribe(HI_SQL) if kind == "subscribe" else ticks.subscribe_stream("hi")
    for i in range(1000):  # one row per insert
        put(ticks, (i, f"S{i % 5}", 200.0))
    for k in range(10):  # then 100 rows per insert
        ticks.insert("t", {"ts": list(range(1000 + 100 * k, 1100 + 100 * k)), "sym": ["X"] * 100, "px": [300.0] * 100})
    ticks.shutdown()
    batches = iterate_to_end(sub, timeout=60)
    ts = sorted(r[0] for b in batches for r in b.fetchall())
    assert ts == list(range(2000))


# =========================================================================== subscribe_stream(name)


def test_subscribe_stream_properties(ticks):
    sub = ticks.subscribe_stream("hi")
    assert isinstance(sub, laminardb.StreamSubscription)
    assert sub.is_active is True
    assert repr(sub) == "StreamSubscription(active)"
    assert isinstance(sub.schema, pa.Schema)
    assert sub.schema == HI_SCHEMA
    assert sub.try_next() is None


def test_subscribe_stream_sees_only_batches_after_subscribing(ticks):
    put(ticks, (1, "OLD", 500.0))
    sub = ticks.subscribe_stream("hi")
    assert sub.try_next() is None
    put(ticks, (2, "A", 150.0), (3, "B", 50.0))
    batches = drain(sub)
    assert batches and all(b.schema == sub.schema for b in batches)
    assert rows_of(batches) == [(2, "A", 150.0)]


def test_next_timeout_returns_a_batch_or_raises_502(ticks):
    sub = ticks.subscribe_stream("hi")
    put(ticks, (1, "A", 150.0))
    batch = sub.next_timeout(5000)
    assert isinstance(batch, laminardb.QueryResult)
    assert batch.fetchall() == [(1, "A", 150.0)]
    with pytest.raises(laminardb.SubscriptionError) as ei:
        sub.next_timeout(50)
    assert ei.value.code == codes.SUBSCRIPTION_TIMEOUT == 502
    assert "(502)" in str(ei.value)
    # a timeout does not end the subscription
    assert sub.is_active is True
    put(ticks, (2, "B", 250.0))
    assert sub.next_timeout(5000).fetchall() == [(2, "B", 250.0)]


def test_stream_next_blocks_until_rows_arrive(ticks):
    sub = ticks.subscribe_stream("hi")
    timer = threading.Timer(0.2, lambda: put(ticks, (7, "Z", 700.0)))
    timer.start()
    try:
        batch = call_with_timeout(sub.next)
    finally:
        timer.join()
    assert batch.fetchall() == [(7, "Z", 700.0)]


def test_stream_subscription_iterator_protocol(ticks):
    sub = ticks.subscribe_stream("hi")
    assert iter(sub) is sub
    put(ticks, (1, "A", 150.0))
    assert call_with_timeout(lambda: next(sub)).fetchall() == [(1, "A", 150.0)]


def test_stream_subscription_cancel(ticks):
    sub = ticks.subscribe_stream("hi")
    sub.cancel()
    assert sub.is_active is False
    assert repr(sub) == "StreamSubscription(cancelled)"
    put(ticks, (1, "A", 150.0))
    assert sub.try_next() is None
    assert call_with_timeout(sub.next) is None
    assert sub.next_timeout(100) is None  # closed, not a timeout
    with pytest.raises(StopIteration):
        next(sub)
    sub.cancel()
    assert repr(sub) == "StreamSubscription(cancelled)"


def test_stream_subscription_finishes_after_shutdown(ticks):
    sub = ticks.subscribe_stream("hi")
    put(ticks, (1, "A", 150.0))
    ticks.shutdown()
    assert rows_of(iterate_to_end(sub)) == [(1, "A", 150.0)]
    assert sub.is_active is False
    assert repr(sub) == "StreamSubscription(finished)"
    assert call_with_timeout(sub.next) is None


def test_subscribe_stream_unknown_name_raises(ticks):
    with pytest.raises(laminardb.LaminarError) as ei:
        ticks.subscribe_stream("nope")
    assert "nope" in str(ei.value)


def test_ten_subscribers_each_get_every_row(shard_db):
    db = shard_db
    setup(
        db,
        "CREATE SOURCE t (ts BIGINT, sym VARCHAR, px DOUBLE)",
        f"CREATE STREAM hi AS {HI_SQL}",
        f"CREATE STREAM totals AS {TOTALS_SQL}",
    )
    subs = [db.subscribe_stream("hi") for _ in range(10)]
    tsubs = [db.subscribe_stream("totals") for _ in range(10)]
    put(db, (1, "A", 150.0), (2, "B", 50.0))
    put(db, (3, "C", 300.0))
    put(db, *[(10 + i, f"K{i}", 101.0 + i) for i in range(20)])
    expected = sorted([(1, "A", 150.0), (3, "C", 300.0)] + [(10 + i, f"K{i}", 101.0 + i) for i in range(20)])
    for sub in subs:
        assert rows_of(drain(sub)) == expected
    want = {("A",): ("A", 150.0), ("B",): ("B", 50.0), ("C",): ("C", 300.0)}
    want.update({(f"K{i}",): (f"K{i}", 101.0 + i) for i in range(20)})
    for sub in tsubs:
        changes = [r for b in drain(sub) for r in records(b, "sym", "total", "_op")]
        assert fold_changelog(changes, 1) == want


def test_subscribers_on_separate_threads(ticks):
    subs = [ticks.subscribe_stream("hi") for _ in range(4)]
    got = [[] for _ in subs]

    def reader(i):
        while len(got[i]) < 200:
            got[i].extend(subs[i].next_timeout(15_000).fetchall())

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(4)]
    for th in threads:
        th.start()
    for k in range(20):
        put(ticks, *[(k * 10 + j, "A", 150.0) for j in range(10)])
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)
    for rows in got:
        assert sorted(r[0] for r in rows) == list(range(200))


# =========================================================================== callbacks


def test_subscribe_callback_runs_on_a_background_thread(ticks):
    got, thread_ids = [], set()

    def on_data(batch):
        thread_ids.add(threading.get_ident())
        assert isinstance(batch, laminardb.QueryResult)
        got.extend(batch.fetchall())

    cb = ticks.subscribe_callback(HI_SQL, on_data)
    assert cb.is_active is True
    assert repr(cb).startswith("CallbackSubscription(") and repr(cb).endswith("active)")
    put(ticks, (1, "A", 150.0), (2, "B", 50.0), (3, "C", 300.0))
    assert wait_until(lambda: len(got) >= 2)
    assert sorted(got) == [(1, "A", 150.0), (3, "C", 300.0)]
    assert threading.get_ident() not in thread_ids
    cb.cancel()
    call_with_timeout(cb.wait)
    assert cb.is_active is False
    assert repr(cb).endswith("cancelled)")
    put(ticks, (4, "D", 400.0))
    assert sorted(got) == [(1, "A", 150.0), (3, "C", 300.0)]  # nothing after cancel
    cb.cancel()  # idempotent


def test_subscribe_stream_callback(ticks):
    got = []
    cb = ticks.subscribe_stream_callback("totals", lambda b: got.extend(records(b, "sym", "total", "_op")))
    assert cb.is_active is True
    put(ticks, (1, "A", 1.0))
    put(ticks, (2, "A", 2.0), (3, "B", 4.0))
    assert wait_until(lambda: len(got) >= 4)
    assert fold_changelog(got, 1) == {("A",): ("A", 3.0), ("B",): ("B", 4.0)}
    cb.cancel()
    call_with_timeout(cb.wait)
    assert cb.is_active is False


def test_subscribe_stream_callback_unknown_stream_raises(ticks):
    with pytest.raises(laminardb.LaminarError) as ei:
        ticks.subscribe_stream_callback("nope", lambda b: None)
    assert "nope" in str(ei.value)


def test_callback_on_error_receives_the_error(ticks):
    data, errors = [], []
    cb = ticks.subscribe_callback(HI_SQL, data.append, on_error=errors.append)
    [qid] = [q.id for q in ticks.queries() if q.active and q.sql.strip() == HI_SQL]
    ticks.cancel_query(qid)
    assert wait_until(lambda: errors)
    call_with_timeout(cb.wait)
    assert cb.is_active is False
    assert isinstance(errors[0], laminardb.LaminarError)
    assert errors[0].code == codes.QUERY_CANCELLED == 402
    assert data == []


def test_a_subscriber_queue_is_bounded_in_bytes():
    # Queues were bounded in batches only: 4,096 big batches could pile up unread.
    config = laminardb.LaminarConfig(shards=1, subscriber_queue_bytes=1 << 20)
    with laminardb.open(":memory:", config=config) as db:
        db.execute("CREATE SOURCE big (v BIGINT)")
        sub = db.subscribe_stream("big")
        for i in range(4):  # 100,000 BIGINTs = 800,000 bytes each: one fits in 1 MiB
            db.insert("big", pa.table({"v": pa.array(range(i * 100_000, (i + 1) * 100_000), pa.int64())}))
        assert sub.lagged_batches == 3
        kept = sub.try_next()
        assert kept.num_rows == 100_000
        assert kept.to_arrow().column("v")[0].as_py() == 300_000
        assert sub.try_next() is None
        db.insert("big", [{"v": 1}])  # the reader caught up: nothing more is lost
        db.insert("big", [{"v": 2}])
        assert [b.fetchall() for b in drain(sub)] == [[(1,)], [(2,)]]
        assert sub.lagged_batches == 3


# =========================================================================== asyncio


async def test_subscribe_async(ticks):
    asub = await ticks.subscribe_async(HI_SQL)
    assert isinstance(asub, laminardb.AsyncSubscription)
    assert asub.is_active is True
    assert repr(asub) == "AsyncSubscription(active)"
    assert asub.__aiter__() is asub
    put(ticks, (1, "A", 150.0), (2, "B", 50.0))
    async for batch in asub:
        assert isinstance(batch, laminardb.QueryResult)
        assert batch.fetchall() == [(1, "A", 150.0)]
        break
    asub.cancel()
    assert asub.is_active is False
    assert repr(asub) == "AsyncSubscription(cancelled)"
    with pytest.raises(StopAsyncIteration):
        await asub.__anext__()
    assert [b async for b in asub] == []


async def test_subscribe_stream_async(ticks):
    asub = await ticks.subscribe_stream_async("hi")
    assert isinstance(asub, laminardb.AsyncStreamSubscription)
    assert asub.is_active is True
    assert repr(asub) == "AsyncStreamSubscription(active)"
    assert asub.schema == HI_SCHEMA
    put(ticks, (1, "A", 150.0))
    async for batch in asub:
        assert batch.fetchall() == [(1, "A", 150.0)]
        break
    asub.cancel()
    assert asub.is_active is False
    assert repr(asub) == "AsyncStreamSubscription(cancelled)"
    with pytest.raises(StopAsyncIteration):
        await asub.__anext__()


async def test_event_loop_keeps_running_while_a_subscription_waits(ticks):
    asub = await ticks.subscribe_stream_async("hi")
    # if waiting blocked the loop, this rescue row (from another thread) unblocks it and the
    # assertions below fail instead of the test hanging
    rescue = threading.Timer(5.0, quiet(lambda: put(ticks, (999, "RESCUE", 999.0))))
    rescue.start()
    try:
        consumer = asyncio.ensure_future(asub.__anext__())
        ticked = []
        for i in range(10):
            ticked.append(i)
            await asyncio.sleep(0.01)
        assert not consumer.done()
        put(ticks, (1, "A", 150.0))
        batch = await asyncio.wait_for(consumer, 15)
    finally:
        rescue.cancel()
    assert ticked == list(range(10))
    assert batch.fetchall() == [(1, "A", 150.0)]


async def test_two_async_subscriptions_do_not_block_each_other(db):
    setup(
        db,
        "CREATE SOURCE a (ts BIGINT, sym VARCHAR, px DOUBLE)",
        "CREATE SOURCE b (ts BIGINT, sym VARCHAR, px DOUBLE)",
        "CREATE STREAM sa AS SELECT ts, sym, px FROM a",
        "CREATE STREAM sb AS SELECT ts, sym, px FROM b",
    )
    suba = await db.subscribe_stream_async("sa")
    subb = await db.subscribe_stream_async("sb")
    rescue = threading.Timer(
        5.0,
        quiet(lambda: (put(db, (999, "RESCUE", 0.0), table="a"), put(db, (999, "RESCUE", 0.0), table="b"))),
    )
    rescue.start()
    try:
        ta = asyncio.ensure_future(suba.__anext__())
        tb = asyncio.ensure_future(subb.__anext__())
        await asyncio.sleep(0.05)
        put(db, (2, "B", 2.0), table="b")
        got_b = await asyncio.wait_for(tb, 15)
        assert not ta.done()
        put(db, (1, "A", 1.0), table="a")
        got_a = await asyncio.wait_for(ta, 15)
    finally:
        rescue.cancel()
    assert got_b.fetchall() == [(2, "B", 2.0)]
    assert got_a.fetchall() == [(1, "A", 1.0)]


async def test_async_subscription_ends_after_shutdown(ticks):
    asub = await ticks.subscribe_stream_async("hi")
    put(ticks, (1, "A", 150.0), (2, "B", 250.0))
    ticks.shutdown()
    # if the subscription never ended, cancelling it from another thread unblocks the test
    rescue = threading.Timer(20.0, quiet(lambda: (asub.cancel(), ticks.close())))
    rescue.start()
    try:
        batches = [b async for b in asub]
    finally:
        rescue.cancel()
    assert rows_of(batches) == [(1, "A", 150.0), (2, "B", 250.0)]
    assert asub.is_active is False
    assert repr(asub) == "AsyncStreamSubscription(finished)"


async def test_fifty_idle_async_subscriptions_hold_no_executor_thread(ticks):
    # Before the engine woke async waiters itself, each waiting subscription held a thread
    # of the default executor in 50 ms slices: with 50 of them, a run_in_executor call and
    # a delivery each took hundreds of milliseconds.
    loop = asyncio.get_running_loop()
    idle = [await ticks.subscribe_stream_async("totals") for _ in range(50)]
    waiting = [asyncio.ensure_future(s.__anext__()) for s in idle]
    hi = await ticks.subscribe_stream_async("hi")
    consumer = asyncio.ensure_future(hi.__anext__())
    await asyncio.sleep(0.2)  # every waiter is parked
    assert not any(w.done() for w in waiting) and not consumer.done()

    start = loop.time()
    assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 7), 5) == 7
    executor_ms = (loop.time() - start) * 1000

    start = loop.time()
    await loop.run_in_executor(None, put, ticks, (1, "A", 150.0))
    batch = await asyncio.wait_for(consumer, 5)
    delivery_ms = (loop.time() - start) * 1000
    assert batch.fetchall() == [(1, "A", 150.0)]
    assert executor_ms < 100, f"run_in_executor waited {executor_ms:.0f} ms behind idle subscriptions"
    assert delivery_ms < 100, f"delivery took {delivery_ms:.0f} ms"

    # every idle waiter woke for the changelog row of `totals` too
    got = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert all(sorted(b.fetchall()) == [("A", 150.0, "+I")] for b in got)
    # a cancelled task stops at once, and cancelling a subscription ends its waiter
    w = asyncio.ensure_future(idle[0].__anext__())
    await asyncio.sleep(0.01)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    w = asyncio.ensure_future(idle[1].__anext__())
    await asyncio.sleep(0.01)
    start = loop.time()
    idle[1].cancel()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(w, 5)
    assert (loop.time() - start) * 1000 < 100
    for s in idle + [hi]:
        s.cancel()


async def test_async_next_timeout_and_cancel_query_wake_promptly(ticks):
    loop = asyncio.get_running_loop()
    asub = await ticks.subscribe_async(HI_SQL)
    start = loop.time()
    with pytest.raises(laminardb.SubscriptionError) as e:
        await asub.next_timeout(0.05)
    assert e.value.code == 502
    assert 0.04 <= loop.time() - start < 1.0
    put(ticks, (1, "A", 150.0))
    assert (await asub.next_timeout(5)).fetchall() == [(1, "A", 150.0)]

    waiting = asyncio.ensure_future(asub.__anext__())
    await asyncio.sleep(0.01)
    (query_id,) = [q.id for q in ticks.queries() if q.sql == HI_SQL and q.active]
    ticks.cancel_query(query_id)
    with pytest.raises(laminardb.LaminarError) as e:
        await asyncio.wait_for(waiting, 5)
    assert e.value.code == codes.QUERY_CANCELLED


# =========================================================================== MaterializedView


def test_mv_factory_and_constructor(ticks):
    v = laminardb.mv(ticks, "totals")
    assert isinstance(v, laminardb.MaterializedView)
    assert v.name == "totals"
    v2 = laminardb.mv(ticks, "totals", TOTALS_SQL)
    assert v2.name == "totals" and v2.sql == TOTALS_SQL
    v3 = laminardb.MaterializedView(ticks, "hi", sql=HI_SQL)
    assert v3.name == "hi" and v3.sql == HI_SQL


def test_mv_query_reads_current_state(ticks):
    v = laminardb.mv(ticks, "totals")
    put(ticks, (1, "AAPL", 150.0), (2, "GOOG", 2800.0))
    put(ticks, (3, "AAPL", 155.0))
    res = v.query()
    assert isinstance(res, laminardb.QueryResult)
    assert sorted(records(res, "sym", "total")) == [("AAPL", 305.0), ("GOOG", 2800.0)]
    assert records(v.query(where="total > 1000"), "sym", "total") == [("GOOG", 2800.0)]
    assert records(v.query(where="sym = 'AAPL'"), "sym", "total") == [("AAPL", 305.0)]
    assert v.query(where="total < 0").num_rows == 0


def test_mv_schema(ticks):
    s = laminardb.mv(ticks, "hi").schema()
    assert isinstance(s, laminardb.Schema)
    assert s.names == ["ts", "sym", "px"]
    assert len(s) == 3
    assert [c.name for c in s.columns] == ["ts", "sym", "px"]
    assert s[0].name == "ts"
    assert s["px"].name == "px"
    assert s[2] == s["px"]


def test_mv_query_unknown_stream_raises_query_error(ticks):
    with pytest.raises(laminardb.QueryError):
        laminardb.mv(ticks, "nope").query()


def test_mv_subscribe_without_handler_returns_stream_subscription(ticks):
    sub = laminardb.mv(ticks, "hi").subscribe()
    assert isinstance(sub, laminardb.StreamSubscription)
    put(ticks, (1, "A", 150.0), (2, "B", 5.0))
    assert rows_of(drain(sub)) == [(1, "A", 150.0)]
    sub.cancel()


def test_mv_subscribe_with_handler_delivers_change_events(ticks):
    events, thread_ids = [], set()

    def handler(event):
        thread_ids.add(threading.get_ident())
        events.append(event)

    th = laminardb.mv(ticks, "hi").subscribe(handler=handler)
    assert isinstance(th, threading.Thread)
    assert th.daemon is True
    assert th.is_alive()
    put(ticks, (1, "A", 150.0), (2, "B", 5.0), (3, "C", 300.0))
    assert wait_until(lambda: sum(len(e) for e in events) >= 2)
    assert all(isinstance(e, laminardb.ChangeEvent) for e in events)
    rows = sorted((r["ts"], r["sym"], r["px"]) for e in events for r in e)
    assert rows == [(1, "A", 150.0), (3, "C", 300.0)]
    assert threading.get_ident() not in thread_ids


def test_change_event_and_change_row(ticks):
    put(ticks, (1, "A", 150.0), (2, "B", 2800.0))
    qr = ticks.query("SELECT ts, sym, px FROM t ORDER BY ts")
    ev = laminardb.ChangeEvent(qr, op="Insert")
    assert len(ev) == 2
    rows = list(ev)
    assert all(isinstance(r, laminardb.ChangeRow) for r in rows)
    assert [r.op for r in rows] == ["Insert", "Insert"]
    assert rows[0]["sym"] == "A" and rows[1]["px"] == 2800.0
    assert rows[0].keys() == ["ts", "sym", "px"]
    assert rows[0].values() == [1, "A", 150.0]
    assert rows[1].to_dict() == {"ts": 2, "sym": "B", "px": 2800.0}
    with pytest.raises(KeyError):
        rows[0]["nope"]
    assert [r.to_dict() for r in ev] == [r.to_dict() for r in rows]  # iterable again
    assert ev.arrow().equals(qr.to_arrow())
    df = ev.df()
    assert isinstance(df, pd.DataFrame) and df["sym"].tolist() == ["A", "B"]
    pdf = ev.pl()
    assert isinstance(pdf, pl.DataFrame) and pdf["px"].to_list() == [150.0, 2800.0]
    deleted = laminardb.ChangeEvent(qr, op="Delete")
    assert [r.op for r in deleted] == ["Delete", "Delete"]


# =========================================================================== stream state


def test_query_stream_by_name_with_and_without_filter(ticks):
    put(ticks, (1, "A", 150.0), (2, "B", 50.0), (3, "A", 250.0))
    res = ticks.query_stream("totals")
    assert isinstance(res, laminardb.QueryResult)
    assert sorted(records(res, "sym", "total")) == [("A", 400.0), ("B", 50.0)]
    assert records(ticks.query_stream("totals", filter="total > 100"), "sym", "total") == [("A", 400.0)]
    assert sorted(ticks.query_stream("hi").fetchall()) == [(1, "A", 150.0), (3, "A", 250.0)]
    assert ticks.query_stream("hi", filter="ts > 1").fetchall() == [(3, "A", 250.0)]


def test_query_select_from_stream_reads_current_state(ticks):
    put(ticks, (1, "A", 150.0))
    assert ticks.query("SELECT sym, total FROM totals").fetchall() == [("A", 150.0)]
    put(ticks, (2, "A", 50.0), (3, "B", 500.0))  # read-your-writes: visible as insert returns
    assert ticks.query("SELECT sym, total FROM totals ORDER BY sym").fetchall() == [("A", 200.0), ("B", 500.0)]
    assert ticks.query("SELECT COUNT(*) FROM totals").fetchall() == [(2,)]  # retracted rows are gone
    assert ticks.query("SELECT ts, sym, px FROM hi ORDER BY ts").fetchall() == [(1, "A", 150.0), (3, "B", 500.0)]
    assert ticks.query("SELECT SUM(px) FROM hi WHERE sym = 'B'").fetchall() == [(500.0,)]


def test_callback_subscriptions_name_what_they_follow_and_hand_on_error_a_laminar_error(db):
    db.execute("CREATE SOURCE cb_src (a BIGINT)")
    errors: list = []
    by_stream = db.subscribe_stream_callback("cb_src", lambda batch: 1 / 0, on_error=errors.append)
    by_query = db.subscribe_callback("SELECT a FROM cb_src", lambda batch: None)
    assert repr(by_stream) == "CallbackSubscription(stream='cb_src', active)"
    assert repr(by_query) == "CallbackSubscription(query='SELECT a FROM cb_src', active)"
    db.insert("cb_src", {"a": 1})
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(errors[0], laminardb.SubscriptionError)
    assert "ZeroDivisionError: division by zero" in str(errors[0])
    assert isinstance(errors[0].__cause__, ZeroDivisionError)
    by_stream.cancel()
    by_query.cancel()
    assert repr(by_query) == "CallbackSubscription(query='SELECT a FROM cb_src', cancelled)"
    plain = db.subscribe_stream("cb_src")
    assert plain.schema.names == ["a"]
    plain.cancel()
    with pytest.raises(laminardb.SubscriptionError):
        plain.schema


def test_a_subscription_to_sql_without_a_streaming_input_delivers_its_rows_then_finishes(db):
    for sql, want in [("SELECT 1 AS x", {"x": [1]}), ("SELECT * FROM (VALUES (1, 'a'), (2, 'b')) AS t(n, s)", {"n": [1, 2], "s": ["a", "b"]})]:
        sub = db.subscribe(sql)
        got = sub.next()
        assert got.to_dicts() == want
        assert sub.next() is None
        assert repr(sub) == "Subscription(finished)"
