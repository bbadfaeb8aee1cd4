"""Issue 24, first step: the streaming ASOF JOIN (backward; `MATCH_CONDITION(t.ts >= q.ts)`
or `>`), each trade joined with the latest quote of its symbol at or before it, emitted
once when the watermark passes it. Checked against `pandas.merge_asof` on random data
with out-of-order rows within the watermark's delay, on 1 and 2 shards."""

from __future__ import annotations

import random

import pandas as pd
import pytest

import laminardb

from conftest import poll_rows

BASE = 1_700_000_000_000


def setup(conn):
    conn.execute(
        "CREATE SOURCE trades (symbol VARCHAR, ts TIMESTAMP(3), qty BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
    )
    conn.execute(
        "CREATE SOURCE quotes (symbol VARCHAR, ts TIMESTAMP(3), bid DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
    )


def matched_stream(conn, join):
    """`CREATE STREAM matched` of each trade's symbol, time and qty with its quote's bid and
    time, over `join` (the FROM clause after `trades t`); its SELECT and a subscription."""
    select = f"SELECT t.symbol, t.ts, t.qty, q.bid, q.ts AS quote_ts FROM trades t {join}"
    conn.execute(f"CREATE STREAM matched AS {select}")
    return select, conn.subscribe_stream("matched")


def random_feed(seed, n_trades, n_quotes, symbols=10, span_ms=60_000, jitter_ms=500):
    rng = random.Random(seed)
    # Unique quote times per symbol: ties would leave the choice to arrival order.
    quotes = []
    for i in range(n_quotes):
        sym = f"S{rng.randrange(symbols)}"
        quotes.append({"symbol": sym, "ts": BASE + i * span_ms // n_quotes, "bid": round(rng.uniform(10, 20), 4)})
    trades = [
        {"symbol": f"S{rng.randrange(symbols)}", "ts": BASE + rng.randrange(span_ms), "qty": i + 1}
        for i in range(n_trades)
    ]
    trades.sort(key=lambda r: r["ts"])

    def shuffled(rows):
        # Out of order by up to `jitter_ms`, within the watermark's delay (1 s).
        return sorted(rows, key=lambda r: r["ts"] + rng.randrange(jitter_ms))

    return shuffled(trades), shuffled(quotes)


def feed(conn, trades, quotes, batches):
    """Both feeds in `batches` slices, quotes then trades, as two feeds would arrive."""
    for k in range(batches):
        conn.insert("quotes", quotes[k * len(quotes) // batches : (k + 1) * len(quotes) // batches])
        conn.insert("trades", trades[k * len(trades) // batches : (k + 1) * len(trades) // batches])


def end_time(conn, at=BASE + 10 * 60_000):
    """Both sources' watermarks moved to `at`, past every row."""
    for source in ("trades", "quotes"):
        conn.writer(source).watermark(at)


def merged(trades, quotes, strict=False, tolerance=None, direction="backward"):
    """`pandas.merge_asof` of the rows, keeping each match's quote time as `quote_ts`."""
    t = pd.DataFrame(trades).sort_values("ts")
    q = pd.DataFrame(quotes).sort_values("ts").rename(columns={"ts": "quote_ts"})
    q["ts"] = q["quote_ts"]
    return pd.merge_asof(t, q, on="ts", by="symbol", direction=direction, allow_exact_matches=not strict, tolerance=tolerance)


def expected(trades, quotes, strict=False, tolerance=None, direction="backward"):
    m = merged(trades, quotes, strict, tolerance, direction).dropna(subset=["bid"])
    return sorted((r.symbol, int(r.ts), int(r.qty), float(r.bid), int(r.quote_ts)) for r in m.itertuples())


def ms(ts):
    return int(pd.Timestamp(ts).value // 1_000_000)


@pytest.mark.parametrize("strict", [False, True], ids=[">=", ">"])
def test_the_stream_equals_merge_asof_on_random_out_of_order_input(sharded_db, strict):
    setup(sharded_db)
    op = ">" if strict else ">="
    sharded_db.execute(
        "CREATE STREAM matched AS SELECT t.symbol, t.ts, t.qty, q.bid, q.ts AS quote_ts "
        f"FROM trades t ASOF JOIN quotes q MATCH_CONDITION(t.ts {op} q.ts) ON t.symbol = q.symbol"
    )
    sub = sharded_db.subscribe_stream("matched")
    trades, quotes = random_feed(7, 3_000, 3_000)
    # Interleaved in batches, as two feeds would arrive.
    feed(sharded_db, trades, quotes, 12)
    want = expected(trades, quotes, strict)
    end_time(sharded_db)
    got = poll_rows(sub, ("symbol", "ts", "qty", "bid", "quote_ts"), len(want), timeout=20)
    got = sorted((s, ms(ts), q, b, ms(qt)) for s, ts, q, b, qt in got)
    assert len(want) > 2_500
    assert got == want
    assert sharded_db.stream_metrics("matched").late_events == 0


def test_a_trade_waits_for_the_quotes_watermark_and_is_emitted_once(db):
    setup(db)
    db.execute(
        "CREATE STREAM matched AS SELECT t.qty, q.bid FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol"
    )
    sub = db.subscribe_stream("matched")
    db.insert("quotes", [{"symbol": "A", "ts": BASE, "bid": 1.0}])
    db.insert("trades", [{"symbol": "A", "ts": BASE + 5_000, "qty": 1}])
    # A quote before the trade can still come: nothing yet.
    assert poll_rows(sub, ("qty", "bid"), 1, timeout=0.3) == []
    db.insert("quotes", [{"symbol": "A", "ts": BASE + 4_000, "bid": 2.0}])
    db.insert("quotes", [{"symbol": "A", "ts": BASE + 7_000, "bid": 3.0}])  # after it: not its match
    end_time(db, BASE + 60_000)
    assert poll_rows(sub, ("qty", "bid"), 1) == [(1, 2.0)]
    db.insert("trades", [{"symbol": "A", "ts": BASE + 70_000, "qty": 2}])
    end_time(db, BASE + 80_000)
    assert poll_rows(sub, ("qty", "bid"), 1) == [(2, 3.0)]


def test_the_join_state_survives_a_reopen(tmp_path):
    path = str(tmp_path / "db")
    conn = laminardb.open(path)
    setup(conn)
    conn.execute(
        "CREATE STREAM matched AS SELECT t.qty, q.bid FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol"
    )
    conn.insert("quotes", [{"symbol": "A", "ts": BASE, "bid": 1.5}])
    conn.insert("trades", [{"symbol": "A", "ts": BASE + 100, "qty": 7}])
    conn.close()
    conn = laminardb.open(path)
    try:
        sub = conn.subscribe_stream("matched")
        end_time(conn, BASE + 60_000)
        assert poll_rows(sub, ("qty", "bid"), 1) == [(7, 1.5)]
    finally:
        conn.close()


def test_a_match_condition_must_compare_a_column_of_each_side(db):
    setup(db)
    with pytest.raises(laminardb.LaminarError, match="ASOF match condition"):
        db.execute(
            "CREATE STREAM f AS SELECT t.qty FROM trades t ASOF JOIN quotes q MATCH_CONDITION(t.ts >= 5) ON t.symbol = q.symbol"
        )


@pytest.mark.parametrize("strict", [False, True], ids=["<=", "<"])
def test_forward_matches_take_the_earliest_quote_at_or_after_the_trade(sharded_db, strict):
    setup(sharded_db)
    op = "<" if strict else "<="
    select, sub = matched_stream(sharded_db, f"ASOF JOIN quotes q MATCH_CONDITION(t.ts {op} q.ts) ON t.symbol = q.symbol")
    trades, quotes = random_feed(17, 2_000, 2_000)
    feed(sharded_db, trades, quotes, 8)
    want = expected(trades, quotes, strict, direction="forward")
    # Trades after their symbol's last quote wait for one: the watermark alone ends nothing.
    assert_stream_and_ad_hoc(sharded_db, sub, select, want)


def assert_stream_and_ad_hoc(conn, sub, select, want):
    """Time ended, the stream's rows and the same SELECT ad hoc are `want` (`expected`)."""
    end_time(conn)
    got = poll_rows(sub, ("symbol", "ts", "qty", "bid", "quote_ts"), len(want), timeout=20)
    assert sorted((s, ms(ts), q, b, ms(qt)) for s, ts, q, b, qt in got) == want
    adhoc = conn.query(select).fetchall()
    assert sorted((s, ms(ts), q, b, ms(qt)) for s, ts, q, b, qt in adhoc) == want


def test_nearest_matches_take_the_closer_quote_ties_going_back(sharded_db):
    setup(sharded_db)
    select, sub = matched_stream(sharded_db, "ASOF JOIN quotes q MATCH_CONDITION(NEAREST(t.ts, q.ts)) ON t.symbol = q.symbol")
    trades, quotes = random_feed(23, 2_000, 400)
    # A trade exactly between two quotes of its symbol (first, before any watermark): the
    # earlier one wins.
    tie_quotes = [{"symbol": "TIE", "ts": BASE - 3_000, "bid": 1.0}, {"symbol": "TIE", "ts": BASE - 1_000, "bid": 3.0}]
    tie_trades = [{"symbol": "TIE", "ts": BASE - 2_000, "qty": 99_999}]
    sharded_db.insert("quotes", tie_quotes)
    sharded_db.insert("trades", tie_trades)
    feed(sharded_db, trades, quotes, 8)
    want = expected(trades + tie_trades, quotes + tie_quotes, direction="nearest")
    assert ("TIE", BASE - 2_000, 99_999, 1.0, BASE - 3_000) in want
    assert_stream_and_ad_hoc(sharded_db, sub, select, want)


def test_a_nearest_match_waits_only_until_no_nearer_quote_can_come(db):
    setup(db)
    db.execute(
        "CREATE STREAM matched AS SELECT t.qty, q.bid FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(NEAREST(t.ts, q.ts)) ON t.symbol = q.symbol"
    )
    sub = db.subscribe_stream("matched")
    db.insert("quotes", [{"symbol": "A", "ts": BASE, "bid": 1.0}])
    db.insert("trades", [{"symbol": "A", "ts": BASE + 5_000, "qty": 1}])
    # The quote 5 s before it is the match unless one comes before 10 s.
    end_time(db, BASE + 9_000)
    assert poll_rows(sub, ("qty", "bid"), 1, timeout=0.3) == []
    end_time(db, BASE + 10_000)
    assert poll_rows(sub, ("qty", "bid"), 1) == [(1, 1.0)]


def test_a_temporal_join_reads_the_version_of_a_table_current_at_each_row(sharded_db):
    """`JOIN quotes FOR SYSTEM_TIME AS OF t.ts` over a TABLE of quote versions is the
    backward ASOF join on its version time."""
    sharded_db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, ts TIMESTAMP(3), qty BIGINT, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
    )
    sharded_db.execute(
        "CREATE TABLE quotes (symbol VARCHAR, ts TIMESTAMP(3), bid DOUBLE, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)"
    )
    select, sub = matched_stream(sharded_db, "JOIN quotes FOR SYSTEM_TIME AS OF t.ts AS q ON t.symbol = q.symbol")
    trades, quotes = random_feed(29, 2_000, 1_000)
    feed(sharded_db, trades, quotes, 6)
    assert_stream_and_ad_hoc(sharded_db, sub, select, expected(trades, quotes))


def test_ad_hoc_it_joins_every_retained_row(sharded_db):
    setup(sharded_db)
    trades, quotes = random_feed(11, 2_000, 1_500)
    sharded_db.insert("quotes", quotes)
    sharded_db.insert("trades", trades)
    result = sharded_db.query(
        "SELECT t.symbol, t.ts, t.qty, q.bid, q.ts AS quote_ts FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol ORDER BY t.qty LIMIT 5000"
    )
    got = sorted((s, ms(ts), q, b, ms(qt)) for s, ts, q, b, qt in result.fetchall())
    assert got == expected(trades, quotes)


def test_a_tolerance_in_on_drops_matches_that_are_too_old(db):
    setup(db)
    trades, quotes = random_feed(5, 2_000, 300)  # quotes sparse: many matches are old
    db.insert("quotes", quotes)
    db.insert("trades", trades)
    result = db.query(
        "SELECT t.symbol, t.ts, t.qty, q.bid, q.ts AS quote_ts FROM trades t ASOF JOIN quotes q "
        "MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol AND t.ts - q.ts <= INTERVAL '1' SECOND"
    )
    got = sorted((s, ms(ts), q, b, ms(qt)) for s, ts, q, b, qt in result.fetchall())
    want = expected(trades, quotes, tolerance=1_000)
    assert 0 < len(want) < len(expected(trades, quotes))
    assert got == want


def expected_left(trades, quotes, tolerance=None):
    m = merged(trades, quotes, tolerance=tolerance)

    def value(x, cast):
        return None if pd.isna(x) else cast(x)

    return sorted(
        ((r.symbol, int(r.ts), int(r.qty), value(r.bid, float), value(r.quote_ts, int)) for r in m.itertuples()),
        key=repr,
    )


@pytest.mark.parametrize("tolerance", [None, 1_000], ids=["no tolerance", "1 s"])
def test_left_asof_keeps_every_trade_in_a_stream_and_ad_hoc(sharded_db, tolerance):
    setup(sharded_db)
    within = " AND t.ts - q.ts <= INTERVAL '1' SECOND" if tolerance else ""
    select, sub = matched_stream(sharded_db, f"LEFT ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol{within}")
    trades, quotes = random_feed(3, 1_500, 300)  # sparse quotes: trades before any, matches too old
    feed(sharded_db, trades, quotes, 5)
    end_time(sharded_db)
    want = expected_left(trades, quotes, tolerance)
    assert len(want) == 1_500 and any(w[3] is None for w in want)

    def norm(rows):
        return sorted(((s, ms(ts), q, b, None if qt is None else ms(qt)) for s, ts, q, b, qt in rows), key=repr)

    got = poll_rows(sub, ("symbol", "ts", "qty", "bid", "quote_ts"), len(want), timeout=20)
    assert norm(got) == want
    assert norm(sharded_db.query(select).fetchall()) == want


def test_an_aggregate_over_an_asof_join_in_a_stream_and_ad_hoc(sharded_db):
    setup(sharded_db)
    sharded_db.execute(
        "CREATE STREAM notional AS SELECT t.symbol, window_start, SUM(t.qty * q.bid) AS n, COUNT(*) AS c "
        "FROM trades t ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol "
        "GROUP BY t.symbol, TUMBLE(t.ts, INTERVAL '10' SECOND)"
    )
    sub = sharded_db.subscribe_stream("notional")
    trades, quotes = random_feed(13, 2_000, 2_000, symbols=5)
    feed(sharded_db, trades, quotes, 5)  # several batches: the ad-hoc aggregate folds its changes
    end_time(sharded_db)
    m = merged(trades, quotes).dropna(subset=["bid"])
    m["notional"] = m["qty"] * m["bid"]
    m["window_start"] = (m["ts"] - BASE) // 10_000 * 10_000 + BASE
    per_window = m.groupby(["symbol", "window_start"]).agg(n=("notional", "sum"), c=("qty", "size")).reset_index()
    want = sorted((r.symbol, int(r.window_start), round(r.n, 6), int(r.c)) for r in per_window.itertuples())
    got = poll_rows(sub, ("symbol", "window_start", "n", "c"), len(want), timeout=20)
    assert sorted((s, ms(w), round(n, 6), c) for s, w, n, c in got) == want
    per_symbol = m.groupby("symbol").agg(n=("notional", "sum"), c=("qty", "size")).reset_index()
    result = sharded_db.query(
        "SELECT t.symbol, SUM(t.qty * q.bid) AS n, COUNT(*) AS c FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol GROUP BY t.symbol"
    )
    assert result.to_arrow().schema.names == ["symbol", "n", "c"]
    got = sorted((s, round(n, 6), c) for s, n, c in result.fetchall())
    assert got == sorted((r.symbol, round(r.n, 6), int(r.c)) for r in per_symbol.itertuples())


def test_the_join_state_stays_bounded_under_a_moving_watermark(sharded_db):
    """20,000 quotes over 10 symbols, time moving on: the ASOF join keeps about the latest
    quote per symbol plus those within the watermark's delay, and no trade waits once the
    watermark passed it; an inner join of the same inputs without a time bound keeps every
    row for its state_ttl (the metrics show what bounds each)."""
    setup(sharded_db)
    sharded_db.execute(
        "CREATE STREAM matched AS SELECT t.qty, q.bid FROM trades t "
        "ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol"
    )
    sharded_db.execute(
        "CREATE STREAM paired WITH (state_ttl = '1 hour') AS SELECT t.qty, q.bid FROM trades t "
        "JOIN quotes q ON t.symbol = q.symbol AND t.qty + q.bid < 0"
    )
    per_batch = 500
    for i in range(40):
        at = BASE + i * 1_000
        sharded_db.insert("quotes", [{"symbol": f"S{k % 10}", "ts": at + k, "bid": 1.0} for k in range(per_batch)])
        sharded_db.insert("trades", [{"symbol": f"S{k % 10}", "ts": at + k, "qty": k} for k in range(10)])
    asof = sharded_db.stream_metrics("matched")
    inner = sharded_db.stream_metrics("paired")
    # The quotes' watermark is 1 s behind the last: the last two batches' quotes, and one per
    # symbol before them.
    assert asof.join_right_rows <= 2 * per_batch + 10
    assert asof.join_left_rows <= 2 * 10
    assert (inner.join_left_rows, inner.join_right_rows) == (400, 40 * per_batch)
    text = sharded_db.metrics_text()
    assert f'laminardb_stream_join_right_rows{{stream="paired"}} {40 * per_batch}' in text


def test_left_asof_keeps_trades_with_a_null_key_or_time(db):
    setup(db)
    db.execute(
        "CREATE STREAM every_trade AS SELECT t.qty, q.bid FROM trades t "
        "LEFT ASOF JOIN quotes q MATCH_CONDITION(t.ts >= q.ts) ON t.symbol = q.symbol"
    )
    sub = db.subscribe_stream("every_trade")
    db.insert("quotes", [{"symbol": "A", "ts": BASE, "bid": 1.0}])
    db.insert("trades", [{"symbol": None, "ts": BASE + 10, "qty": 1}, {"symbol": "A", "ts": None, "qty": 2}, {"symbol": "A", "ts": BASE + 20, "qty": 3}])
    end_time(db, BASE + 60_000)
    assert sorted(poll_rows(sub, ("qty", "bid"), 3), key=repr) == sorted([(1, None), (2, None), (3, 1.0)], key=repr)


@pytest.mark.parametrize(
    "condition,direction,tolerance",
    [
        ("t.ts >= q.ts", "backward", None),
        ("t.ts >= q.ts", "backward", 1_000),
        ("t.ts <= q.ts", "forward", None),
        ("NEAREST(t.ts, q.ts)", "nearest", None),
    ],
    ids=["backward", "backward within 1 s", "forward", "nearest"],
)
def test_the_stream_equals_merge_asof_on_100_000_trades_and_quotes(condition, direction, tolerance):
    """The issue's check at its size: 100,000 random trades and 100,000 quotes over 200
    symbols, out of order within the watermark's delay, on 2 shards."""
    import pyarrow as pa

    conn = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    try:
        setup(conn)
        within = " AND t.ts - q.ts <= INTERVAL '1' SECOND" if tolerance else ""
        _, sub = matched_stream(conn, f"ASOF JOIN quotes q MATCH_CONDITION({condition}) ON t.symbol = q.symbol{within}")
        trades, quotes = random_feed(101, 100_000, 100_000, symbols=200, span_ms=600_000)
        schema_t = pa.schema([("symbol", pa.string()), ("ts", pa.timestamp("ms")), ("qty", pa.int64())])
        schema_q = pa.schema([("symbol", pa.string()), ("ts", pa.timestamp("ms")), ("bid", pa.float64())])
        as_table = lambda rows, schema: pa.Table.from_pylist(  # noqa: E731
            [{**r, "ts": pd.Timestamp(r["ts"], unit="ms")} for r in rows], schema=schema
        )
        t_table, q_table = as_table(trades, schema_t), as_table(quotes, schema_q)
        for k in range(0, 100_000, 5_000):
            conn.insert("quotes", q_table.slice(k, 5_000))
            conn.insert("trades", t_table.slice(k, 5_000))
        want = expected(trades, quotes, tolerance=tolerance, direction=direction)
        # Far past the 10 minutes of rows: a nearest match waits until no nearer quote can come.
        end_time(conn, BASE + 30 * 60_000)
        got = poll_rows(sub, ("symbol", "ts", "qty", "bid", "quote_ts"), len(want), timeout=60)
        assert len(want) > 90_000 if tolerance is None else len(want) > 50_000
        assert sorted((s, ms(ts), q, b, ms(qt)) for s, ts, q, b, qt in got) == want
    finally:
        conn.close()
