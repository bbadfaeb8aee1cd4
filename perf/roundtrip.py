"""The single-row round trip alone, without the harness: insert one row, take it from a
filter stream's subscription, repeat. Prints percentiles of the round trip and the engine's
own p50. `--gap` converts each received batch with pyarrow between round trips (~30 µs of
caller work on a 2-core VM), as the harness's row check does.

    .venv-perf/bin/python perf/roundtrip.py [--samples 20000] [--via db|writer] [--gap]
"""

from __future__ import annotations

import argparse
import array
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads.common import open_filtered  # noqa: E402

WARMUP = 1_000


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--samples", type=int, default=20_000)
    args.add_argument("--via", choices=["db", "writer"], default="db")
    args.add_argument("--gap", action="store_true", help="pyarrow conversion of each batch between round trips")
    opts = args.parse_args()
    db = open_filtered(None)  # the latency workload's source and filter stream
    sub = db.subscribe_stream("hot")
    writer = db.writer("trades")
    clock = time.perf_counter_ns
    # Preallocated: a growing list of ints would touch a fresh page every ~110 round
    # trips, and a first touch costs tens of µs on a VM (it showed up in the p99).
    took = array.array("q", bytes(8 * opts.samples))
    for i in range(opts.samples + WARMUP):
        row = {"symbol": "AAPL", "price": 100.0 + i % 7, "ts": i}
        t0 = clock()
        if opts.via == "writer":
            writer.insert(row)
        else:
            db.insert("trades", row)
        batch = sub.next_timeout(2000)
        t1 = clock()
        if opts.gap and batch.to_arrow().to_pylist() != [row]:
            raise SystemExit(f"round trip {i} returned another row")
        if i >= WARMUP:
            took[i - WARMUP] = t1 - t0
    took = sorted(took)
    engine = db.stream_metrics("hot").latency_p50_us
    db.close()
    quantiles = "  ".join(f"p{q:g} {took[min(len(took) - 1, int(len(took) * q / 100))] / 1000:.1f}" for q in (10, 50, 90, 99))
    print(f"{opts.via}.insert round trip µs: {quantiles}  (engine p50 {engine:.1f})")


if __name__ == "__main__":
    main()
