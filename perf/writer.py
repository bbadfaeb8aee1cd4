"""Single rows from Python at feed rate (issue 23, item 7). Each case runs in a fresh
process of every interpreter given, rounds alternating and the order of interpreters
swapped every round (the first process of a round tends to lose):

* `writer`: `Writer.insert(dict)` one row at a time, 1 M prebuilt trade dicts, into a
  source read by a filter stream; rows/s counts until the closing `flush()` returned
  (every row stored and through the stream), and that `flush()`'s own time.
* `db`: `db.insert(dict)` one row at a time (read-your-writes per call).
* `visible`: one row at a time at rest: `Writer.insert(row)` then `flush()`; the pair's
  p50/p99 (the time until a row is visible to queries).

    python perf/writer.py --python .venv-perf/bin/python --python .venv-base/bin/python \
        [--rows 1000000] [--db-rows 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def rows(n: int) -> list[dict]:
    return [{"ts": i, "symbol": f"S{i % 100:02d}", "price": 100.0 + (i % 50) * 0.25, "qty": i % 500} for i in range(n)]


def open_db():
    import laminardb

    db = laminardb.open(":memory:")
    db.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE, qty BIGINT)")
    db.execute("CREATE STREAM big AS SELECT ts, symbol, price FROM trades WHERE qty > 400")
    return db


def count(db) -> int:
    return db.query("SELECT COUNT(*) AS n FROM trades").fetchall()[0][0]


def child(case: str, n: int) -> dict:
    db = open_db()
    data = rows(n)
    clock = time.perf_counter
    if case == "writer":
        w = db.writer("trades")
        insert = w.insert
        start = clock()
        for r in data:
            insert(r)
        queued = clock()
        w.flush()
        end = clock()
        assert count(db) == n, "rows missing"
        out = {"rows_per_s": n / (end - start), "queued_per_s": n / (queued - start), "flush_ms": (end - queued) * 1e3}
    elif case == "db":
        insert = db.insert
        start = clock()
        for r in data:
            insert("trades", r)
        end = clock()
        assert count(db) == n, "rows missing"
        out = {"rows_per_s": n / (end - start)}
    else:
        w = db.writer("trades")
        took = []
        for i, r in enumerate(data):
            t0 = time.perf_counter_ns()
            w.insert(r)
            w.flush()
            took.append(time.perf_counter_ns() - t0)
        took = sorted(took[1000:])
        out = {"p50_us": took[len(took) // 2] / 1e3, "p99_us": took[int(len(took) * 0.99)] / 1e3}
    db.close()
    return out


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--python", action="append", required="--child" not in sys.argv)
    args.add_argument("--rows", type=int, default=1_000_000)
    args.add_argument("--db-rows", type=int, default=200_000)
    args.add_argument("--visible-rows", type=int, default=20_000)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--timeout", type=float, default=300, help="seconds a case may take")
    args.add_argument("--child")
    opts = args.parse_args()
    if opts.child:
        n = {"writer": opts.rows, "db": opts.db_rows, "visible": opts.visible_rows}[opts.child]
        print(json.dumps(child(opts.child, n)))
        return
    results: dict = {}
    for round_ in range(opts.rounds):
        pythons = opts.python if round_ % 2 == 0 else list(reversed(opts.python))
        for case in ("writer", "db", "visible"):
            for py in pythons:
                cmd = [py, __file__, "--child", case, "--rows", str(opts.rows), "--db-rows", str(opts.db_rows),
                       "--visible-rows", str(opts.visible_rows)]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{py} {case}: over {opts.timeout} s, left out", flush=True)
                    continue
                if done.returncode != 0:
                    print(f"{py} {case}: failed\n{done.stderr[-2000:]}")
                    continue
                out = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"round {round_ + 1} {case} {py}: {out}", flush=True)
                for key, value in out.items():
                    results.setdefault((case, key), {}).setdefault(py, []).append(value)
    print(f"{'case':28}" + "".join(f"{p[:24]:>26}" for p in opts.python))
    for (case, key), per in results.items():
        cells = []
        for py in opts.python:
            values = per.get(py, [])
            med = statistics.median(values) if values else float("nan")
            cells.append(f"{med:>14,.1f} ({', '.join(f'{v:,.0f}' for v in values)})"[:26].rjust(26))
        print(f"{case + ' ' + key:28}" + "".join(cells))


if __name__ == "__main__":
    main()
