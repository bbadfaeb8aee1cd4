"""Nexmark: bids, auctions and persons generated inside the shards, through the queries.

The `nexmark` source connector (this build) generates the standard auction model's events
on the shards themselves (1 person : 3 auctions : 46 bids, in event-time order, 10,000
events per second of event time), so Python is not the bottleneck. Each query runs as a
stream over N events (--quick 1 M, else 10 M); the time is from `start()` until the
query's stream watermark reaches the end of input (every event processed, every window
closed), and events/s counts the whole event stream (persons, auctions and bids), as
Nexmark figures do, whichever tables the query reads. Results are checked
against ad-hoc queries over the same generated rows (a join or a changelog aggregate
against the same query run ad hoc). Queries are written in our SQL as cascades of streams where the standard text
nests subqueries; a query the engine refuses reports the engine's reason. With --shards N
(the harness's sweep) only q1 runs.
"""

from __future__ import annotations

import time
from typing import Callable

from workloads.common import Case, Context, Unsupported, open_db, shard_count

END_OF_INPUT = 2**61 - 1  # the watermark a generator source reaches when it is done
PROPORTION = {"person": 1, "auction": 3, "bid": 46}


def source(table: str, events: int) -> str:
    return f"CREATE SOURCE {table} WITH (connector = 'nexmark', table = '{table}', events = '{events}')"


def rows_of(table: str, events: int) -> int:
    """Rows of `table` among events [0, events): each block of 50 is 1 person, then 3
    auctions, then 46 bids."""
    offsets = {"person": range(0, 1), "auction": range(1, 4), "bid": range(4, 50)}[table]
    return events // 50 * PROPORTION[table] + sum(1 for o in offsets if o < events % 50)


# name → (tables read, statements; the last creates the stream that is timed)
QUERIES: dict[str, tuple[list[str], list[str]]] = {
    "q0": (["bid"], ["CREATE STREAM q0 AS SELECT auction, bidder, price, date_time, extra FROM bid"]),
    "q1": (
        ["bid"],
        ["CREATE STREAM q1 AS SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bid"],
    ),
    "q2": (["bid"], ["CREATE STREAM q2 AS SELECT auction, price FROM bid WHERE auction % 123 = 0"]),
    "q3": (
        ["auction", "person"],
        [
            "CREATE STREAM q3 WITH (state_ttl = '1 hour') AS SELECT P.name, P.city, P.state, A.id FROM auction AS A "
            "INNER JOIN person AS P ON A.seller = P.id "
            "WHERE A.category = 10 AND (P.state = 'OR' OR P.state = 'ID' OR P.state = 'CA')"
        ],
    ),
    "q4": (
        ["auction", "bid"],
        [
            "CREATE STREAM q4_bids WITH (state_ttl = '1 hour') AS SELECT A.id, A.category, B.price FROM auction AS A JOIN bid AS B "
            "ON A.id = B.auction WHERE B.date_time BETWEEN A.date_time AND A.expires",
            "CREATE STREAM q4_final AS SELECT id, category, MAX(price) AS final FROM q4_bids GROUP BY id, category",
            "CREATE STREAM q4 AS SELECT category, AVG(final) AS avg_final FROM q4_final GROUP BY category",
        ],
    ),
    "q5": (
        ["bid"],
        [
            "CREATE STREAM q5_counts AS SELECT auction, COUNT(*) AS num, window_start, window_end FROM bid "
            "GROUP BY auction, HOP(date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)",
            # Each hop window's rows end at one window_end: a 2 s tumble over it groups exactly them.
            "CREATE STREAM q5_max AS SELECT window_start AS hop_end, MAX(num) AS maxn FROM q5_counts "
            "GROUP BY TUMBLE(window_end, INTERVAL '2' SECOND)",
            "CREATE STREAM q5 WITH (state_ttl = '1 hour') AS SELECT c.auction, c.num, c.window_end FROM q5_counts AS c JOIN q5_max AS m "
            "ON c.window_end = m.hop_end WHERE c.num >= m.maxn",
        ],
    ),
    "q7": (
        ["bid"],
        [
            "CREATE STREAM q7_max AS SELECT window_end, MAX(price) AS maxprice FROM bid "
            "GROUP BY TUMBLE(date_time, INTERVAL '10' SECOND)",
            "CREATE STREAM q7 AS SELECT B.auction, B.price, B.bidder, B.date_time FROM bid AS B "
            "JOIN q7_max AS M ON B.price = M.maxprice "
            "WHERE B.date_time BETWEEN M.window_end - INTERVAL '10' SECOND AND M.window_end",
        ],
    ),
    "q8": (
        ["person", "auction"],
        [
            "CREATE STREAM q8_p AS SELECT id, name, window_start FROM person "
            "GROUP BY id, name, TUMBLE(date_time, INTERVAL '10' SECOND)",
            "CREATE STREAM q8_a AS SELECT seller, window_start FROM auction "
            "GROUP BY seller, TUMBLE(date_time, INTERVAL '10' SECOND)",
            "CREATE STREAM q8 WITH (state_ttl = '1 hour') AS SELECT P.id, P.name, P.window_start FROM q8_p AS P "
            "JOIN q8_a AS A ON P.id = A.seller AND P.window_start = A.window_start",
        ],
    ),
}
# The query the shard sweep times (one query, so the plot compares like with like).
SWEEP = ["q1"]


def run(ctx: Context) -> None:
    events = 1_000_000 if ctx.quick else 10_000_000
    for name in SWEEP if ctx.shards is not None else list(QUERIES):
        ctx.run_case(name, lambda case, name=name: query(case, ctx, name, events))


def query(case: Case, ctx: Context, name: str, events: int) -> None:
    tables, statements = QUERIES[name]
    db = open_db(ctx.shards)
    try:
        for table in tables:
            try:
                db.execute(source(table, events))
            except Exception as e:
                raise Unsupported(f"no nexmark source: {e}") from None
        for sql in statements:
            try:
                db.execute(sql)
            except Exception as e:
                raise Unsupported(str(e).splitlines()[0][:200]) from None
        t0 = time.perf_counter()
        db.start()
        deadline = t0 + ctx.budget.cap(300.0)
        while db.stream_metrics(name).watermark < END_OF_INPUT:
            if time.perf_counter() > deadline:
                case.fail("timeout", f"the stream had not finished after {time.perf_counter() - t0:.0f} s")
                return
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        cores = shard_count(db)
        case.metric("events/s", events / elapsed, "events/s", "higher")
        case.metric("events/s per core", events / elapsed / cores, "events/s", "higher")
        case.metric("seconds", elapsed, "s", "lower")
        case.metric("shards", cores, "", None)
        m = db.stream_metrics(name)
        if getattr(m, "latency_count", 0):
            case.metric("engine p99", m.latency_p99_us, "µs", "lower")
        CHECKS[name](case, db, events)
    finally:
        db.close()


def scalar(db, sql: str):
    return db.query(sql).fetchall()[0][0]


def check_q0(case: Case, db, events: int) -> None:
    bids = rows_of("bid", events)
    case.check(scalar(db, "SELECT COUNT(*) FROM bid") == bids, "the bid source lacks rows")
    case.check(db.stream_metrics("q0").total_events == bids, f"q0 emitted {db.stream_metrics('q0').total_events:,} of {bids:,} bids")
    case.check(
        scalar(db, "SELECT SUM(price) FROM q0") == scalar(db, "SELECT SUM(price) FROM bid"), "q0's prices differ from the bids'"
    )


def check_q1(case: Case, db, events: int) -> None:
    bids = rows_of("bid", events)
    case.check(db.stream_metrics("q1").total_events == bids, "q1 lost rows")
    ours, want = scalar(db, "SELECT SUM(price) FROM q1"), 0.908 * scalar(db, "SELECT SUM(price) FROM bid")
    case.check(abs(ours - want) <= 1e-9 * abs(want), f"q1 sum {ours} != {want}")


def check_q2(case: Case, db, events: int) -> None:
    want = scalar(db, "SELECT COUNT(*) FROM bid WHERE auction % 123 = 0")
    got = db.stream_metrics("q2").total_events
    case.check(want > 0 and got == want, f"q2 emitted {got:,} rows, the bids hold {want:,}")


def same_as_ad_hoc(stream: str, sql: str, column: str) -> Callable[[Case, object, int], None]:
    """The stream's rows (for a changelog stream, its current rows) against the same query
    run ad hoc over the retained inputs: row count and the sum of one column."""

    def check(case: Case, db, events: int) -> None:
        got = db.query(f"SELECT COUNT(*), SUM({column}) FROM {stream}").fetchall()[0]
        want = db.query(f"SELECT COUNT(*), SUM({column}) FROM ({sql})").fetchall()[0]
        case.check(want[0] > 0, f"{stream}: the same query ad hoc finds no rows")
        # Sums of floats kept incrementally (with retractions) may differ in the last bits.
        same_sum = got[1] == want[1] or abs(got[1] - want[1]) <= 1e-9 * abs(want[1])
        case.check(got[0] == want[0] and same_sum, f"{stream}: {got} rows/sum, the same query ad hoc gives {want}")

    return check


CHECKS: dict[str, Callable[[Case, object, int], None]] = {
    "q0": check_q0,
    "q1": check_q1,
    "q2": check_q2,
    "q3": same_as_ad_hoc(
        "q3",
        "SELECT A.id FROM auction AS A JOIN person AS P ON A.seller = P.id "
        "WHERE A.category = 10 AND (P.state = 'OR' OR P.state = 'ID' OR P.state = 'CA')",
        "id",
    ),
    "q4": same_as_ad_hoc(
        "q4",
        "SELECT category, AVG(final) AS avg_final FROM (SELECT A.id, A.category, MAX(B.price) AS final "
        "FROM auction AS A JOIN bid AS B ON A.id = B.auction WHERE B.date_time BETWEEN A.date_time AND A.expires "
        "GROUP BY A.id, A.category) GROUP BY category",
        "avg_final",
    ),
    "q5": same_as_ad_hoc(
        "q5",
        "SELECT c.num FROM q5_counts AS c JOIN q5_max AS m ON c.window_end = m.hop_end WHERE c.num >= m.maxn",
        "num",
    ),
    "q7": same_as_ad_hoc(
        "q7",
        "SELECT B.price FROM bid AS B JOIN q7_max AS M ON B.price = M.maxprice "
        "WHERE B.date_time BETWEEN M.window_end - INTERVAL '10' SECOND AND M.window_end",
        "price",
    ),
    "q8": same_as_ad_hoc(
        "q8",
        "SELECT P.id FROM q8_p AS P JOIN q8_a AS A ON P.id = A.seller AND P.window_start = A.window_start",
        "id",
    ),
}
