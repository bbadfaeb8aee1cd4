"""Market data: trades for 1,000 symbols through a TUMBLE(1 s) OHLC + VWAP stream.

bulk: 5 M trades (--quick 1 M) over 10 s of event time, pre-generated as 100 k-row Arrow
batches and inserted at full speed; rows/s from the first insert until the last bar
arrives (a reader thread collects them), and rows/s per core (÷ shards; for an
implementation without shards, ÷ every core). Every bar is checked against pandas on the
same data: the set of (symbol, window), open/close by event time, high, low, VWAP,
trades; sum(trades) == rows. With --shards N (the harness's sweep) only this part runs.

live: then one row every ~2 ms, event time +250 ms a row, so every 4th row crosses a
second and closes the previous window (watermark = max ts); the time from that insert
call until the window's bar arrives goes into an HDR histogram.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from workloads.common import (
    Case,
    Collector,
    Context,
    new_histogram,
    open_db,
    poll,
    record,
    report_histogram,
    shard_count,
)

SOURCE = (
    "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty BIGINT, ts BIGINT, "
    "WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)"
)
BARS = (
    "CREATE STREAM bars AS SELECT symbol, window_start, FIRST_VALUE(price) AS open, "
    "MAX(price) AS high, MIN(price) AS low, LAST_VALUE(price) AS close, "
    "SUM(price*qty)/SUM(qty) AS vwap, COUNT(*) AS trades "
    "FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)"
)
SYMBOLS = 1_000
BATCH_ROWS = 100_000
SPAN_MS = 10_000  # event time covered by the bulk: 10 windows per symbol
CLOSER_TS = SPAN_MS + 10_000  # one row this late moves the watermark past every bulk window
STALL_S = 5.0
LIVE_START_TS = CLOSER_TS + 10_000
LIVE_STEP_MS = 250
LIVE_PACE_S = 0.002
LIVE_WAIT_S = 2.0  # a bar later than this counts as missing
LIVE_WARMUP = 10  # crossings not recorded
MAX_MISSING = 3


def run(ctx: Context) -> None:
    rows = 1_000_000 if ctx.quick else 5_000_000
    trades = make_trades(rows)
    expected = expected_bars(trades)
    batches = pa.Table.from_pandas(trades, preserve_index=False).to_batches(BATCH_ROWS)
    db = open_db(ctx.shards)
    try:
        db.execute(SOURCE)
        db.execute(BARS)
        db.start()
        sub = db.subscribe_stream("bars")
        ctx.run_case("bulk", lambda case: bulk(case, ctx, db, sub, batches, expected, rows))
        if ctx.shards is None:
            crossings = 250 if ctx.quick else 2_500
            ctx.run_case("live", lambda case: live(case, ctx, db, sub, crossings))
    finally:
        db.close()


def make_trades(rows: int) -> pd.DataFrame:
    """Trades in event-time order. Each run of 1,000 rows is a permutation of the symbols
    and spans whole milliseconds, so no symbol trades twice in one millisecond: open and
    close by event time are unambiguous."""
    assert rows % SPAN_MS == 0 and SYMBOLS % (rows // SPAN_MS) == 0
    rng = np.random.default_rng(3)
    names = np.array([f"S{i:04d}" for i in range(SYMBOLS)], dtype=object)
    order = np.argsort(rng.random((rows // SYMBOLS, SYMBOLS)), axis=1).ravel()
    return pd.DataFrame(
        {
            "symbol": names[order],
            "price": np.round(rng.uniform(50, 250, rows), 2),
            "qty": rng.integers(1, 1_000, rows, dtype=np.int64),
            "ts": np.arange(rows, dtype=np.int64) * SPAN_MS // rows,
        }
    )


def expected_bars(trades: pd.DataFrame) -> pd.DataFrame:
    frame = trades.assign(window_start=trades.ts // 1000 * 1000, notional=trades.price * trades.qty)
    bars = frame.groupby(["symbol", "window_start"], sort=True).agg(
        open=("price", "first"),
        high=("price", "max"),
        low=("price", "min"),
        close=("price", "last"),
        notional=("notional", "sum"),
        qty=("qty", "sum"),
        trades=("price", "size"),
    )
    bars["vwap"] = bars.notional / bars.qty
    return bars.drop(columns=["notional", "qty"])


def as_frame(bars: pa.Table) -> pd.DataFrame:
    """Bars keyed like expected_bars(), window_start as epoch ms whatever its type."""
    start = bars.column("window_start")
    if pa.types.is_timestamp(start.type):
        start = start.cast(pa.timestamp("ms")).cast(pa.int64())
    frame = bars.set_column(bars.schema.get_field_index("window_start"), "window_start", start).to_pandas()
    return frame.set_index(["symbol", "window_start"]).sort_index()


def bulk(
    case: Case, ctx: Context, db: Any, sub: Any, batches: list[pa.RecordBatch], expected: pd.DataFrame, rows: int
) -> None:
    closer = pa.table({"symbol": ["CLOSE"], "price": [1.0], "qty": [1], "ts": [CLOSER_TS]})
    reader = Collector(
        sub,
        rows,
        ctx.budget.cap(STALL_S),
        time.perf_counter() + ctx.budget.left(),
        count=lambda t: int(t.column("trades").to_numpy().sum()),
    )
    reader.start()
    t0 = time.perf_counter()
    for batch in batches:
        db.insert("trades", batch)
    db.insert("trades", closer)
    reader.writer_done()
    bars = reader.finish()
    if not reader.complete(case, "trades (sum of the bars' trade counts)"):
        return
    assert bars is not None and reader.done_at is not None
    check_bars(case, as_frame(bars), expected, rows)
    elapsed = reader.done_at - t0
    shards = shard_count(db)
    case.metric("rows/s", rows / elapsed, "rows/s", "higher")
    case.metric("rows/s per core", rows / elapsed / shards, "rows/s", "higher")
    case.metric("shards", shards, "", None)


def check_bars(case: Case, got: pd.DataFrame, expected: pd.DataFrame, rows: int) -> None:
    case.check(int(got.trades.sum()) == rows, f"sum(trades) = {int(got.trades.sum()):,}, inserted {rows:,}")
    case.check(bool((got.high >= got.low).all()), "a bar has high < low")
    case.check(got.index.is_unique, "a (symbol, window) has several bars")
    missing = expected.index.difference(got.index)
    extra = got.index.difference(expected.index)
    case.check(missing.empty and extra.empty, f"{len(missing)} bars missing, {len(extra)} unexpected")
    both = expected.index.intersection(got.index)
    mine, theirs = got.loc[both], expected.loc[both]
    for column in ["open", "high", "low", "close", "trades"]:
        bad = mine[column].to_numpy() != theirs[column].to_numpy()
        if bad.any():
            symbol, start = key = both[int(np.argmax(bad))]
            case.fail(
                "wrong",
                f"{column} differs in {int(bad.sum())} bars, e.g. {symbol} at {int(start)}: "
                f"{mine[column].loc[key]}, expected {theirs[column].loc[key]}",
            )
    vwap_ok = np.isclose(mine.vwap.to_numpy(), theirs.vwap.to_numpy(), rtol=1e-9, atol=0)
    case.check(bool(vwap_ok.all()), f"vwap differs (beyond 1e-9 relative) in {int((~vwap_ok).sum())} bars")


def live(case: Case, ctx: Context, db: Any, sub: Any, crossings: int) -> None:
    hist = new_histogram()
    per_window = 1000 // LIVE_STEP_MS
    cap = time.perf_counter() + ctx.budget.left() * 0.9
    prices: list[float] = []
    missing = mismatched = 0
    last_insert = time.perf_counter()
    for k in range((crossings + LIVE_WARMUP) * per_window + 1):
        if missing > MAX_MISSING or time.perf_counter() > cap:
            break
        ts = LIVE_START_TS + k * LIVE_STEP_MS
        price = 100.0 + k % 13
        time.sleep(max(0.0, last_insert + LIVE_PACE_S - time.perf_counter()))
        last_insert = time.perf_counter()
        t0 = time.perf_counter_ns()
        db.insert("trades", {"symbol": "LIVE", "price": price, "qty": 1, "ts": ts})
        if k == 0 or ts % 1000 != 0:
            prices.append(price)
            continue
        found = wait_for_bar(sub, ts - 1000)
        closed, prices = prices, [price]
        if found is None:
            missing += 1
            continue
        bar, t1 = found
        if (bar["trades"], bar["open"], bar["close"]) != (len(closed), closed[0], closed[-1]):
            mismatched += 1
        elif k // per_window > LIVE_WARMUP:
            record(hist, t1 - t0)
    if hist.get_total_count() == 0 and missing:
        case.fail("no output", f"no bar within {LIVE_WAIT_S:g} s")
        return
    case.check(missing == 0, f"{missing} windows' bars did not arrive within {LIVE_WAIT_S:g} s")
    case.check(mismatched == 0, f"{mismatched} bars had other trades/open/close than the rows sent")
    report_histogram(case, hist)


def wait_for_bar(sub: Any, window_start: int) -> tuple[dict, int] | None:
    """The LIVE bar of the window starting at window_start and the perf_counter_ns when it
    arrived, or None after LIVE_WAIT_S; other bars are skipped."""
    deadline = time.perf_counter() + LIVE_WAIT_S
    while (left := deadline - time.perf_counter()) > 0:
        batch = poll(sub, left)
        arrived = time.perf_counter_ns()
        if batch is None:
            return None
        for bar in as_frame(batch.to_arrow()).reset_index().to_dict("records"):
            if bar["symbol"] == "LIVE" and bar["window_start"] == window_start:
                return bar, arrived
    return None
