"""Market-data demo: trades for a few symbols stream into an embedded laminardb; a
continuous query turns them into 1-second OHLC + VWAP bars, printed live as each second's
bars close (when the watermark passes the window end).

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
        db.execute(
            """CREATE STREAM bars AS
               SELECT symbol, window_start,
                      FIRST_VALUE(price) AS open, MAX(price) AS high,
                      MIN(price) AS low, LAST_VALUE(price) AS close,
                      SUM(price * qty) / SUM(qty) AS vwap, COUNT(*) AS trades
               FROM trades
               GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)"""
        )
        bars = db.subscribe_stream("bars")
        print(f"laminardb {laminardb.__version__}: {db.shard_count} shards, source 'trades', stream 'bars'")
        in_bars = 0

        def show_closed_bars() -> None:
            nonlocal in_bars
            tables = []
            while (batch := bars.try_next()) is not None:
                tables.append(batch.to_arrow())
            if not tables:
                return
            closed = pa.concat_tables(tables).sort_by([("window_start", "ascending"), ("symbol", "ascending")])
            in_bars += sum(closed.column("trades").to_pylist())
            print(f"-- {closed.num_rows} bars closed (watermark {db.pipeline_watermark})")
            for row in closed.to_pylist():
                print(
                    f"   {row['window_start']:%H:%M:%S} {row['symbol']:<6} o={row['open']:9.4f} h={row['high']:9.4f} "
                    f"l={row['low']:9.4f} c={row['close']:9.4f} vwap={row['vwap']:9.4f} n={row['trades']}"
                )

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
            total += batch.num_rows
            tick += 1
            elapsed = time.time() - start
            print(f"[tick {tick}] {total:,} trades in {elapsed:.1f}s ({total / elapsed:,.0f} rows/s)")
            show_closed_bars()
            time.sleep(0.2)
        # End of the session: move event time past every open window so the last bars close.
        writer.watermark(int(time.time() * 1000) + 10_000)
        show_closed_bars()
        assert in_bars == total, (in_bars, total)
        print(f"\nchecked: the bars count exactly the {total:,} trades inserted")
        check = db.query("SELECT COUNT(*) AS n FROM trades").fetchone()
        assert check is not None and check[0] == total, (check, total)
        print(f"\nchecked: the source holds exactly the {total:,} trades inserted")


if __name__ == "__main__":
    main()
