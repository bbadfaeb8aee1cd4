"""Fuzzed SQL in child processes: no statement may crash the process or hang it.

Statements are the golden files' streams and queries mutated token by token (as in
test_sql_fuzz.py) plus depth and size mutations: expressions nested hundreds to thousands of
levels (operator chains, parentheses, function calls, CASE, UNION ALL, JOIN chains), huge
IN lists, long literals and identifiers, NUL and other control characters, odd numbers. Each
child runs a slice of them against the golden file's sources, writing each statement to a
progress file before it runs it, so a child that dies or stops answering names the
statement. A statement may be accepted or refused with any LaminarError other than
INTERNAL_ERROR; anything else is a failure.

    python python/tests/sql_fuzz_harness.py --count 2800 [--seed 1] [--per-child 100]

test_sql_fuzz.py runs a small count of it in the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|[A-Za-z_][A-Za-z_0-9]*|\d+(?:\.\d+)?|<=|>=|<>|!=|\|\||::|\S")
VOCABULARY = (
    "SELECT FROM WHERE GROUP BY HAVING ORDER LIMIT AS ON JOIN LEFT UNION ALL DISTINCT AND OR NOT "
    "NULL TRUE CASE WHEN THEN ELSE END CAST INTERVAL TUMBLE HOP SESSION CUMULATE EMIT WINDOW CLOSE "
    "UPDATE CHANGES EVERY FINAL AFTER WATERMARK ALLOW LATENESS COUNT SUM AVG MIN MAX FIRST_VALUE "
    "LAST_VALUE STDDEV ts window_start window_end ( ) , * + - / % = < > <= >= <> . 0 1 -1 "
    "2147483648 9223372036854775807 -9223372036854775808 1e308 'NaN' '' 'x' '1' SECOND MINUTE "
    "BIGINT DOUBLE VARCHAR TIMESTAMP TABLESAMPLE"
).split()
ODD_LITERALS = [
    "'\x00'",
    "'a\x00b'",
    '"c\x00"',
    "'\u202e\u0301'",
    "99999999999999999999999999999",
    "-0.0",
    "1e-400",
    "'" + "x" * 100_000 + "'",
    '"' + "y" * 10_000 + '"',
    "INTERVAL '99999999999' YEAR",
    "INTERVAL '-1' MILLISECOND",
    "CAST('abc' AS BIGINT)",
    "1 / 0",
    "9223372036854775807 + 1",
]

CHILD = r"""
import json, sys
import laminardb
sources, statements, progress = json.loads(sys.stdin.read())
db = laminardb.open(":memory:")
for sql in sources:
    try:
        db.execute(sql)
    except laminardb.LaminarError:
        pass
bad = []
with open(progress, "w", buffering=1) as log:
    for i, sql in enumerate(statements):
        log.write(json.dumps(i) + "\n")
        try:
            if sql.lstrip().upper().startswith("CREATE"):
                db.execute(sql)
            else:
                db.query(sql).to_arrow()
        except laminardb.LaminarError as e:
            if e.code == laminardb.codes.INTERNAL_ERROR:
                bad.append([i, "internal error: " + str(e)[:300]])
        except Exception as e:
            bad.append([i, type(e).__name__ + ": " + str(e)[:300]])
    try:
        db.execute("CREATE SOURCE fz_after (v BIGINT)")
        db.insert("fz_after", {"v": [1, 2, 3]})
        if db.query("SELECT SUM(v) AS s FROM fz_after").to_arrow().to_pylist() != [{"s": 6}]:
            bad.append([-1, "wrong answer after the fuzzed statements"])
    except Exception as e:
        bad.append([-1, "the connection stopped working: " + str(e)[:300]])
db.close()
print(json.dumps(bad))
"""


def golden_statements() -> list[tuple[list[str], list[str]]]:
    """Per golden file: its CREATE SOURCE/TABLE statements and its streams and queries."""
    sys.path.insert(0, str(HERE))
    from golden.runner import parse_file

    out = []
    for path in sorted(GOLDEN.glob("*.slt")):
        sources, others = [], []
        for record in parse_file(path):
            head = " ".join(record.sql.split()[:3]).upper() if record.sql else ""
            if record.kind == "statement" and head.startswith(("CREATE SOURCE", "CREATE TABLE")):
                sources.append(record.sql)
            elif record.kind == "statement" and head.startswith(("CREATE STREAM", "CREATE MATERIALIZED VIEW")):
                others.append(record.sql)
            elif record.kind == "query":
                others.append(record.sql)
        if sources and others:
            out.append((sources, others))
    return out


def deep(rng: random.Random) -> str:
    """An expression or query nested `n` levels, `n` from a few hundred to a few thousand."""
    n = rng.choice([100, 300, 600, 999, 1001, 2000, 5000])
    kind = rng.randrange(7)
    if kind == 0:
        return "SELECT " + " + ".join(["1"] * n) + " AS x"
    if kind == 1:
        return "SELECT 1 AS x WHERE " + " OR ".join(f"1 = {i}" for i in range(n))
    if kind == 2:
        return "SELECT " + "(" * n + "1" + ")" * n + " AS x"
    if kind == 3:
        return "SELECT " + "abs(" * n + "1" + ")" * n + " AS x"
    if kind == 4:
        return "SELECT " + "CASE WHEN true THEN " * n + "1" + " END" * n + " AS x"
    if kind == 5:
        return " UNION ALL ".join(["SELECT 1 AS x"] * n)
    return "SELECT " + "NOT " * n + "true AS x"


def wide(rng: random.Random) -> str:
    n = rng.choice([1000, 10_000, 50_000])
    kind = rng.randrange(3)
    if kind == 0:
        return f"SELECT 1 AS x WHERE 1 IN ({', '.join(map(str, range(n)))})"
    if kind == 1:
        return "SELECT " + ", ".join(f"{i} AS c{i}" for i in range(min(n, 5000)))
    return "SELECT " + "'" + "z" * n * 10 + "' AS s"


def mutate(sql: str, rng: random.Random, wild: bool = True) -> str:
    """One to three token edits (one or two when not `wild`): drop, double, swap with a
    neighbour, replace by a keyword, operator or literal; `wild` adds odd literals and runs
    of a token pair repeated hundreds of times (which deepen any operator chain)."""
    tokens = TOKEN.findall(sql)
    for _ in range(rng.randint(1, 3 if wild else 2)):
        if not tokens:
            break
        i = rng.randrange(len(tokens))
        kind = rng.randrange(6 if wild else 4)
        if kind == 0:
            del tokens[i]
        elif kind == 1:
            tokens.insert(i, tokens[i])
        elif kind == 2 and i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        elif kind == 4:
            tokens[i:i] = tokens[i : i + 2] * rng.choice([50, 400, 1500])
        elif kind == 5 or not wild:
            tokens[i] = rng.choice(VOCABULARY)
        else:
            tokens[i] = rng.choice(ODD_LITERALS)
    return " ".join(tokens)


def generate(count: int, seed: int) -> list[tuple[list[str], str]]:
    rng = random.Random(seed)
    files = golden_statements()
    out = []
    for n in range(count):
        sources, others = rng.choice(files)
        roll = rng.random()
        if roll < 0.15:
            sql = deep(rng)
        elif roll < 0.2:
            sql = wide(rng)
        else:
            sql = mutate(rng.choice(others), rng)
        # Fresh stream names, so accepted mutants do not refuse the next.
        sql = re.sub(r"(?i)^(\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:STREAM|MATERIALIZED\s+VIEW)\s+)(\w+)", rf"\g<1>fz_{n}", sql, count=1)
        out.append((sources, sql))
    return out


def run(count: int, seed: int, per_child: int, timeout_s: float, log=print) -> list[str]:
    """Runs `count` statements; returns the failures (empty when every child came back)."""
    cases = generate(count, seed)
    failures: list[str] = []
    groups: dict[tuple[str, ...], list[str]] = {}
    for sources, sql in cases:
        groups.setdefault(tuple(sources), []).append(sql)
    with tempfile.TemporaryDirectory() as tmp:
        progress = os.path.join(tmp, "progress")
        for sources, statements in groups.items():
            for start in range(0, len(statements), per_child):
                chunk = statements[start : start + per_child]
                payload = json.dumps([list(sources), chunk, progress])
                began = time.monotonic()
                try:
                    done = subprocess.run(
                        [sys.executable, "-c", CHILD],
                        input=payload,
                        capture_output=True,
                        text=True,
                        timeout=timeout_s,
                        env={**os.environ, "RUST_BACKTRACE": "0"},
                    )
                except subprocess.TimeoutExpired:
                    failures.append(f"seed {seed}: hang (> {timeout_s} s) at {last(progress, chunk)!r}")
                    continue
                if done.returncode != 0:
                    failures.append(
                        f"seed {seed}: the child died ({done.returncode}) at {last(progress, chunk)!r}: "
                        f"{done.stderr[-500:]}"
                    )
                    continue
                for i, why in json.loads(done.stdout.strip().splitlines()[-1]):
                    failures.append(f"seed {seed}: {why} for {(chunk[i] if i >= 0 else '')[:300]!r}")
                log(f"{len(chunk)} statements in {time.monotonic() - began:.1f} s, {len(failures)} failures so far")
    return failures


def last(progress: str, chunk: list[str]) -> str:
    try:
        lines = Path(progress).read_text().split()
        return chunk[json.loads(lines[-1])][:300]
    except (OSError, ValueError, IndexError):
        return "(before the first statement)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2800)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-child", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    args = parser.parse_args()
    began = time.monotonic()
    failures = run(args.count, args.seed, args.per_child, args.timeout)
    for f in failures:
        print("FAIL", f)
    print(f"{args.count} fuzzed statements (seed {args.seed}) in {time.monotonic() - began:.0f} s: "
          f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
