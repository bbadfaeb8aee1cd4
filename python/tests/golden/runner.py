"""Parser and executor for laminardb's golden SQL files (`.slt`, sqllogictest style).

A file is a sequence of records separated by blank lines. Lines starting with `#` between
records are comments. Records:

    statement ok
    <SQL, may span lines until a blank line>

    statement error <code> [substring]
    <SQL>

    insert <source>
    <CSV header: column names>
    <CSV rows; empty field = NULL; (empty) = empty string>

    watermark <source> <epoch_ms>

    subscribe <stream>

    expect <stream> [rowsort] [within <ms>]
    ----
    <expected rows; none at all means "nothing was emitted">

    query [rowsort]
    <SQL>
    ----
    <expected rows>

    query error <code> [substring]
    <SQL>

    dropped <n>

    config <LaminarConfig keyword>=<integer> ...

`<code>` is a number (`400`) or a `laminardb.codes` name (`QUERY_FAILED`); the optional
substring must occur, case-sensitively, in `str(error)`.

Rows are printed as values joined by ` | `: NULL for null, true/false, ints as ints, floats
rounded to 6 decimal places and printed with `repr` (2.0, 0.333333, 1e+20, NaN, inf), TIMESTAMP
as `YYYY-MM-DD HH:MM:SS[.ffffff]` (UTC, no zone), DATE as `YYYY-MM-DD`, strings as they are and
the empty string as `(empty)`. `rowsort` sorts expected and actual rows by their text first.

Details:
- `#` lines are comments only between records; inside a record every line is SQL, CSV or a row.
- Trailing whitespace of expected and actual rows is ignored.
- `insert` CSV is parsed with Python's csv module (quotes, "" escapes; spaces after commas are
  skipped); values take the source's column types; TIMESTAMP accepts ISO text ('2024-01-01
  00:00:01', '2024-01-01T00:00:01.500', taken as UTC) or an integer of epoch milliseconds.
  The rows go in as one `conn.insert(source, pyarrow.Table)`.
- `watermark` keeps one `conn.writer(source)` per source for the whole file.
- `subscribe` on a stream already subscribed replaces (and cancels) the earlier subscription.
- `expect` drains `try_next()` until it returns None; what it read is consumed. With
  `within <ms>` it first waits (`next_timeout`) until as many rows as expected have arrived
  or `<ms>` have passed (the whole `<ms>` when it expects none): for output that processing
  time releases or holds back (idle sources).
- `config` sets LaminarConfig keywords for the file's connection (as well as `shards`); it
  must come before every other record.
- `statement` uses `conn.execute`, `query` uses `conn.query`.

Every file runs on a fresh in-memory connection, started with `start()` before the first record.

Run one file by hand, from `python/`:

    python -m tests.golden.runner tests/golden/ddl.slt --shards 1
    python tests/golden/runner.py tests/golden_pending/tumble.slt     # default shard count
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import decimal
import difflib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa

import laminardb

# `expect` drains a subscription until `try_next()` returns None; a stream that keeps
# producing batches for this long is a bug, reported rather than looped on forever.
EXPECT_BATCHES_MAX = 100_000

EMPTY_STRING = "(empty)"
SEPARATOR = " | "
RESULT_MARKER = "----"


class GoldenSyntaxError(Exception):
    """The `.slt` file itself is malformed."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{_display(path)}:{line}: {message}")


class GoldenFailure(AssertionError):
    """A record did not behave as the file says."""

    def __init__(self, path: Path, record: "Record", detail: str) -> None:
        self.path = path
        self.record = record
        self.detail = detail
        super().__init__(f"{_display(path)}:{record.line}: {record.text()}\n{detail}")


@dataclasses.dataclass
class CsvRow:
    line: int
    text: str


@dataclasses.dataclass
class Record:
    kind: str  # statement | statement_error | query | query_error | insert | watermark | subscribe | expect | dropped | config
    line: int
    directive: str
    sql: str = ""
    name: str = ""
    rowsort: bool = False
    expected: list[str] = dataclasses.field(default_factory=list)
    error_code: Optional[int] = None
    error_substring: str = ""
    number: int = 0
    header: Optional[CsvRow] = None
    within_ms: Optional[int] = None
    settings: dict[str, int] = dataclasses.field(default_factory=dict)
    rows: list[CsvRow] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        """The directive as written, with its SQL, for failure messages."""
        if self.sql:
            return f"{self.directive}\n{self.sql}"
        return self.directive


# --------------------------------------------------------------------------- parsing


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _is_blank(line: str) -> bool:
    return line.strip() == ""


def _error_code(path: Path, line: int, token: str) -> int:
    if re.fullmatch(r"\d+", token):
        return int(token)
    value = getattr(laminardb.codes, token.upper(), None)
    if not isinstance(value, int):
        raise GoldenSyntaxError(path, line, f"'{token}' is neither a number nor a laminardb.codes name")
    return value


def _error_spec(path: Path, line: int, rest: str) -> tuple[int, str]:
    parts = rest.strip().split(None, 1)
    if not parts:
        raise GoldenSyntaxError(path, line, "an error directive needs an error code")
    code = _error_code(path, line, parts[0])
    substring = parts[1].strip() if len(parts) > 1 else ""
    return code, substring


def _sort_flag(path: Path, line: int, words: Sequence[str]) -> bool:
    if not words:
        return False
    if list(words) == ["rowsort"]:
        return True
    raise GoldenSyntaxError(path, line, f"unexpected '{' '.join(words)}' (only 'rowsort' may follow)")


def parse_text(text: str, path: Path) -> list[Record]:
    lines = text.splitlines()
    records: list[Record] = []
    i = 0

    def block(start: int) -> tuple[list[tuple[int, str]], int]:
        """Lines from `start` to the next blank line, with 1-based numbers."""
        out = []
        j = start
        while j < len(lines) and not _is_blank(lines[j]):
            out.append((j + 1, lines[j].rstrip()))
            j += 1
        return out, j

    while i < len(lines):
        raw = lines[i]
        if _is_blank(raw) or raw.lstrip().startswith("#"):
            i += 1
            continue
        lineno = i + 1
        directive = raw.strip()
        words = directive.split()
        head = words[0]
        body, i = block(i + 1)

        def no_body() -> None:
            if body:
                raise GoldenSyntaxError(
                    path, body[0][0], f"'{head}' takes no body; end the record with a blank line"
                )

        def need_sql() -> str:
            if not body:
                raise GoldenSyntaxError(path, lineno, f"'{directive}' needs SQL on the following lines")
            return "\n".join(t for _, t in body)

        if head == "statement":
            if words[1:] == ["ok"]:
                records.append(Record("statement", lineno, directive, sql=need_sql()))
            elif len(words) >= 2 and words[1] == "error":
                code, sub = _error_spec(path, lineno, directive.split(None, 2)[2] if len(words) > 2 else "")
                records.append(
                    Record("statement_error", lineno, directive, sql=need_sql(), error_code=code, error_substring=sub)
                )
            else:
                raise GoldenSyntaxError(path, lineno, "expected 'statement ok' or 'statement error <code> [substring]'")
        elif head == "query":
            if len(words) >= 2 and words[1] == "error":
                code, sub = _error_spec(path, lineno, directive.split(None, 2)[2] if len(words) > 2 else "")
                sql = need_sql()
                if any(t.strip() == RESULT_MARKER for _, t in body):
                    raise GoldenSyntaxError(path, lineno, "'query error' has no '----' result section")
                records.append(Record("query_error", lineno, directive, sql=sql, error_code=code, error_substring=sub))
            else:
                rowsort = _sort_flag(path, lineno, words[1:])
                marks = [k for k, (_, t) in enumerate(body) if t.strip() == RESULT_MARKER]
                if not marks:
                    raise GoldenSyntaxError(path, lineno, "'query' needs SQL, then '----', then the expected rows")
                sql_lines = body[: marks[0]]
                if not sql_lines:
                    raise GoldenSyntaxError(path, lineno, "'query' has no SQL before '----'")
                records.append(
                    Record(
                        "query",
                        lineno,
                        directive,
                        sql="\n".join(t for _, t in sql_lines),
                        rowsort=rowsort,
                        expected=[t for _, t in body[marks[0] + 1 :]],
                    )
                )
        elif head == "expect":
            if len(words) < 2:
                raise GoldenSyntaxError(path, lineno, "'expect' needs a stream name")
            flags = words[2:]
            within_ms = None
            if len(flags) >= 2 and flags[-2] == "within":
                if not re.fullmatch(r"\d+", flags[-1]):
                    raise GoldenSyntaxError(path, lineno, "expected 'within <milliseconds>'")
                within_ms = int(flags[-1])
                flags = flags[:-2]
            rowsort = _sort_flag(path, lineno, flags)
            if not body or body[0][1].strip() != RESULT_MARKER:
                raise GoldenSyntaxError(path, lineno, "'expect <stream>' must be followed by a '----' line")
            records.append(
                Record(
                    "expect",
                    lineno,
                    directive,
                    name=words[1],
                    rowsort=rowsort,
                    expected=[t for _, t in body[1:]],
                    within_ms=within_ms,
                )
            )
        elif head == "config":
            no_body()
            if records:
                raise GoldenSyntaxError(path, lineno, "'config' must come before every other record")
            settings = {}
            for word in words[1:]:
                m = re.fullmatch(r"([a-z_]+)=(\d+)", word)
                if m is None:
                    raise GoldenSyntaxError(path, lineno, f"expected <keyword>=<integer>, got '{word}'")
                settings[m.group(1)] = int(m.group(2))
            if not settings:
                raise GoldenSyntaxError(path, lineno, "'config' needs at least one <keyword>=<integer>")
            records.append(Record("config", lineno, directive, settings=settings))
        elif head == "insert":
            if len(words) != 2:
                raise GoldenSyntaxError(path, lineno, "expected 'insert <source>'")
            if len(body) < 2:
                raise GoldenSyntaxError(path, lineno, "'insert' needs a CSV header line and at least one row")
            records.append(
                Record(
                    "insert",
                    lineno,
                    directive,
                    name=words[1],
                    header=CsvRow(*body[0]),
                    rows=[CsvRow(n, t) for n, t in body[1:]],
                )
            )
        elif head == "watermark":
            if len(words) != 3 or not re.fullmatch(r"-?\d+", words[2]):
                raise GoldenSyntaxError(path, lineno, "expected 'watermark <source> <epoch_ms>'")
            no_body()
            records.append(Record("watermark", lineno, directive, name=words[1], number=int(words[2])))
        elif head == "subscribe":
            if len(words) != 2:
                raise GoldenSyntaxError(path, lineno, "expected 'subscribe <stream>'")
            no_body()
            records.append(Record("subscribe", lineno, directive, name=words[1]))
        elif head == "dropped":
            if len(words) != 2 or not re.fullmatch(r"\d+", words[1]):
                raise GoldenSyntaxError(path, lineno, "expected 'dropped <n>'")
            no_body()
            records.append(Record("dropped", lineno, directive, number=int(words[1])))
        else:
            raise GoldenSyntaxError(path, lineno, f"unknown directive '{head}'")
    return records


def parse_file(path: Path) -> list[Record]:
    path = Path(path)
    return parse_text(path.read_text(encoding="utf-8"), path)


# --------------------------------------------------------------------------- values


def format_float(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    r = round(x, 6)
    if r == 0:
        r = 0.0  # no "-0.0"
    return repr(r)


def format_value(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_float(v)
    if isinstance(v, str):
        return v if v != "" else EMPTY_STRING
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return v.isoformat(sep=" ")
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, datetime.timedelta):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {format_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def to_arrow_table(result: Any) -> pa.Table:
    """A QueryResult (or any Arrow-exporting batch) as a pyarrow Table."""
    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    if hasattr(result, "to_arrow"):
        return result.to_arrow()
    return pa.table(result)


def format_rows(table: pa.Table) -> list[str]:
    columns = [c.to_pylist() for c in table.columns]
    return [SEPARATOR.join(format_value(col[i]) for col in columns) for i in range(table.num_rows)]


_INT_RE = re.compile(r"-?\d+")


def parse_timestamp(text: str) -> datetime.datetime:
    """'2024-01-01 00:00:01', '2024-01-01T00:00:01.500', or an integer of epoch milliseconds."""
    if _INT_RE.fullmatch(text):
        return datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=int(text))
    ts = datetime.datetime.fromisoformat(text)
    if ts.tzinfo is not None:
        ts = ts.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return ts


def parse_cell(text: str, field: pa.Field) -> Any:
    if text == "":
        return None
    t = field.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "" if text == EMPTY_STRING else text
    if pa.types.is_boolean(t):
        low = text.strip().lower()
        if low not in ("true", "false"):
            raise ValueError(f"'{text}' is not true/false")
        return low == "true"
    if pa.types.is_integer(t):
        return int(text.strip())
    if pa.types.is_floating(t):
        return float(text.strip())
    if pa.types.is_decimal(t):
        return decimal.Decimal(text.strip())
    if pa.types.is_timestamp(t):
        return parse_timestamp(text.strip())
    if pa.types.is_date(t):
        return datetime.date.fromisoformat(text.strip())
    return text


# --------------------------------------------------------------------------- execution


class Runner:
    """Runs the records of one file against one connection."""

    def __init__(self, conn: laminardb.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.subscriptions: dict[str, Any] = {}
        self.writers: dict[str, Any] = {}

    def fail(self, record: Record, detail: str) -> GoldenFailure:
        return GoldenFailure(self.path, record, detail)

    def run(self, records: Sequence[Record]) -> None:
        for record in records:
            getattr(self, "do_" + record.kind)(record)

    def close(self) -> None:
        for sub in self.subscriptions.values():
            try:
                sub.cancel()
            except Exception:
                pass
        for w in self.writers.values():
            try:
                w.close()
            except Exception:
                pass

    # ---- SQL

    def do_statement(self, r: Record) -> None:
        try:
            self.conn.execute(r.sql)
        except Exception as e:
            raise self.fail(r, f"expected success, got {_describe(e)}") from None

    def do_statement_error(self, r: Record) -> None:
        try:
            self.conn.execute(r.sql)
        except Exception as e:
            self.check_error(r, e)
        else:
            raise self.fail(r, f"expected error {r.error_code} {r.error_substring!r}, the statement succeeded")

    def do_query(self, r: Record) -> None:
        try:
            table = to_arrow_table(self.conn.query(r.sql))
        except Exception as e:
            raise self.fail(r, f"expected rows, got {_describe(e)}") from None
        self.compare(r, format_rows(table))

    def do_query_error(self, r: Record) -> None:
        try:
            rows = format_rows(to_arrow_table(self.conn.query(r.sql)))
        except Exception as e:
            self.check_error(r, e)
        else:
            shown = "\n".join("    " + x for x in rows) or "    (no rows)"
            raise self.fail(r, f"expected error {r.error_code} {r.error_substring!r}, the query returned:\n{shown}")

    def check_error(self, r: Record, e: Exception) -> None:
        if not isinstance(e, laminardb.LaminarError):
            raise self.fail(r, f"expected LaminarError code {r.error_code}, got {_describe(e)}") from None
        code = getattr(e, "code", None)
        if code != r.error_code:
            raise self.fail(r, f"expected error code {r.error_code}, got {_describe(e)}") from None
        if r.error_substring and r.error_substring not in str(e):
            raise self.fail(
                r, f"expected the error message to contain {r.error_substring!r}, got {_describe(e)}"
            ) from None

    # ---- ingestion

    def do_insert(self, r: Record) -> None:
        assert r.header is not None
        try:
            schema = self.conn.schema(r.name)
        except Exception as e:
            raise self.fail(r, f"cannot read the schema of '{r.name}': {_describe(e)}") from None
        header = [h.strip() for h in next(csv.reader([r.header.text], skipinitialspace=True))]
        for h in header:
            if schema.get_field_index(h) < 0:
                raise GoldenSyntaxError(
                    self.path, r.header.line, f"'{h}' is not a column of '{r.name}' ({', '.join(schema.names)})"
                )
        if len(set(header)) != len(header):
            raise GoldenSyntaxError(self.path, r.header.line, "a column is named twice in the CSV header")
        columns: list[list[Any]] = [[] for _ in header]
        for row in r.rows:
            cells = next(csv.reader([row.text], skipinitialspace=True))
            if len(cells) != len(header):
                raise GoldenSyntaxError(
                    self.path, row.line, f"{len(cells)} fields, the header has {len(header)}"
                )
            for k, (name, cell) in enumerate(zip(header, cells)):
                field = schema.field(name)
                try:
                    columns[k].append(parse_cell(cell, field))
                except ValueError as e:
                    raise GoldenSyntaxError(self.path, row.line, f"column '{name}' ({field.type}): {e}") from None
        table = pa.table({name: pa.array(col, type=schema.field(name).type) for name, col in zip(header, columns)})
        try:
            self.conn.insert(r.name, table)
        except Exception as e:
            raise self.fail(r, f"the insert failed: {_describe(e)}") from None

    def do_watermark(self, r: Record) -> None:
        try:
            writer = self.writers.get(r.name)
            if writer is None:
                writer = self.writers[r.name] = self.conn.writer(r.name)
            writer.watermark(r.number)
        except Exception as e:
            raise self.fail(r, f"advancing the watermark failed: {_describe(e)}") from None

    # ---- streams

    def do_subscribe(self, r: Record) -> None:
        subscribe = getattr(self.conn, "subscribe_stream", None)
        if subscribe is None:
            raise self.fail(r, "this build has no Connection.subscribe_stream()")
        old = self.subscriptions.pop(r.name, None)
        if old is not None:
            old.cancel()
        try:
            self.subscriptions[r.name] = subscribe(r.name)
        except Exception as e:
            raise self.fail(r, f"subscribe_stream('{r.name}') failed: {_describe(e)}") from None

    def do_expect(self, r: Record) -> None:
        sub = self.subscriptions.get(r.name)
        if sub is None:
            raise self.fail(r, f"no subscription to '{r.name}': add 'subscribe {r.name}' before this expect")
        rows: list[str] = []
        try:
            if r.within_ms is not None:
                deadline = time.monotonic() + r.within_ms / 1000
                while (not r.expected or len(rows) < len(r.expected)) and (left := deadline - time.monotonic()) > 0:
                    try:
                        batch = sub.next_timeout(max(1, int(left * 1000)))
                    except laminardb.LaminarError as e:
                        if getattr(e, "code", None) != laminardb.codes.SUBSCRIPTION_TIMEOUT:
                            raise
                        break
                    if batch is None:
                        break
                    rows.extend(format_rows(to_arrow_table(batch)))
            for _ in range(EXPECT_BATCHES_MAX):
                batch = sub.try_next()
                if batch is None:
                    break
                rows.extend(format_rows(to_arrow_table(batch)))
            else:
                raise self.fail(r, f"'{r.name}' kept emitting: more than {EXPECT_BATCHES_MAX} batches")
        except GoldenFailure:
            raise
        except Exception as e:
            raise self.fail(r, f"reading '{r.name}' failed: {_describe(e)}\nrows read before: {rows}") from None
        self.compare(r, rows)

    def do_config(self, r: Record) -> None:
        pass  # applied when the connection was opened (`run_file`)

    def do_dropped(self, r: Record) -> None:
        try:
            actual = self.conn.total_events_dropped
        except AttributeError:
            raise self.fail(r, "this build has no Connection.total_events_dropped") from None
        if actual != r.number:
            raise self.fail(r, f"expected total_events_dropped == {r.number}, got {actual}")

    # ---- comparison

    def compare(self, r: Record, actual: list[str]) -> None:
        expected = [line.rstrip() for line in r.expected]
        actual = [line.rstrip() for line in actual]
        if r.rowsort:
            expected = sorted(expected)
            actual = sorted(actual)
        if expected == actual:
            return
        diff = "\n".join(
            difflib.unified_diff(expected, actual, "expected", "actual", lineterm="", n=len(expected) + len(actual))
        )
        raise self.fail(
            r,
            f"expected {len(expected)} row(s){' (sorted)' if r.rowsort else ''}:\n{_indent(expected)}\n"
            f"actual {len(actual)} row(s){' (sorted)' if r.rowsort else ''}:\n{_indent(actual)}\n"
            f"diff:\n{diff}",
        )


def _indent(rows: Sequence[str]) -> str:
    return "\n".join("    " + x for x in rows) if rows else "    (no rows)"


def _describe(e: BaseException) -> str:
    code = getattr(e, "code", None)
    return f"{type(e).__name__}{f' [code {code}]' if code is not None else ''}: {e}"


def open_connection(shards: Optional[int], settings: Optional[dict[str, int]] = None) -> laminardb.Connection:
    """`shards=None` opens with the default configuration (all shards)."""
    settings = dict(settings or {})
    if shards is not None:
        settings["shards"] = shards
    if not settings:
        return laminardb.open(":memory:")
    return laminardb.open(":memory:", config=laminardb.LaminarConfig(**settings))


def run_file(path: Path | str, shards: Optional[int] = None) -> None:
    """Runs one `.slt` file on a fresh connection; raises GoldenFailure or GoldenSyntaxError."""
    path = Path(path)
    records = parse_file(path)
    settings = records[0].settings if records and records[0].kind == "config" else {}
    conn = open_connection(shards, settings)
    runner = Runner(conn, path)
    try:
        conn.start()
        runner.run(records)
    finally:
        runner.close()
        if not conn.is_closed:
            conn.close()


def _expand(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(p.rglob("*.slt")) if p.is_dir() else [p])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Run laminardb golden .slt files.")
    ap.add_argument("paths", nargs="+", help=".slt files or directories")
    ap.add_argument("--shards", type=int, default=None, help="shard count (default: the engine's default, all cores)")
    args = ap.parse_args(argv)
    failed = 0
    for path in _expand(args.paths):
        try:
            run_file(path, shards=args.shards)
        except (GoldenFailure, GoldenSyntaxError) as e:
            failed += 1
            print(f"FAIL {_display(path)}\n{e}\n", file=sys.stderr)
        else:
            print(f"ok   {_display(path)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
