"""Single-row round trip: insert one row, wait for it on a filter stream's subscription.

Cases: `Writer.insert` (+ `flush()`, which the upstream wheel needs to send) and
`db.insert`, each on a fresh database. Every round trip (perf_counter_ns, from the insert
call until `next_timeout` returns the row) goes into an HDR histogram; the row received
must be the row sent. With this build's `stream_metrics('hot').latency_*_us` (engine time
from the insert entering Rust until the batch is published), the engine's share of p50.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Callable

from hdrh.histogram import HdrHistogram

from workloads.common import Case, Context, new_histogram, open_filtered, poll, record, report_histogram

WAIT_S = 2.0  # a round trip longer than this counts as missing
MAX_MISSING = 3  # then the case stops
WARMUP = 200  # round trips not recorded (or the first fifth of the case's time, if shorter)
CASES = ["Writer.insert", "db.insert"]
# This build's engine-side latency of the stream: (attribute, metric, unit).
ENGINE = [
    ("latency_p50_us", "engine p50", "µs"),
    ("latency_p99_us", "engine p99", "µs"),
    ("latency_p999_us", "engine p99.9", "µs"),
    ("latency_max_us", "engine max", "µs"),
    ("latency_count", "engine count", ""),
]


def run(ctx: Context) -> None:
    samples = 2_000 if ctx.quick else 20_000
    for i, name in enumerate(CASES):
        # A slow implementation gets an equal share of what is left, not hours.
        cap_s = ctx.budget.left() / (len(CASES) - i) * 0.9
        ctx.run_case(name, lambda case: round_trips(case, ctx, samples, cap_s))


def round_trips(case: Case, ctx: Context, samples: int, cap_s: float) -> None:
    with closing(open_filtered(ctx.shards)) as db:
        hist, sent, missing, mismatched = measure(db, case.name, samples, cap_s)
        metrics = db.stream_metrics("hot")
    if hist.get_total_count() == 0 and missing:
        case.fail("no output", f"no output in {WAIT_S:g} s")
        return
    case.check(missing == 0, f"{missing} of {sent:,} round trips got no row within {WAIT_S:g} s")
    case.check(mismatched == 0, f"{mismatched} of {sent:,} round trips returned another row than the one sent")
    report_histogram(case, hist)
    for attr, name, unit in ENGINE:
        value = getattr(metrics, attr, None)  # absent from the upstream wheel and older builds
        if value is not None:
            case.metric(name, value, unit, None)
    if "engine p50" in case.metrics:
        share = 100 * case.metrics["engine p50"].value / case.metrics["p50"].value
        case.metric("engine share of p50", share, "%", None)


def measure(db: Any, via: str, samples: int, cap_s: float) -> tuple[HdrHistogram, int, int, int]:
    """Round trips until `samples` are recorded or cap_s has passed (or too many are
    missing): the histogram, and how many were sent, missing and mismatched."""
    sub = db.subscribe_stream("hot")
    send: Callable[[dict], None]
    if via == "Writer.insert":
        writer = db.writer("trades")

        def send(row: dict) -> None:
            writer.insert(row)
            writer.flush()

    else:

        def send(row: dict) -> None:
            db.insert("trades", row)

    hist = new_histogram()
    start = time.perf_counter()
    warm_until = start + cap_s / 5
    missing = mismatched = sent = 0
    measuring = False
    while hist.get_total_count() < samples and time.perf_counter() - start < cap_s:
        measuring = measuring or sent >= WARMUP or time.perf_counter() > warm_until
        row = {"symbol": "AAPL", "price": 100.0 + sent % 7, "ts": sent}
        sent += 1
        t0 = time.perf_counter_ns()
        send(row)
        batch = poll(sub, WAIT_S)
        t1 = time.perf_counter_ns()
        if batch is None:
            missing += 1
            if missing > MAX_MISSING:
                break
            continue
        if batch.to_arrow().to_pylist() != [row]:
            mismatched += 1
        elif measuring:
            record(hist, t1 - t0)
    return hist, sent, missing, mismatched
