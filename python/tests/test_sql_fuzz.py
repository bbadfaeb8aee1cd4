"""Seeded mutation fuzzing of the SQL front end.

Ad-hoc queries of the golden files are mutated the same way and run with `query()`. Every `CREATE STREAM` / `CREATE MATERIALIZED VIEW` of the golden files is mutated token by
token (one or two tokens dropped, doubled, swapped with a neighbour, or replaced by a
keyword, operator or literal) and executed against the golden file's sources and streams.
Each mutant must either be accepted or be refused with a `LaminarError` carrying a code
other than INTERNAL_ERROR (a panic or an internal error is a bug); then the file's rows and
watermarks run through every accepted mutant, and the connection must keep working
afterwards. `LAMINARDB_FUZZ_MUTANTS` raises the number of mutants per statement (default 20;
300 ran clean when this was written); a failure names the seed and the mutant.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

import laminardb
from golden.runner import GoldenFailure, Runner, parse_file
import sql_fuzz_harness

GOLDEN = Path(__file__).parent / "golden"
MUTANTS = int(os.environ.get("LAMINARDB_FUZZ_MUTANTS", "20"))
def statements(path: Path) -> tuple[list[str], list[str]]:
    """The file's CREATE SOURCE/TABLE statements, and its stream statements."""
    sources, streams = [], []
    for record in parse_file(path):
        if record.kind != "statement":
            continue
        head = " ".join(record.sql.split()[:3]).upper()
        if head.startswith(("CREATE SOURCE", "CREATE TABLE")):
            sources.append(record.sql)
        elif head.startswith(("CREATE STREAM", "CREATE MATERIALIZED VIEW")):
            streams.append(record.sql)
    return sources, streams


def mutate(sql: str, rng: random.Random) -> str:
    return sql_fuzz_harness.mutate(sql, rng, wild=False)


FILES = sorted(p for p in GOLDEN.glob("*.slt") if statements(p)[1])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_mutated_stream_sql_is_accepted_or_refused_with_a_code(path: Path):
    sources, streams = statements(path)
    seed = sum(path.name.encode())
    rng = random.Random(seed)
    db = laminardb.open(":memory:")
    try:
        for sql in sources:
            db.execute(sql)
        # The file's own streams too, so that mutants of cascades find their inputs.
        for sql in streams:
            try:
                db.execute(sql)
            except laminardb.LaminarError as e:  # e.g. a name the file drops and re-creates
                assert e.code != laminardb.codes.INTERNAL_ERROR, f"{sql!r}: {e}"
        for n, sql in enumerate(streams):
            # A fresh name per mutant, so an accepted one does not refuse the next.
            base = re.sub(r"(?i)^(\s*CREATE\s+(?:STREAM|MATERIALIZED\s+VIEW)\s+)(\w+)", r"\g<1>fz_NAME", sql, count=1)
            for m in range(MUTANTS):
                mutant = mutate(base, rng).replace("fz_NAME", f"fz_{n}_{m}")
                try:
                    db.execute(mutant)
                except laminardb.LaminarError as e:
                    assert e.code != laminardb.codes.INTERNAL_ERROR, f"seed {seed}: internal error for {mutant!r}: {e}"
                except Exception as e:  # anything but LaminarError is a bug
                    pytest.fail(f"seed {seed}: {type(e).__name__} for {mutant!r}: {e}")
        # The accepted mutants run: the file's rows and watermarks go through all of them.
        runner = Runner(db, path)
        for record in parse_file(path):
            if record.kind in ("insert", "watermark"):
                try:
                    getattr(runner, "do_" + record.kind)(record)
                except GoldenFailure as e:  # refused input is fine; an internal error is not
                    assert "code 900" not in str(e), f"seed {seed}: {e}"
        runner.close()
        # Still working: rows go in and a query over them is right.
        db.execute("CREATE SOURCE fz_after (v BIGINT)")
        db.insert("fz_after", {"v": [1, 2, 3]})
        assert db.query("SELECT SUM(v) AS s FROM fz_after").to_arrow().to_pylist() == [{"s": 6}]
    finally:
        db.close()


QUERY_FILES = sorted(p for p in GOLDEN.glob("*.slt") if any(r.kind == "query" for r in parse_file(p)))


@pytest.mark.parametrize("path", QUERY_FILES, ids=lambda p: p.name)
def test_mutated_ad_hoc_queries_are_answered_or_refused_with_a_code(path: Path):
    seed = sum(path.name.encode()) + 1
    rng = random.Random(seed)
    records = parse_file(path)
    db = laminardb.open(":memory:")
    runner = Runner(db, path)
    try:
        queries = []
        for record in records:
            if record.kind == "statement":
                try:
                    db.execute(record.sql)
                except laminardb.LaminarError as e:
                    assert e.code != laminardb.codes.INTERNAL_ERROR, f"{record.sql!r}: {e}"
            elif record.kind == "insert":
                try:
                    runner.do_insert(record)
                except GoldenFailure as e:
                    assert "code 900" not in str(e), str(e)
            elif record.kind == "query":
                queries.append(record.sql)
        for sql in queries:
            for _ in range(MUTANTS):
                mutant = mutate(sql, rng)
                try:
                    db.query(mutant).to_arrow()
                except laminardb.LaminarError as e:
                    assert e.code != laminardb.codes.INTERNAL_ERROR, f"seed {seed}: internal error for {mutant!r}: {e}"
                except Exception as e:
                    pytest.fail(f"seed {seed}: {type(e).__name__} for {mutant!r}: {e}")
        assert db.query("SELECT 1 + 1 AS two").to_arrow().to_pylist() == [{"two": 2}]
    finally:
        runner.close()
        db.close()


def test_fuzzed_statements_in_child_processes_never_crash_or_hang():
    """A small run of sql_fuzz_harness.py (depth, size and token mutations, in children):
    `python python/tests/sql_fuzz_harness.py --count 2800` is the full one."""
    count = int(os.environ.get("LAMINARDB_FUZZ_CHILD_STATEMENTS", "120"))
    failures = sql_fuzz_harness.run(count, seed=7, per_child=60, timeout_s=240, log=lambda _: None)
    assert failures == []
