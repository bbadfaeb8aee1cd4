"""python -m workloads NAME [--quick] [--budget SECONDS] [--shards N]   (from perf/)

Prints one JSON line {"info": …} about the implementation, then one {"case": …} per case.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

NAMES = ["latency", "ingest", "market", "nexmark", "adhoc", "durability"]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m workloads")
    ap.add_argument("name", choices=NAMES)
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer samples")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds the run may take")
    ap.add_argument("--shards", type=int, help="shard count (this build; market: bulk part only)")
    args = ap.parse_args()

    from workloads.common import Budget, Case, Context, emit  # after argparse: imports laminardb

    budget = Budget(args.budget)
    import laminardb

    module = importlib.import_module(f"workloads.{args.name}")
    info = {
        "version": laminardb.__version__,
        "module": laminardb.__file__,
        "python": sys.version.split()[0],
        "about": (module.__doc__ or "").strip().splitlines()[0],
    }
    print(json.dumps({"info": info}), flush=True)
    try:
        module.run(Context(quick=args.quick, budget=budget, shards=args.shards))
    except NotImplementedError as e:
        emit(Case(args.name, status="pending", detail=str(e)))


if __name__ == "__main__":
    main()
