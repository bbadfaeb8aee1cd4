"""Runs perf/streaming.py under this build (.venv-perf) and the upstream wheel
(.venv-upstream), alternating, and prints medians side by side with the ratio.

    tools/perf-setup                      # once: release wheel + upstream wheel
    .venv-perf/bin/python perf/compare.py [--rounds 3] [--quick]

A workload whose results did not check out prints as "wrong" (its speed is meaningless).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = {"laminardb": ROOT / ".venv-perf/bin/python", "upstream 0.17.0": ROOT / ".venv-upstream/bin/python"}
METRICS = [
    ("latency", "p50_us", "µs", "insert→filter stream→subscriber p50"),
    ("latency", "p99_us", "µs", "insert→filter stream→subscriber p99"),
    ("arrow_1m", "ms", "ms", "1M-row Arrow batch through a filter stream"),
    ("ohlc", "rows_per_s", "rows/s", "TUMBLE 1 s OHLC, 1,000 symbols"),
]


def run(python: Path, quick: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [str(python), str(ROOT / "perf/streaming.py"), "--json", out.name] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        return json.loads(Path(out.name).read_text())


def ok(result: dict, workload: str) -> bool:
    w = result[workload]
    return w.get("ok", w.get("n", 0) > 0 and w.get("missing", 0) == 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in IMPLS}
    for _ in range(args.rounds):
        for name, python in IMPLS.items():
            runs[name].append(run(python, args.quick))
    print(f"{'workload':<46} {'laminardb':>14} {'upstream':>14} {'upstream/ours':>14}")
    for workload, key, unit, label in METRICS:
        cells = []
        for name in IMPLS:
            good = [r[workload][key] for r in runs[name] if ok(r, workload)]
            cells.append(statistics.median(good) if good else None)
        ours, theirs = cells
        fmt = lambda v: "wrong/none" if v is None else f"{v:,.1f} {unit}"
        if ours is None or theirs is None:
            ratio = "-"
        elif unit == "rows/s":
            ratio = f"{ours / theirs:,.1f}x faster"
        else:
            ratio = f"{theirs / ours:,.1f}x faster"
        print(f"{label:<46} {fmt(ours):>14} {fmt(theirs):>14} {ratio:>14}")
    with open(ROOT / "perf/out/compare.json", "w") as f:
        json.dump(runs, f, indent=1)


if __name__ == "__main__":
    (ROOT / "perf/out").mkdir(exist_ok=True)
    main()
