"""Market-data demo: trades for a few symbols stream into an embedded laminardb, and
live per-symbol statistics (count, VWAP, high/low, last price) print as they accumulate.

    tools/demo [--seconds 5] [--symbols 8]
"""

from __future__ import annotations

import argparse
import random
import time

import pyarrow as pa

import laminardb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--symbols", type=int, default=8)
    parser.add_argument("--batch", type=int, default=20_000, help="trades per tick")
    args = parser.parse_args()

    symbols = [f"SYM{i:02d}" for i in range(args.symbols)]
    rng = random.Random(42)
    price = {s: 100.0 + 10 * i for i, s in enumerate(symbols)}

    with laminardb.open(":memory:") as db:
        db.execute(
            """CREATE SOURCE trades (
                   ts TIMESTAMP(3) NOT NULL,
                   symbol VARCHAR NOT NULL,
                   price DOUBLE NOT NULL,
                   qty BIGINT NOT NULL,
                   WATERMARK FOR ts AS ts - INTERVAL '100' MILLISECOND
               ) WITH (partition_key = 'symbol')"""
        )
        print(f"laminardb {laminardb.__version__}: {db.shard_count} shards, source 'trades'")
        writer = db.writer("trades")
        start = time.time()
        total = 0
        tick = 0
        while time.time() - start < args.seconds:
            now_ms = int(time.time() * 1000)
            syms, prices, qtys, stamps = [], [], [], []
            for j in range(args.batch):
                s = symbols[rng.randrange(len(symbols))]
                price[s] = max(1.0, price[s] * (1 + rng.gauss(0, 0.0005)))
                syms.append(s)
                prices.append(round(price[s], 4))
                qtys.append(rng.randrange(1, 500))
                stamps.append(now_ms + j // 1000)
            batch = pa.record_batch(
                {
                    "ts": pa.array(stamps, pa.timestamp("ms")),
                    "symbol": syms,
                    "price": prices,
                    "qty": qtys,
                }
            )
            writer.insert(batch)
            writer.watermark(now_ms)
            total += batch.num_rows
            tick += 1
            bars = db.query(
                """SELECT symbol,
                          COUNT(*) AS trades,
                          SUM(price * qty) / SUM(qty) AS vwap,
                          MIN(price) AS low,
                          MAX(price) AS high,
                          LAST_VALUE(price ORDER BY ts) AS last
                   FROM trades GROUP BY symbol ORDER BY symbol"""
            )
            elapsed = time.time() - start
            print(f"\n[tick {tick}] {total:,} trades in {elapsed:.1f}s "
                  f"({total / elapsed:,.0f} rows/s incl. queries); watermark {db.pipeline_watermark}")
            bars.show(max_rows=len(symbols))
            time.sleep(0.2)
        check = db.query("SELECT COUNT(*) AS n FROM trades").fetchone()
        assert check is not None and check[0] == total, (check, total)
        print(f"\nchecked: the source holds exactly the {total:,} trades inserted")


if __name__ == "__main__":
    main()
