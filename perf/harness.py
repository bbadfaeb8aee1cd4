"""The benchmark harness: every workload under this build and under the upstream wheel,
in alternating runs, each run a fresh subprocess (`python -m workloads NAME` from perf/)
whose cases are read from its JSON lines. Writes perf/results/latest.json (every run and
the medians), perf/RESULTS.md and the plots in perf/results/.

    tools/perf run [--quick] [--rounds N] [--only w1,w2] [--ours PYTHON] [--baseline PYTHON] [--no-build]
    tools/perf report     # RESULTS.md and the plots again, from perf/results/latest.json

--baseline runs every run of ours (shard sweeps and ours-only workloads too) again under
another interpreter's laminardb right after it, as "baseline": e.g. the previous build, to
compare two builds in one noisy run (`tools/perf run --no-build --baseline .venv-prev/bin/python`).
Nothing is built for it: the baseline is whatever that interpreter has installed.
Medians count only runs whose checks passed; a run that fails its checks is "wrong".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import report
from report import BASELINE, OURS, UPSTREAM

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "perf"
RESULTS_DIR = PERF / "results"
LATEST = RESULTS_DIR / "latest.json"
UPSTREAM_PYTHON = ROOT / ".venv-upstream/bin/python"
OURS_BUDGET_S = 600.0  # a bound for hangs, far above a healthy run
UPSTREAM_BUDGET_S = 30.0  # a slow competitor gets this much per workload run
GRACE_S = 30.0  # start-up and data generation beyond the budget before a run is killed
# Set for both implementations' runs. The workloads do no BLAS work, but OpenBLAS's helper
# thread busy-waits after numpy's calls into it, holding one of two cores while the engine
# is timed (perf/README.md, "Session 13's machine").
RUN_ENV = {"OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Workload:
    name: str
    upstream: bool = True  # also run under the upstream wheel
    shard_sweep: tuple[int, ...] = ()  # extra runs of this build with --shards N
    pending: Optional[str] = None  # listed in RESULTS.md, never run


WORKLOADS = [
    Workload("latency"),
    Workload("ingest"),
    Workload("market", shard_sweep=(1, 2)),
    Workload("nexmark", shard_sweep=(1, 2)),
    Workload("adhoc"),
    Workload("durability", upstream=False),
]


def run_workload(python: str, workload: str, quick: bool, budget: float, shards: Optional[int]) -> dict[str, Any]:
    """One subprocess run: its info line, its cases, and an error if it crashed or was killed."""
    cmd = [python, "-m", "workloads", workload, "--budget", f"{budget:g}"]
    cmd += ["--quick"] if quick else []
    cmd += ["--shards", str(shards)] if shards is not None else []
    error = None
    started = time.perf_counter()
    if not Path(python).exists():
        stdout, error = "", f"missing interpreter {python} (tools/perf-setup makes it)"
    else:
        try:
            env = {**os.environ, **RUN_ENV}
            proc = subprocess.run(cmd, cwd=PERF, env=env, capture_output=True, text=True, timeout=budget + GRACE_S)
            stdout = proc.stdout
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
                error = f"exit {proc.returncode}: {last}"[:300]
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
            error = f"killed after {budget + GRACE_S:g} s"
    info: dict[str, Any] = {}
    cases: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "info" in record:
            info = record["info"]
        elif "case" in record:
            cases.append(record["case"])
    return {
        "info": info,
        "cases": cases,
        "error": error,
        "seconds": round(time.perf_counter() - started, 3),
        "variant": f"shards={shards}" if shards is not None else "",
    }


def jobs(workload: Workload, ours: str, baseline: Optional[str]) -> list[tuple[str, str, float, Optional[int]]]:
    """One round of a workload: (impl, python, budget, shards), alternating implementations;
    each run of ours followed by the same run of the baseline, if any."""
    out: list[tuple[str, str, float, Optional[int]]] = []
    for shards in (None, *workload.shard_sweep):
        out.append((OURS, ours, OURS_BUDGET_S, shards))
        if baseline:
            out.append((BASELINE, baseline, OURS_BUDGET_S, shards))
        if shards is None and workload.upstream:
            out.append((UPSTREAM, str(UPSTREAM_PYTHON), UPSTREAM_BUDGET_S, None))
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    memory = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    rev = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": rev + (" (uncommitted changes)" if dirty else ""),
    }


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def short(line: str) -> str:
    return line if len(line) <= 60 else line[:57] + "…"


def describe(run: dict[str, Any]) -> str:
    parts = [f"{c['name']} {c['status']}" for c in run["cases"]]
    if run["error"]:
        parts.append(f"run failed: {short(run['error'])}")
    return ", ".join(parts)


def command_line(argv: list[str]) -> str:
    return os.environ.get("LAMINARDB_PERF_COMMAND") or shlex.join(["python", "perf/harness.py", *argv])


def run(args: argparse.Namespace, argv: list[str]) -> None:
    selected = [w for w in WORKLOADS if args.only is None or w.name in args.only]
    ours = os.path.abspath(args.ours)  # not resolve(): a venv's python is a symlink
    if not Path(ours).exists():
        sys.exit(f"no interpreter at {args.ours}: run tools/perf without --no-build, or pass --ours")
    baseline = os.path.abspath(args.baseline) if args.baseline else None
    if baseline and not Path(baseline).exists():
        sys.exit(f"no interpreter at {args.baseline} (--baseline)")
    runs: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        for workload in selected:
            if workload.pending:
                continue
            for impl, python, budget, shards in jobs(workload, ours, baseline):
                result = run_workload(python, workload.name, args.quick, budget, shards)
                result.update(round=r, workload=workload.name, impl=impl)
                runs.append(result)
                label = f"{workload.name}" + (f" [{result['variant']}]" if result["variant"] else "")
                print(f"round {r}/{args.rounds}  {label:<20} {impl:<10} {result['seconds']:7.1f} s  {describe(result)}", flush=True)
    budgets = {OURS: OURS_BUDGET_S, UPSTREAM: UPSTREAM_BUDGET_S}
    pythons = {OURS: os.path.relpath(ours, ROOT), UPSTREAM: os.path.relpath(UPSTREAM_PYTHON, ROOT)}
    if baseline:
        budgets[BASELINE] = OURS_BUDGET_S
        pythons[BASELINE] = os.path.relpath(baseline, ROOT)
    doc = {
        "command": command_line(argv),
        "machine": machine(),
        "options": {"quick": args.quick, "rounds": args.rounds, "budget_s": budgets, "env": RUN_ENV},
        "pythons": pythons,
        "workloads": [{"name": w.name, "pending": w.pending} for w in selected],
        "runs": runs,
    }
    doc["summary"] = report.summarise(doc)
    RESULTS_DIR.mkdir(exist_ok=True)
    LATEST.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {os.path.relpath(LATEST, ROOT)}")
    write_report(doc)


def write_report(doc: dict[str, Any]) -> None:
    markdown = report.markdown(doc, report.plots(doc, RESULTS_DIR))
    (PERF / "RESULTS.md").write_text(markdown)
    print("wrote perf/RESULTS.md and the plots in perf/results/\n")
    print(markdown)


def main() -> None:
    argv = sys.argv[1:]
    ap = argparse.ArgumentParser(prog="tools/perf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run_ap = sub.add_parser("run", help="run the workloads, write results and RESULTS.md")
    run_ap.add_argument("--quick", action="store_true", help="smaller data and fewer samples")
    run_ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    run_ap.add_argument(
        "--only",
        type=lambda s: s.split(","),
        help="comma-separated workloads: " + ",".join(w.name for w in WORKLOADS),
    )
    run_ap.add_argument("--ours", default=str(ROOT / ".venv-perf/bin/python"), help="python with this build")
    run_ap.add_argument("--baseline", help="python with another build of ours, run after each run of ours (nothing is built)")
    sub.add_parser("report", help="rewrite RESULTS.md and the plots from perf/results/latest.json")
    args = ap.parse_args(argv)
    if args.command == "report":
        doc = json.loads(LATEST.read_text())
        doc["summary"] = report.summarise(doc)
        write_report(doc)
        return
    unknown = set(args.only or []) - {w.name for w in WORKLOADS}
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    run(args, argv)


if __name__ == "__main__":
    main()
