"""Sparse input: one trade every PACE ms into the market workload's TUMBLE(1 s) OHLC
stream, event time +250 ms a row, so every 4th row closes a window. Prints percentiles of
an insert that closes no window, one that closes a window, and the time from that insert
call until its bar arrives. Between rows every engine thread has time to stop polling and
sleep, so this shows what wake-ups cost; compare with longer polls, e.g.

    .venv-perf/bin/python perf/sparse.py [--pace-ms 2] [--rows 2000]
    LAMINARDB_SPIN_US=5000 LAMINARDB_COORD_SPIN_US=5000 LAMINARDB_CALLER_SPIN_US=5000 \\
        .venv-perf/bin/python perf/sparse.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads.common import open_db  # noqa: E402
from workloads.market import BARS, SOURCE  # noqa: E402


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--pace-ms", type=float, default=2.0)
    args.add_argument("--rows", type=int, default=2000)
    opts = args.parse_args()
    db = open_db(None)
    db.execute(SOURCE)
    db.execute(BARS)
    db.start()
    sub = db.subscribe_stream("bars")
    clock = time.perf_counter_ns
    plain: list[int] = []
    closing: list[int] = []
    bar: list[int] = []
    for k in range(1, opts.rows + 1):
        time.sleep(opts.pace_ms / 1000)
        ts = 100_000 + k * 250
        t0 = clock()
        db.insert("trades", {"symbol": "LIVE", "price": 100.0 + k % 13, "qty": 1, "ts": ts})
        t1 = clock()
        if ts % 1000:
            plain.append(t1 - t0)
            continue
        batch = sub.next_timeout(2000)
        bar.append(clock() - t0)
        got = batch.to_arrow().to_pylist()
        if [(r["symbol"], r["window_start"], r["trades"]) for r in got] != [("LIVE", ts - 1000, 4 if k > 4 else 3)]:
            raise SystemExit(f"row {k}: unexpected bars {got}")
        closing.append(t1 - t0)
    db.close()

    def quantiles(took: list[int]) -> str:
        took.sort()
        return " ".join(f"p{q} {took[min(len(took) - 1, len(took) * q // 100)] / 1000:.0f}" for q in (50, 90, 99))

    print(f"pace {opts.pace_ms:g} ms, µs: insert {quantiles(plain)} | closing insert {quantiles(closing)} | bar {quantiles(bar)}")


if __name__ == "__main__":
    main()
