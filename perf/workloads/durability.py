"""Durability: what the WAL and checkpoints cost, and how long recovery takes (this build
only; the upstream wheel keeps nothing, so durable inserts are compared with this build's
in-memory ones in the same run).

Cases:
* single-row `db.insert` round trip (5,000 rows, --quick 1,000) on `:memory:`, with the
  WAL acknowledged after fdatasync (`wal_fsync=True`, the default) and after the direct
  write alone (`wal_fsync=False`);
* a 1 M-row Arrow insert (--quick 200 k) on the same three;
* recovery of 10 M events (--quick 1 M) inserted into a source feeding a GROUP BY stream by
  a child process that then dies without closing: reopen time = WAL replay, then the same
  after a close (reopen from the checkpoint taken at close); the stream's state must equal
  the sums over the recovered rows;
* checkpoints of ~1 MB and ~100 MB (--quick ~1 MB and ~10 MB): rows plus GROUP BY state over
  many keys; then an incremental one after 1,000 more rows.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import laminardb
import numpy as np
import pyarrow as pa

from workloads.common import Case, Context, new_histogram, record

AGG = "CREATE STREAM totals AS SELECT k, COUNT(*) AS n, SUM(v) AS s FROM events GROUP BY k"
SOURCE = "CREATE SOURCE events (id BIGINT, k BIGINT, v BIGINT)"


def table(start: int, rows: int, keys: int) -> pa.Table:
    i = np.arange(start, start + rows, dtype=np.int64)
    return pa.table({"id": i, "k": i % keys, "v": i % 1000})


def config(ctx: Context, **kw: Any) -> laminardb.LaminarConfig:
    if ctx.shards is not None:
        kw["shards"] = ctx.shards
    return laminardb.LaminarConfig(**kw)


def run(ctx: Context) -> None:
    tmp = tempfile.mkdtemp(prefix="laminardb-perf-")
    try:
        singles = 1_000 if ctx.quick else 5_000
        bulk = 200_000 if ctx.quick else 1_000_000
        for mode, fsync in (("memory", None), ("wal fsync", True), ("wal write", False)):
            ctx.run_case(f"single-row insert, {mode}", lambda c: single_rows(c, ctx, tmp, fsync, singles))
            ctx.run_case(f"{bulk // 1000}k-row Arrow insert, {mode}", lambda c: bulk_insert(c, ctx, tmp, fsync, bulk))
        events = 1_000_000 if ctx.quick else 10_000_000
        ctx.run_case(f"recovery of {events / 1e6:g} M events", lambda c: recovery(c, ctx, tmp, events))
        sizes = (1, 10) if ctx.quick else (1, 100)
        for mb in sizes:
            ctx.run_case(f"checkpoint of ~{mb} MB", lambda c: checkpoints(c, ctx, tmp, mb))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_mode(ctx: Context, tmp: str, fsync: bool | None) -> laminardb.Connection:
    if fsync is None:
        return laminardb.open(":memory:", config=config(ctx))
    return laminardb.open(tempfile.mkdtemp(dir=tmp), config=config(ctx, wal_fsync=fsync))


def single_rows(case: Case, ctx: Context, tmp: str, fsync: bool | None, n: int) -> None:
    db = open_mode(ctx, tmp, fsync)
    try:
        db.execute(SOURCE)
        hist = new_histogram()
        rows = [{"id": i, "k": i % 10, "v": i} for i in range(n)]
        start = time.perf_counter()
        for row in rows:
            t = time.perf_counter_ns()
            db.insert("events", row)
            record(hist, time.perf_counter_ns() - t)
        elapsed = time.perf_counter() - start
        case.check(db.query("SELECT COUNT(*) AS n FROM events").to_dicts()["n"] == [n], "row count")
        case.metric("p50", hist.get_value_at_percentile(50) / 1e3, "us", "lower")
        case.metric("p99", hist.get_value_at_percentile(99) / 1e3, "us", "lower")
        case.metric("inserts/s", n / elapsed, "rows/s", "higher")
        case.hist = hist.encode().decode()
    finally:
        db.close()


def bulk_insert(case: Case, ctx: Context, tmp: str, fsync: bool | None, rows: int) -> None:
    db = open_mode(ctx, tmp, fsync)
    try:
        db.execute(SOURCE)
        data = table(0, rows, 1000)
        start = time.perf_counter()
        db.insert("events", data)
        elapsed = time.perf_counter() - start
        case.check(db.query("SELECT COUNT(*) AS n FROM events").to_dicts()["n"] == [rows], "row count")
        case.metric("time", elapsed * 1e3, "ms", "lower")
        case.metric("rows/s", rows / elapsed, "rows/s", "higher")
    finally:
        db.close()


CHILD = r"""
import os, sys, numpy as np, pyarrow as pa, laminardb
path, events, shards = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = laminardb.LaminarConfig(shards=int(shards)) if shards != "-" else laminardb.LaminarConfig()
db = laminardb.open(path, config=cfg)
db.execute("CREATE SOURCE events (id BIGINT, k BIGINT, v BIGINT)")
db.execute("CREATE STREAM totals AS SELECT k, COUNT(*) AS n, SUM(v) AS s FROM events GROUP BY k")
step = 100_000
for start in range(0, events, step):
    i = np.arange(start, min(events, start + step), dtype=np.int64)
    db.insert("events", pa.table({"id": i, "k": i % 1000, "v": i % 1000}))
os._exit(0)
"""


def recovery(case: Case, ctx: Context, tmp: str, events: int) -> None:
    path = tempfile.mkdtemp(dir=tmp)
    shards = str(ctx.shards) if ctx.shards is not None else "-"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, path, str(events), shards], check=True, timeout=ctx.budget.left())
    case.metric("load (durable, child)", (time.perf_counter() - t) * 1e3, "ms", None)
    # The WAL alone (the dead child also left its spill files behind).
    wal_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(path, "wal")) for f in fs) / 2**20
    case.metric("WAL size", wal_mb, "MiB", None)
    t = time.perf_counter()
    db = laminardb.open(path, config=config(ctx))
    case.metric("reopen from WAL", (time.perf_counter() - t) * 1e3, "ms", "lower")
    case.metric("replayed events/s", events / (time.perf_counter() - t), "rows/s", "higher")
    check_state(case, db, events)
    t = time.perf_counter()
    db.close()  # takes a checkpoint
    case.metric("close (checkpoint)", (time.perf_counter() - t) * 1e3, "ms", None)
    t = time.perf_counter()
    db = laminardb.open(path, config=config(ctx))
    case.metric("reopen from checkpoint", (time.perf_counter() - t) * 1e3, "ms", "lower")
    check_state(case, db, events)
    db.close()


def check_state(case: Case, db: laminardb.Connection, events: int) -> None:
    got = db.query("SELECT SUM(n) AS n, SUM(s) AS s FROM totals").to_dicts()
    want = db.query("SELECT COUNT(*) AS n, SUM(v) AS s FROM events").to_dicts()
    case.check(want["n"] == [events], f"{want['n']} events recovered, not {events}")
    case.check(got == want, f"stream state {got} != sums over the rows {want}")


INCREMENTAL_REPEATS = 5


def checkpoints(case: Case, ctx: Context, tmp: str, mb: int) -> None:
    # ~110 bytes per key of rows + state: keys scale the size.
    keys = mb * 10_000
    db = laminardb.open(tempfile.mkdtemp(dir=tmp), config=config(ctx, checkpoint_interval_ms=3_600_000))
    try:
        db.execute(SOURCE)
        db.execute(AGG)
        db.insert("events", table(0, keys * 4, keys))
        t = time.perf_counter()
        db.checkpoint()
        full = time.perf_counter() - t
        m = db.metrics()
        case.metric("full checkpoint", full * 1e3, "ms", "lower")
        case.metric("dispatch held (barrier)", m.last_checkpoint_pause_ms, "ms", "lower")
        case.metric("written", m.last_checkpoint_bytes / 2**20, "MiB", None)
        # Each of these rewrites the stream's whole state (every group moved): the median
        # of several, this machine's disk being noisy.
        took = []
        for i in range(INCREMENTAL_REPEATS):
            db.insert("events", table(keys * 4 + i * 1_000, 1_000, keys))
            t = time.perf_counter()
            db.checkpoint()
            took.append(time.perf_counter() - t)
        case.metric("incremental checkpoint (+1,000 rows), median", statistics.median(took) * 1e3, "ms", "lower")
        case.metric("incremental written", db.metrics().last_checkpoint_bytes / 2**20, "MiB", None)
    finally:
        db.close()
