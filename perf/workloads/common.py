"""What the workloads share: the run context and its time budget, case records (one JSON
object per line on stdout, read by perf/harness.py), bounded waits on subscriptions, a
reader thread, and HDR histograms.

Everything here uses only the API that this build and the upstream wheel have in common.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import laminardb
import pyarrow as pa
from hdrh.histogram import HdrHistogram

# Round trips are recorded in nanoseconds: 1 ns resolution keeps 3 significant digits
# from 1 µs up to the 10 s ceiling.
HIST_LOWEST_NS = 1
HIST_HIGHEST_NS = 10_000_000_000
HIST_DIGITS = 3
# Latency percentiles reported for every histogram: (metric name, percentile).
PERCENTILES = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)]


class Unsupported(Exception):
    """The implementation under test lacks what the case needs (reported, not a failure)."""


@dataclass
class Metric:
    value: float
    unit: str
    better: Optional[str]  # "lower", "higher", or None for figures that are not compared


@dataclass
class Case:
    """One measured case of a workload. Only a case whose status stays "ok" counts."""

    name: str
    status: str = "ok"  # ok | wrong | no output | error | timeout | unsupported | pending
    detail: str = ""
    metrics: dict[str, Metric] = field(default_factory=dict)
    hist: Optional[str] = None  # the round-trip histogram, HdrHistogram-encoded (ns)

    def metric(self, name: str, value: float, unit: str, better: Optional[str]) -> None:
        self.metrics[name] = Metric(float(value), unit, better)

    def fail(self, status: str, detail: str) -> None:
        """Marks the case failed; the first failure sets the status, later ones add detail."""
        if self.status == "ok":
            self.status = status
            self.detail = detail
        else:
            self.detail += "; " + detail

    def check(self, condition: bool, detail: str) -> None:
        if not condition:
            self.fail("wrong", detail)


class Budget:
    """Wall-clock seconds a workload run may take, from its start."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())

    def cap(self, seconds: float) -> float:
        """seconds, or what is left of the budget if that is less."""
        return min(seconds, self.left())


@dataclass
class Context:
    quick: bool
    budget: Budget
    shards: Optional[int]  # set only for the harness's shard sweep (this build)

    def run_case(self, name: str, body: Callable[[Case], None]) -> Case:
        """Runs body(case) unless the budget is spent, turns exceptions into the case's
        status, and prints the case for the harness."""
        case = Case(name)
        if self.budget.left() <= 0:
            case.fail("timeout", f"not run: the workload's {self.budget.seconds:g} s budget was spent")
        else:
            try:
                body(case)
            except Unsupported as e:
                case.status, case.detail = "unsupported", str(e)
            except Exception as e:  # reported per case, so one failure does not hide the rest
                case.status = "error"
                case.detail = f"{type(e).__name__}: {e}".strip()[:300]
                traceback.print_exc()
        emit(case)
        return case


def emit(case: Case) -> None:
    print(json.dumps({"case": asdict(case)}), flush=True)


def open_db(shards: Optional[int]) -> laminardb.Connection:
    if shards is None:
        return laminardb.open(":memory:")
    try:
        config = laminardb.LaminarConfig(shards=shards)
    except TypeError as e:
        raise Unsupported("LaminarConfig(shards=…)") from e
    return laminardb.open(":memory:", config=config)


def open_filtered(shards: Optional[int]) -> laminardb.Connection:
    """A started database with a `trades` source and the filter stream `hot` over it."""
    db = open_db(shards)
    db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, ts BIGINT, "
        "WATERMARK FOR ts AS ts - INTERVAL '0' SECOND)"
    )
    db.execute("CREATE STREAM hot AS SELECT symbol, price, ts FROM trades WHERE price > 0")
    db.start()
    return db


def shard_count(db: laminardb.Connection) -> int:
    """This build's shard count; for an implementation without shards, every core."""
    return int(getattr(db, "shard_count", None) or os.cpu_count() or 1)


def poll(sub: laminardb.StreamSubscription, timeout_s: float) -> Optional[laminardb.QueryResult]:
    """The subscription's next batch, or None if none arrived within timeout_s.
    Raises EOFError if the subscription has ended."""
    try:
        batch = sub.next_timeout(max(1, round(timeout_s * 1000)))
    except laminardb.SubscriptionError:  # both implementations raise on a timeout
        return None
    if batch is None:
        raise EOFError("the subscription ended")
    return batch


class Collector(threading.Thread):
    """Reads a subscription on its own thread, as an application would, until `count` of
    the batches read reaches `expected`, or nothing has arrived for `stall_s` since the
    later of the last batch and `writer_done()`, or `deadline` (perf_counter) passes."""

    def __init__(
        self,
        sub: laminardb.StreamSubscription,
        expected: int,
        stall_s: float,
        deadline: float,
        count: Callable[[pa.Table], int] = lambda t: t.num_rows,
    ) -> None:
        super().__init__(daemon=True)
        self.sub = sub
        self.expected = expected
        self.stall_s = stall_s
        self.deadline = deadline
        self.count = count
        self.tables: list[pa.Table] = []
        self.counted = 0
        self.done_at: Optional[float] = None  # perf_counter when `expected` was reached
        self.last_at: Optional[float] = None
        self.writer_done_at: Optional[float] = None
        self.error: Optional[BaseException] = None

    def writer_done(self) -> None:
        self.writer_done_at = time.perf_counter()

    def run(self) -> None:
        try:
            while self.counted < self.expected:
                batch = poll(self.sub, 0.05)
                now = time.perf_counter()
                if batch is not None:
                    table = batch.to_arrow()
                    self.tables.append(table)
                    self.counted += self.count(table)
                    self.last_at = now
                    continue
                quiet_since = max(self.last_at or 0.0, self.writer_done_at or now)
                if now - quiet_since > self.stall_s or now > self.deadline:
                    return
            self.done_at = self.last_at
        except BaseException as e:  # re-raised by finish() on the measuring thread
            self.error = e

    def finish(self) -> pa.Table | None:
        """Waits for the reader; the batches it read as one table (None if none)."""
        self.join()
        if self.error is not None:
            raise self.error
        return pa.concat_tables(self.tables) if self.tables else None

    def complete(self, case: Case, what: str) -> bool:
        """Whether every expected `what` arrived; if not, the case fails saying how many did."""
        if self.counted >= self.expected:
            return True
        if not self.tables:
            case.fail("no output", f"no output in {self.stall_s:g} s")
        else:
            case.fail("wrong", f"{self.counted:,} of {self.expected:,} {what} arrived (then nothing for {self.stall_s:g} s)")
        return False


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOWEST_NS, HIST_HIGHEST_NS, HIST_DIGITS)


def record(hist: HdrHistogram, ns: int) -> None:
    hist.record_value(min(max(ns, HIST_LOWEST_NS), HIST_HIGHEST_NS))


def report_histogram(case: Case, hist: HdrHistogram) -> None:
    """Percentiles, max and count of a round-trip histogram as the case's metrics (µs)."""
    for name, pct in PERCENTILES:
        case.metric(name, hist.get_value_at_percentile(pct) / 1000, "µs", "lower")
    case.metric("max", hist.get_max_value() / 1000, "µs", "lower")
    case.metric("count", hist.get_total_count(), "", None)
    case.hist = hist.encode().decode("ascii")  # already base64
