"""WebSocket source → 1 s OHLC bars → WebSocket sink: the latency from the publisher's send
of the trade that closes a window to the subscriber's receipt of that window's bar.

laminardb (a `websocket` source in server mode, a `TUMBLE` stream, a `websocket` sink in
server mode) against the same relay in plain Python (a `websockets` server keeping the bars
in a dict), alternating in one run, each in a fresh process. The publisher sends one trade
per event-time second every `--gap-ms` of real time: each trade closes the previous second's
window, so each send is answered by one bar; the bar's values are checked.

    .venv-perf/bin/python perf/websocket_ohlc.py [--trades 2000] [--gap-ms 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings

# websockets 16+ prefers `with connect(…)`; the measurement holds two connections.
warnings.filterwarnings("ignore", "connect\\(\\) must be used as a context manager", DeprecationWarning)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trade(k: int) -> dict:
    # Second k of event time; price k: the bar of second k has open = close = k.
    return {"symbol": "S", "price": float(k), "qty": 1, "ts": k * 1000 + 1}


def serve_ours(source_port: int, sink_port: int) -> None:
    import laminardb

    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty BIGINT, ts BIGINT, WATERMARK FOR ts AS ts) "
        f"WITH (connector = 'websocket', mode = 'server', bind_address = '127.0.0.1:{source_port}')"
    )
    db.execute(
        "CREATE STREAM bars AS SELECT symbol, window_start, FIRST_VALUE(price) AS open, MAX(price) AS high, "
        "MIN(price) AS low, LAST_VALUE(price) AS close, SUM(qty) AS volume FROM trades "
        "GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND) EMIT ON WINDOW CLOSE"
    )
    db.execute(f"CREATE SINK bars_out FROM bars WITH (connector = 'websocket', bind_address = '127.0.0.1:{sink_port}')")
    db.start()
    print("ready", flush=True)
    sys.stdin.read()
    db.close()


def serve_baseline(source_port: int, sink_port: int) -> None:
    import asyncio

    from websockets.asyncio.server import serve

    subscribers: set = set()
    bars: dict = {}

    async def on_trade(ws):
        async for message in ws:
            t = json.loads(message)
            start = t["ts"] // 1000 * 1000
            for window in [w for w in bars if w + 1000 <= t["ts"]]:  # closed by this trade
                bar = bars.pop(window)
                text = json.dumps(bar)
                for sub in list(subscribers):
                    await sub.send(text)
            b = bars.get(start)
            if b is None:
                bars[start] = {"symbol": t["symbol"], "window_start": start, "open": t["price"], "high": t["price"],
                               "low": t["price"], "close": t["price"], "volume": t["qty"]}
            else:
                b["high"], b["low"] = max(b["high"], t["price"]), min(b["low"], t["price"])
                b["close"] = t["price"]
                b["volume"] += t["qty"]

    async def on_subscriber(ws):
        subscribers.add(ws)
        try:
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)

    async def main() -> None:
        async with serve(on_trade, "127.0.0.1", source_port), serve(on_subscriber, "127.0.0.1", sink_port):
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def measure(kind: str, trades: int, gap_ms: float) -> list[float]:
    from websockets.sync.client import connect

    source_port, sink_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "serve", kind, str(source_port), str(sink_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        subscriber = connect(f"ws://127.0.0.1:{sink_port}/", ping_interval=None)
        publisher = connect(f"ws://127.0.0.1:{source_port}/", ping_interval=None)
        time.sleep(0.3)
        sent: dict[int, int] = {}
        received: dict[int, int] = {}
        wrong: list = []

        def listen() -> None:
            while len(received) < trades - 1:
                try:
                    bar = json.loads(subscriber.recv(timeout=10))
                except TimeoutError:
                    return
                at = time.perf_counter_ns()
                start = bar["window_start"]
                start = start if isinstance(start, int) else int(start)
                k = start // 1000
                if (bar["open"], bar["close"], bar["volume"]) != (float(k), float(k), 1):
                    wrong.append(bar)
                received[k] = at

        listener = threading.Thread(target=listen)
        listener.start()
        for k in range(trades):
            message = json.dumps(trade(k))
            sent[k] = time.perf_counter_ns()
            publisher.send(message)
            time.sleep(gap_ms / 1000)
        listener.join()
        if wrong or len(received) < trades - 1:
            raise SystemExit(f"{kind}: wrong: {len(received)} of {trades - 1} bars, {len(wrong)} with wrong values ({wrong[:2]})")
        # The bar of second k is closed by trade k + 1.
        return [(received[k] - sent[k + 1]) / 1000 for k in range(trades - 1)]
    finally:
        server.stdin.close()
        server.wait(30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        kind, source_port, sink_port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        (serve_ours if kind == "ours" else serve_baseline)(source_port, sink_port)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--trades", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[list[float]]] = {"laminardb": [], "websockets relay (plain Python)": []}
    for _ in range(args.rounds):
        for label, kind in [("laminardb", "ours"), ("websockets relay (plain Python)", "baseline")]:
            us = sorted(measure(kind, args.trades, args.gap_ms))
            q = statistics.quantiles(us, n=100)
            results[label].append(us)
            print(f"{label}: p50 {q[49]:.0f} µs, p99 {q[98]:.0f} µs, max {us[-1]:.0f} µs ({len(us)} bars)", flush=True)
    for label, runs in results.items():
        p50 = statistics.median(statistics.quantiles(r, n=100)[49] for r in runs)
        p99 = statistics.median(statistics.quantiles(r, n=100)[98] for r in runs)
        print(f"median of runs, {label}: p50 {p50:.0f} µs, p99 {p99:.0f} µs")


if __name__ == "__main__":
    main()
