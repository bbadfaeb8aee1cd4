"""Kill -9 crash harness for the WAL.

A child process opens a database directory, inserts rows with known ids from several
threads into a source feeding an aggregate stream, and prints every id whose insert()
returned. The parent kills it with SIGKILL at a random moment (drawn from the seed), lets
the next generation reopen and go on, and finally checks: every acknowledged id is present
exactly once, no id twice, and the aggregate stream equals the sums over the recovered rows.

    python python/tests/crash_harness.py --runs 100          # seeds 0..99
    python python/tests/crash_harness.py --seed 17 -v        # one seed again

With --damage, each run kills the writer once, then damages one WAL or checkpoint file at
random (cuts it, zeroes a range, flips a byte, or deletes it) and reopens: the open must
either bring back every acknowledged row exactly once or refuse with a message naming the
damaged file. A loss the open reports (a torn tail cut from the damaged file, logged and
counted) is counted apart: when the damage hit only the last writes of an owner's newest
segment and no later write proves them acknowledged, no log can tell it from a crash.

    python python/tests/crash_harness.py --damage --runs 100
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

CHILD = r"""
import sys, threading, laminardb
path, gen, threads, fsync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
every = int(sys.argv[5]) or None
cfg = laminardb.LaminarConfig(shards=2, wal_fsync=fsync, checkpoint_interval_ms=every)
db = laminardb.open(path, config=cfg)
db.execute("CREATE SOURCE IF NOT EXISTS events (id BIGINT, grp BIGINT, v BIGINT)")
db.execute("CREATE STREAM IF NOT EXISTS totals AS "
           "SELECT grp, COUNT(*) AS n, SUM(v) AS s FROM events GROUP BY grp")
print("ready", flush=True)
lock = threading.Lock()

def run(t):
    base = (gen * threads + t) * 1_000_000_000
    i = 0
    while True:
        n = 1 + (i % 7)
        ids = list(range(base + i, base + i + n))
        db.insert("events", {"id": ids, "grp": [x % 5 for x in ids], "v": [x % 1000 for x in ids]})
        line = "ack " + " ".join(map(str, ids)) + "\n"
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()
        i += n

for t in range(threads):
    threading.Thread(target=run, args=(t,), daemon=True).start()
threading.Event().wait()
"""


@dataclass
class Outcome:
    seed: int
    acked: int = 0
    present: int = 0
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    aggregate_mismatch: str = ""
    recovery_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.aggregate_mismatch)


def _generation(path: str, gen: int, threads: int, kill_after_s: float, fsync: bool, checkpoint_ms: int) -> set[int]:
    """Runs one child until killed; returns the ids it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, path, str(gen), str(threads), "1" if fsync else "0", str(checkpoint_ms)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: set[int] = set()
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready"):
                ready.set()
            elif line.startswith("ack "):
                acked.update(int(x) for x in line.split()[1:])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if not ready.wait(60):
        proc.kill()
        raise RuntimeError(f"child did not start: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(kill_after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t.join(10)
    return acked


def run_seed(seed: int, generations: int = 3, threads: int = 3, max_kill_s: float = 0.6,
             fsync: bool = True, directory: str | None = None) -> Outcome:
    import laminardb

    rng = random.Random(seed)
    # Odd seeds also take automatic checkpoints every 20-200 ms while rows pour in.
    checkpoint_ms = rng.randint(20, 200) if seed % 2 else 0
    out = Outcome(seed)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "db")
        acked: set[int] = set()
        for gen in range(generations):
            acked |= _generation(path, gen, threads, rng.uniform(0.0, max_kill_s), fsync, checkpoint_ms)
        out.acked = len(acked)
        db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2))
        try:
            out.recovery_ms.append(db.metrics().recovery_ms)
            ids = db.query("SELECT id, COUNT(*) AS c FROM events GROUP BY id").to_dicts()
            seen = dict(zip(ids["id"], ids["c"]))
            out.present = len(seen)
            out.lost = sorted(i for i in acked if i not in seen)[:20]
            out.duplicated = sorted(i for i, c in seen.items() if c != 1)[:20]
            want = db.query(
                "SELECT grp, COUNT(*) AS n, SUM(v) AS s FROM events GROUP BY grp ORDER BY grp"
            ).to_dicts()
            got = db.query("SELECT grp, n, s FROM totals ORDER BY grp").to_dicts()
            if want != got and (want["grp"] or got["grp"]):
                out.aggregate_mismatch = f"totals {got} != sums over events {want}"
        finally:
            db.close()
    return out


@dataclass
class DamageOutcome:
    seed: int
    damage: str = ""
    acked: int = 0
    outcome: str = ""  # "recovered", "refused", "short-reported", or a failure
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ("recovered", "refused", "short-reported")


def _damage(path: str, rng: random.Random) -> tuple[str, str]:
    """Damages one WAL segment, checkpoint file or the MANIFEST; returns (file, what)."""
    files = sorted(glob.glob(os.path.join(path, "wal", "*", "*.wal"))
                   + glob.glob(os.path.join(path, "data", "shard-*", "*"))
                   + glob.glob(os.path.join(path, "MANIFEST")))
    victim = rng.choice(files)
    size = os.path.getsize(victim)
    op = rng.choice(["truncate", "zero", "flip", "delete"])
    if op == "delete" or size == 0:
        os.remove(victim)
        return victim, "deleted"
    with open(victim, "r+b") as f:
        data = bytearray(f.read())
        if op == "truncate":
            at = rng.randrange(size)
            f.truncate(at)
            return victim, f"cut to {at} of {size} bytes"
        if op == "zero":
            at, n = rng.randrange(size), rng.randint(1, 2048)
            data[at:at + n] = bytes(len(data[at:at + n]))
            what = f"zeroed {len(data[at:at + n])} bytes at {at}"
        else:
            at = rng.randrange(size)
            data[at] ^= rng.randint(1, 255)
            what = f"flipped byte {at} of {size}"
        f.seek(0)
        f.write(data)
    return victim, what


def run_damage_seed(seed: int, threads: int = 3, max_kill_s: float = 0.6, directory: str | None = None) -> DamageOutcome:
    import logging

    import laminardb

    rng = random.Random(seed)
    checkpoint_ms = rng.randint(20, 200) if seed % 2 else 0
    out = DamageOutcome(seed)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "db")
        acked = _generation(path, 0, threads, rng.uniform(0.05, max_kill_s), True, checkpoint_ms)
        out.acked = len(acked)
        victim, what = _damage(path, rng)
        rel = os.path.relpath(victim, path)
        out.damage = f"{rel}: {what}"
        warnings: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        logger = logging.getLogger("laminardb")
        handler = Keep(logging.WARNING)
        logger.addHandler(handler)
        try:
            db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2))
        except laminardb.LaminarError as e:
            message = str(e)
            owner_dir = os.path.dirname(victim)
            named = (os.path.basename(victim) in message
                     or (victim.endswith(".wal") and owner_dir in message)
                     or (victim.endswith("MANIFEST") and "MANIFEST" in message))
            out.outcome = "refused" if named else "refused-unnamed"
            out.detail = message[:300]
            return out
        finally:
            logger.removeHandler(handler)
        try:
            got = db.query("SELECT id, COUNT(*) AS c FROM events GROUP BY id").to_dicts() if "events" in db.list_tables() else {"id": [], "c": []}
            seen = dict(zip(got["id"], got["c"]))
            lost = sorted(i for i in acked if i not in seen)
            dup = sorted(i for i, c in seen.items() if c != 1)
            if dup:
                out.outcome, out.detail = "duplicated", f"{dup[:10]}"
            elif not lost:
                out.outcome = "recovered"
            elif any(os.path.basename(victim) in w for w in warnings):
                out.outcome, out.detail = "short-reported", f"{len(lost)} lost; {warnings[:2]}"
            else:
                out.outcome, out.detail = "short-silent", f"{len(lost)} lost: {lost[:10]}; warnings {warnings[:2]}"
        finally:
            db.close()
    return out


def main_damage(args: argparse.Namespace) -> int:
    seeds = [args.seed] if args.seed is not None else list(range(args.runs))
    counts: dict[str, int] = {}
    failed = 0
    started = time.time()
    for seed in seeds:
        o = run_damage_seed(seed)
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
        failed += not o.ok
        if not o.ok or args.v:
            print(f"seed {seed}: acked={o.acked} damage=[{o.damage}] -> {o.outcome} {o.detail}")
    print(f"{len(seeds)} damage runs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + f"; {failed} failed, {time.time() - started:.0f} s")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="run this one seed")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--no-fsync", action="store_true", help="relaxed WAL mode (wal_fsync=False)")
    ap.add_argument("--damage", action="store_true", help="damage a file after the kill, then reopen")
    ap.add_argument("-v", action="store_true")
    args = ap.parse_args()
    if args.damage:
        return main_damage(args)
    seeds = [args.seed] if args.seed is not None else list(range(args.runs))
    failed = 0
    total_acked = 0
    started = time.time()
    for seed in seeds:
        o = run_seed(seed, generations=args.generations, fsync=not args.no_fsync)
        total_acked += o.acked
        if not o.ok or args.v:
            print(f"seed {seed}: acked={o.acked} present={o.present} lost={o.lost} dup={o.duplicated} "
                  f"{o.aggregate_mismatch} recovery_ms={o.recovery_ms}")
        failed += not o.ok
    print(f"{len(seeds)} runs x {args.generations} kills, {total_acked} acknowledged rows, "
          f"{failed} failed, {time.time() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
