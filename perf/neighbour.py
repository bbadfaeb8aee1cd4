"""The single-row round trip beside busy neighbours: other processes spinning on the
host's cores, as an embedding application's own threads or another program would.

Runs perf/roundtrip.py with 0, 1 and 2 neighbours (each `python -c 'while True: pass'`,
pinned to core 0, then cores 0 and 1), once per engine setting, alternating, and prints the
percentiles side by side. Settings are environment variables of the engine
(`LAMINARDB_PIN_SHARDS=0` never pins shards; the spin variables of the README).

    .venv-perf/bin/python perf/neighbour.py [--rounds 3] [--samples 5000] \\
        [--setting default=] [--setting unpinned=LAMINARDB_PIN_SHARDS=0]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SPIN = "while True: pass"


def neighbours(count: int) -> list[subprocess.Popen]:
    procs = []
    for core in range(count):
        p = subprocess.Popen([sys.executable, "-c", SPIN])
        try:
            os.sched_setaffinity(p.pid, {core % os.cpu_count()})
        except OSError:
            pass
        procs.append(p)
    time.sleep(0.5)  # let them take their cores
    return procs


def roundtrip(env: dict[str, str], samples: int) -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "roundtrip.py"), "--samples", str(samples)],
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        return f"failed: {out.stderr[-300:]}"
    line = out.stdout.strip().splitlines()[-1]
    found = dict(re.findall(r"p(\d+) ([\d.]+)", line))
    return f"p50 {found.get('50', '?')}  p90 {found.get('90', '?')}  p99 {found.get('99', '?')} µs"


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--samples", type=int, default=5000)
    args.add_argument("--setting", action="append", default=None, help="name=VAR=value[,VAR=value]")
    opts = args.parse_args()
    settings = opts.setting or ["default=", "unpinned=LAMINARDB_PIN_SHARDS=0"]
    parsed = []
    for s in settings:
        name, _, rest = s.partition("=")
        env = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        parsed.append((name, env))
    for busy in (0, 1, 2):
        for r in range(opts.rounds):
            for name, env in parsed:
                procs = neighbours(busy)
                try:
                    result = roundtrip(env, opts.samples)
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
                print(f"{busy} busy neighbour(s), round {r + 1}, {name:>10}: {result}", flush=True)


if __name__ == "__main__":
    main()
