"""Nexmark q3, q4, q7, q8, q9 on 1 and 2 shards (issue 24): events/s and events/s per core,
and the 2-shard speed-up, over the same generated events (the `nexmark` source inside the
shards). Each round runs every query on 1 shard, then on 2, alternating against the
machine's drift; medians of the rounds. Queries and their checks are the harness's
(`perf/workloads/nexmark.py`); this script only times them.

    python perf/nexmark_scaling.py [--events 10000000] [--rounds 3] [--queries q3,q4,q7,q8,q9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import laminardb

from workloads import nexmark


def run(name: str, shards: int, events: int) -> float:
    tables, statements = nexmark.QUERIES[name]
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    try:
        for table in tables:
            db.execute(nexmark.source(table, events))
        if name in nexmark.SETUP:
            nexmark.SETUP[name](db)
        for sql in statements:
            db.execute(sql.replace("{side_input}", nexmark.side_input()))
        start = time.perf_counter()
        db.start()
        while db.stream_metrics(name).watermark < nexmark.END_OF_INPUT:
            time.sleep(0.002)
        return events / (time.perf_counter() - start)
    finally:
        db.close()


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--events", type=int, default=10_000_000)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--queries", default="q3,q4,q7,q8,q9")
    opts = args.parse_args()
    names = opts.queries.split(",")
    results: dict[tuple[str, int], list[float]] = {}
    for r in range(opts.rounds):
        for name in names:
            for shards in (1, 2):
                rate = run(name, shards, opts.events)
                results.setdefault((name, shards), []).append(rate)
                print(f"round {r + 1} {name} shards={shards}: {rate / 1e6:.2f} M events/s", flush=True)
    print()
    print("| query | 1 shard (M events/s) | 2 shards (M events/s) | 2 shards per core | speed-up |")
    print("|---|---|---|---|---|")
    for name in names:
        one, two = (statistics.median(results[(name, s)]) for s in (1, 2))
        print(f"| {name} | {one / 1e6:.2f} | {two / 1e6:.2f} | {two / 2e6:.2f} | {two / one:.2f}× |")


if __name__ == "__main__":
    main()
