"""Differential test: a stream's result against the same SELECT run ad hoc over the same rows.

Each case is built from one seed: a small random schema (some names quoted and mixed-case),
random rows (NULLs, NaN, ±0.0, negative numbers) and a random stream query from a grammar
covering projection and filter expressions (and UNION ALL), GROUP BY (columns, a DOUBLE,
expressions, or none) with every aggregate streams support, TUMBLE / HOP / SESSION /
CUMULATE windows, every EMIT mode, and inner equi-joins with a second source. The rows go in ascending
event-time chunks (shuffled inside each chunk, so sessions merge and out-of-order rows
occur without any row being late), then a final watermark closes every window. Then:

* the stream's queryable state (`SELECT * FROM stream`),
* what its subscriber received (append streams: every row; changelog streams: the `_op`
  changelog folded into a state, every retraction matching a row emitted before),

must both equal the ad-hoc result exactly, except SUM/AVG/STDDEV/VAR of floats, compared
with a tight relative tolerance (summation order differs). Each case runs on 1 and on 2
shards.

`LAMINARDB_DIFF_CASES` sets the number of cases per shard count (default 150, a few seconds, well within a
minute); `LAMINARDB_DIFF_SEED` the first seed. A failure names its seed: rerun it alone
with `LAMINARDB_DIFF_SEED=<seed> LAMINARDB_DIFF_CASES=1`.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field

import pytest

import laminardb

CASES = int(os.environ.get("LAMINARDB_DIFF_CASES", "150"))
FIRST_SEED = int(os.environ.get("LAMINARDB_DIFF_SEED", "1000"))
FINAL_WATERMARK = 10**12
REL_TOL = 1e-9

# --------------------------------------------------------------------------- schema and rows


@dataclass
class Column:
    role: str  # "key_s", "key_i", "ts", "x" (DOUBLE), "n" (BIGINT)
    name: str
    sql_type: str

    @property
    def ref(self) -> str:
        return f'"{self.name}"' if self.name != self.name.lower() else self.name


NAMES = {
    "key_s": ["sym", "Sym", "Key Name"],
    "key_i": ["grp", "Grp"],
    "ts": ["ts", "EventTs"],
    "x": ["px", "Price"],
    "n": ["qty", "Qty"],
}
TYPES = {"key_s": "VARCHAR", "key_i": "BIGINT", "ts": "BIGINT", "x": "DOUBLE", "n": "BIGINT"}
FLOATS = [None, math.nan, 0.0, -0.0, 1.5, -2.25, 3.0, 10.0, -7.5, 1e10, 0.1]
INTS = [None, 0, 1, 2, -1, -3, 5, 7, 1000, -250]
STRINGS = [None, "a", "b", "B", "c", ""]
GROUPS = [None, 0, 1, -1, 2]


@dataclass
class Schema:
    table: str
    cols: dict[str, Column]

    @property
    def table_ref(self) -> str:
        return f'"{self.table}"' if self.table != self.table.lower() else self.table

    def c(self, role: str) -> str:
        return self.cols[role].ref


def make_schema(rng: random.Random, case: int) -> Schema:
    table = rng.choice([f"src{case}", f"Src{case}", f"Trades{case}"])
    cols = {role: Column(role, rng.choice(NAMES[role]), TYPES[role]) for role in NAMES}
    # Event time as epoch milliseconds in a BIGINT or a TIMESTAMP (both take ints).
    cols["ts"].sql_type = rng.choice(["BIGINT", "TIMESTAMP"])
    return Schema(table, cols)


def make_rows(rng: random.Random, schema: Schema) -> list[dict]:
    n = rng.randint(0, 24)
    times = sorted(rng.sample(range(-3000, 6000), n))
    rows = []
    for t in times:
        rows.append(
            {
                schema.cols["key_s"].name: rng.choice(STRINGS),
                schema.cols["key_i"].name: rng.choice(GROUPS),
                schema.cols["ts"].name: t,
                schema.cols["x"].name: rng.choice(FLOATS),
                schema.cols["n"].name: rng.choice(INTS),
            }
        )
    return rows


# --------------------------------------------------------------------------- the query grammar


def num_expr(rng: random.Random, s: Schema, depth: int = 0) -> str:
    x, n = s.c("x"), s.c("n")
    leaves = [x, n, x, n, "1", "2.5", "-3"]
    if depth >= 2 or rng.random() < 0.4:
        return rng.choice(leaves)
    a, b = num_expr(rng, s, depth + 1), num_expr(rng, s, depth + 1)
    return rng.choice(
        [
            f"({a} + {b})",
            f"({a} - {b})",
            f"({a} * {b})",
            f"(-({a}))",
            f"ABS({a})",
            f"COALESCE({a}, 0)",
            f"CASE WHEN {a} > {b} THEN {a} ELSE {b} END",
            f"({n} % 3)",
        ]
    )


def str_expr(rng: random.Random, s: Schema) -> str:
    k = s.c("key_s")
    return rng.choice([k, f"UPPER({k})", f"({k} || 'z')", f"COALESCE({k}, 'none')", f"CASE WHEN {s.c('x')} > 0 THEN 'pos' ELSE 'other' END"])


def predicate(rng: random.Random, s: Schema, depth: int = 0) -> str:
    x, n, k, g = s.c("x"), s.c("n"), s.c("key_s"), s.c("key_i")
    if depth < 1 and rng.random() < 0.3:
        a, b = predicate(rng, s, depth + 1), predicate(rng, s, depth + 1)
        return rng.choice([f"({a} AND {b})", f"({a} OR {b})", f"(NOT {a})"])
    return rng.choice(
        [
            f"{x} > 0",
            f"{x} <= 1.5",
            f"{x} <> {x}",
            f"{x} = 0",
            f"{n} IS NOT NULL",
            f"{n} BETWEEN -2 AND 7",
            f"{k} = 'b'",
            f"{k} IS NULL",
            f"{g} >= 0",
            f"{num_expr(rng, s)} < {num_expr(rng, s)}",
        ]
    )


@dataclass
class Query:
    select: str  # the SELECT, run ad hoc and as the stream's body
    suffix: str  # EMIT / ALLOW LATENESS clauses
    changelog: bool
    tolerant: list[bool] = field(default_factory=list)  # per output column
    every: bool = False
    # A global aggregate (no keys, no window): counts the rows it reads. Ad hoc and in
    # the stream's state it is one row even over no rows; its changelog starts with the
    # first row it reads.
    global_where: str | None = None
    # A join reads a second source of the same columns, named so.
    join_table: str | None = None


AGGS_FLOAT_TOL = {"SUM", "AVG", "STDDEV", "STDDEV_POP", "VAR", "VAR_POP"}


def aggregate(rng: random.Random, s: Schema, windowed: bool) -> tuple[str, bool]:
    """An aggregate call and whether its value is compared with a tolerance."""
    x, n, k = s.c("x"), s.c("n"), s.c("key_s")
    kinds = ["COUNT*", "COUNT", "SUM", "AVG", "MIN", "MAX", "COUNT DISTINCT", "STDDEV", "STDDEV_POP", "VAR", "VAR_POP"]
    if windowed:
        # FIRST/LAST follow event time in streams; ad hoc without a window DataFusion takes
        # its input order, which is not defined: compared over windows (unique times).
        kinds += ["FIRST_VALUE", "LAST_VALUE"]
    kind = rng.choice(kinds)
    if kind == "COUNT*":
        return "COUNT(*)", False
    numeric = rng.choice([x, n, num_expr(rng, s, 1)])
    while x not in numeric and n not in numeric:
        # Over a constant, DataFusion's COUNT(DISTINCT 3) reads 1 even over no rows (its
        # simplifier's doing, not SQL's): arguments name a column.
        numeric = num_expr(rng, s, 1)
    if kind in ("COUNT", "MIN", "MAX", "COUNT DISTINCT", "FIRST_VALUE", "LAST_VALUE"):
        arg = rng.choice([numeric, numeric, k])
    else:
        arg = numeric
    if kind == "COUNT DISTINCT":
        return f"COUNT(DISTINCT {arg})", False
    # Floats anywhere in the argument make SUM/AVG/… order-dependent in the last bits.
    return f"{kind}({arg})", kind in AGGS_FLOAT_TOL


def window_clause(rng: random.Random, s: Schema) -> str:
    ts = s.c("ts")
    kind = rng.choice(["TUMBLE", "HOP", "SESSION", "CUMULATE"])
    if kind == "TUMBLE":
        return rng.choice([f"TUMBLE({ts}, 1000)", f"TUMBLE({ts}, INTERVAL '2' SECOND)", f"TUMBLE({ts}, 700)"])
    if kind == "HOP":
        slide, size = rng.choice([(500, 1000), (1000, 3000), (400, 1000)])
        return f"HOP({ts}, {slide}, {size})"
    if kind == "SESSION":
        return f"SESSION({ts}, {rng.choice([150, 400, 900])})"
    step, size = rng.choice([(500, 2000), (1000, 3000)])
    return f"CUMULATE({ts}, {step}, {size})"


def alias(rng: random.Random, i: int) -> str:
    return rng.choice([f"c{i}", f'"Col{i}"'])


def make_query(rng: random.Random, s: Schema) -> Query:
    shape = rng.choice(["project", "group", "window", "window", "window", "join"])
    where = f" WHERE {predicate(rng, s)}" if rng.random() < 0.4 else ""
    if shape == "join":
        # An inner equi-join of the source with a second one of the same columns.
        other = f'"{s.table}R"'
        key = rng.choice(["key_s", "key_i", "x"])
        on = f"l.{s.c(key)} = r.{s.c(key)}"
        if rng.random() < 0.3:
            on += f" AND l.{s.c('n')} <= r.{s.c('n')}"
        picks = [f"l.{s.c(key)}", f"l.{s.c('x')}", f"r.{s.c('n')}", f"r.{s.c('ts')}", f"l.{s.c('key_s')}"]
        items = [f"{e} AS {alias(rng, i)}" for i, e in enumerate(rng.sample(picks, rng.randint(1, 4)))]
        select = f"SELECT {', '.join(items)} FROM {s.table_ref} l JOIN {other} r ON {on}"
        q = Query(select, "", False, [False] * len(items))
        q.join_table = f"{s.table}R"
        return q
    if shape == "project":
        items = []
        for i in range(rng.randint(1, 4)):
            e = rng.choice([num_expr(rng, s), str_expr(rng, s), s.c("ts"), s.c("key_i"), s.c("n")])
            items.append(f"{e} AS {alias(rng, i)}")
        select = f"SELECT {', '.join(items)} FROM {s.table_ref}{where}"
        if rng.random() < 0.25:
            select += f" UNION ALL SELECT {', '.join(items)} FROM {s.table_ref} WHERE {predicate(rng, s)}"
        return Query(select, "", False, [False] * len(items))
    windowed = shape == "window"
    # Group keys: columns (a DOUBLE one too: NaN and ±0.0 as keys), an expression; none
    # at all makes a global aggregate.
    candidates = [s.c("key_s"), s.c("key_i"), s.c("x"), f"ABS({s.c('key_i')})", f"({s.c('n')} % 2)"]
    keys = rng.sample(candidates, rng.choice([0, 1, 1, 2, 2]))
    items, tolerant = list(keys), [False] * len(keys)
    if windowed:
        items += ["window_start", "window_end"]
        tolerant += [False, False]
    for i in range(rng.randint(1, 4)):
        agg, tol = aggregate(rng, s, windowed)
        items.append(f"{agg} AS {alias(rng, i)}")
        tolerant.append(tol)
    group = list(keys) + ([window_clause(rng, s)] if windowed else [])
    having = ""
    if rng.random() < 0.25:
        having = rng.choice([" HAVING COUNT(*) > 1", f" HAVING SUM({s.c('n')}) > 0", f" HAVING MAX({s.c('x')}) >= 0"])
    group_by = f" GROUP BY {', '.join(group)}" if group else ""
    select = f"SELECT {', '.join(items)} FROM {s.table_ref}{where}{group_by}{having}"
    modes = ["", " EMIT CHANGES", " EMIT ON UPDATE", " EMIT EVERY INTERVAL '20' MILLISECOND"]
    if windowed:
        modes += [" EMIT AFTER WATERMARK", " EMIT ON WINDOW CLOSE", " EMIT FINAL"]
    mode = rng.choice(modes)
    changelog = (not windowed) or mode in (" EMIT CHANGES", " EMIT ON UPDATE") or "EVERY" in mode
    lateness = " ALLOW LATENESS INTERVAL '1' SECOND" if windowed and rng.random() < 0.25 else ""
    q = Query(select, mode + lateness, changelog, tolerant, every="EVERY" in mode)
    q.global_where = None if windowed or keys else f"SELECT COUNT(*) AS n FROM {s.table_ref}{where}"
    return q


# --------------------------------------------------------------------------- comparison


def same(a, b, tolerant: bool) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if tolerant:
            return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def sort_key(row: tuple, tolerant: list[bool]) -> tuple:
    # Exact columns first (keys, window bounds), as text that tells NaN, -0.0 and NULL apart.
    exact = tuple(repr(v) for v, t in zip(row, tolerant) if not t)
    return exact + tuple(repr(v) for v, t in zip(row, tolerant) if t)


def rows_equal(got: list[tuple], want: list[tuple], tolerant: list[bool]) -> bool:
    if len(got) != len(want):
        return False
    got = sorted(got, key=lambda r: sort_key(r, tolerant))
    want = sorted(want, key=lambda r: sort_key(r, tolerant))
    return all(len(g) == len(w) and all(same(a, b, t) for a, b, t in zip(g, w, tolerant)) for g, w in zip(got, want))


def fold(rows: list[tuple]) -> list[tuple]:
    """The state a changelog describes: `+I`/`+U` add a row, `-U`/`-D` take back one equal row."""
    state: list[tuple] = []
    for *vals, op in rows:
        vals = tuple(vals)
        if op in ("+I", "+U"):
            state.append(vals)
        elif op in ("-U", "-D"):
            at = next((i for i, r in enumerate(state) if all(same(a, b, False) for a, b in zip(r, vals))), None)
            assert at is not None, f"{op} of {vals}, which is not a current row: {state}"
            state.pop(at)
        else:
            raise AssertionError(f"unknown _op {op!r}")
    return state


def received(sub) -> list[tuple]:
    out = []
    while (batch := sub.try_next()) is not None:
        out.extend(tuple(r) for r in batch.fetchall())
    return out


# --------------------------------------------------------------------------- one case


def run_case(db, seed: int, case: int) -> str | None:
    """Runs one seeded case; returns a description of the mismatch, or None."""
    rng = random.Random(seed)
    s = make_schema(rng, case)
    rows = make_rows(rng, s)
    q = make_query(rng, s)
    stream = f"diff{case}"
    cols = ", ".join(f"{c.ref} {c.sql_type}" for c in s.cols.values())
    db.execute(f"CREATE SOURCE {s.table_ref} ({cols}, WATERMARK FOR {s.c('ts')})")
    other_rows = make_rows(rng, s) if q.join_table else []
    if q.join_table:
        db.execute(f'CREATE SOURCE "{q.join_table}" ({cols}, WATERMARK FOR {s.c("ts")})')
    ttl = " WITH (state_ttl = '1 hour')" if q.join_table else ""
    ddl = f"CREATE STREAM {stream}{ttl} AS {q.select}{q.suffix}"
    context = f"seed {seed}: {ddl}\nrows: {rows}" + (f"\n{q.join_table} rows: {other_rows}" if q.join_table else "")
    try:
        db.execute(ddl)
    except laminardb.LaminarError as e:
        return f"{context}\nthe stream was refused: {e}"
    sub = db.subscribe_stream(stream)
    got_sub: list[tuple] = []
    # Ascending event-time chunks, each shuffled: nothing is late, sessions still merge.
    i = 0
    while i < len(rows):
        j = min(len(rows), i + rng.randint(1, 8))
        chunk = rows[i:j]
        rng.shuffle(chunk)
        db.insert(s.table, chunk)
        got_sub += received(sub)
        i = j
    # The join's right side after the left, in two parts around more left rows' arrival:
    # each pair is emitted when its later row arrives, from either side.
    half = len(other_rows) // 2
    for part in (other_rows[:half], other_rows[half:]):
        if part:
            db.insert(q.join_table, part)
            got_sub += received(sub)
    db.writer(s.table).watermark(FINAL_WATERMARK)
    want = [tuple(r) for r in db.query(q.select).fetchall()]
    sub_want = want
    if q.global_where and db.query(q.global_where).fetchall() == [(0,)]:
        sub_want = []
    deadline = time.monotonic() + (3.0 if q.every else 0.5)
    while True:
        got_sub += received(sub)
        try:
            sub_rows = fold(got_sub) if q.changelog else got_sub
        except AssertionError as e:
            return f"{context}\nthe changelog does not fold: {e}"
        if rows_equal(sub_rows, sub_want, q.tolerant) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    state = [tuple(r) for r in db.query(f"SELECT * FROM {stream}").fetchall()]
    sub.cancel() if hasattr(sub, "cancel") else None
    problems = []
    if not rows_equal(state, want, q.tolerant):
        problems.append(f"stream state {sorted(state, key=repr)}")
    if not rows_equal(sub_rows, sub_want, q.tolerant):
        problems.append(f"subscriber {'(folded) ' if q.changelog else ''}{sorted(sub_rows, key=repr)}")
    db.execute(f"DROP STREAM {stream}")
    db.execute(f"DROP SOURCE {s.table_ref}")
    if q.join_table:
        db.execute(f'DROP SOURCE "{q.join_table}"')
    if problems:
        return f"{context}\nad hoc {sorted(want, key=repr)}\n" + "\n".join(problems)
    return None


@pytest.mark.parametrize("shards", [1, 2])
def test_streams_agree_with_the_same_query_ad_hoc(shards):
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=shards))
    try:
        db.start()
        mismatches = []
        for case in range(CASES):
            seed = FIRST_SEED + case
            problem = run_case(db, seed, case)
            if problem:
                mismatches.append(problem)
        print(f"shards={shards}: {CASES} comparisons, {len(mismatches)} mismatches")
        assert not mismatches, f"{len(mismatches)} of {CASES} cases differ on {shards} shard(s); first:\n" + mismatches[0]
    finally:
        db.close()
