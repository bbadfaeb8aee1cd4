"""The market workload's OHLC bulk case without the harness: the same 5 M trades (1,000
symbols, TUMBLE 1 s bars) inserted in 100,000-row Arrow batches, rows/s until the last
`insert()` returns (every closed window's bar is published by then), then the bars' trade
counts checked against the rows. No collector thread reads meanwhile, so this is the
engine's rate alone; the harness's `market` workload measures until its reader has every bar.

    .venv-perf/bin/python perf/ohlc.py [ROUNDS]
"""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import laminardb  # noqa: E402
from workloads.market import BARS, BATCH_ROWS, CLOSER_TS, SOURCE, make_trades  # noqa: E402

ROWS = 5_000_000


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    trades = make_trades(ROWS)
    batches = pa.Table.from_pandas(trades, preserve_index=False).to_batches(BATCH_ROWS)
    closer = pa.table({"symbol": ["CLOSE"], "price": [1.0], "qty": [1], "ts": [CLOSER_TS]})
    for _ in range(rounds):
        db = laminardb.open(":memory:")
        db.execute(SOURCE)
        db.execute(BARS)
        db.start()
        sub = db.subscribe_stream("bars")
        start = time.perf_counter()
        for batch in batches:
            db.insert("trades", batch)
        db.insert("trades", closer)
        took = time.perf_counter() - start
        counted = 0
        while (bars := sub.try_next()) is not None:
            counted += int(bars.to_arrow().column("trades").to_numpy().sum())
        shards = db.shard_count
        db.close()
        if counted != ROWS:
            raise SystemExit(f"the bars count {counted:,} trades, {ROWS:,} were inserted")
        print(f"{ROWS / took / 1e6:.2f} M rows/s, {ROWS / took / 1e6 / shards:.2f} M rows/s per core ({shards} shards)")


if __name__ == "__main__":
    main()
