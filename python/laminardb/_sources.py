"""Python sources: `@laminardb.source(schema=…)` and `Connection.register_source`. The
source is an ordinary one (`CREATE SOURCE`, so it is queryable, has watermarks when its
schema names `watermark`, and shows in `source_metrics()`); a daemon thread pulls the
generator and inserts what it yields, from `start()` on. An insert waits while the
engine's queues are full, so the generator is not pulled faster than the pipeline takes
rows. A generator cannot replay: after a restart it starts over (register it again)."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any, Callable, Optional

import pyarrow as pa

from laminardb import _laminardb

_MARK = "__laminardb_source__"


def source(
    schema: Any, *, watermark: Optional[str] = None, delay_ms: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Marks a generator function (or async generator function) as a source of rows of
    `schema` (a pyarrow schema or `{name: SQL type}`): it yields dicts, lists of dicts,
    RecordBatches, Tables or DataFrames. `watermark`: the event-time column, with
    `delay_ms` of allowed lateness."""

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, _MARK, {"schema": schema, "watermark": watermark, "delay_ms": delay_ms})
        return func

    return mark


def _columns(schema: Any) -> str:
    if isinstance(schema, dict):
        return ", ".join(f'"{n}" {t}' for n, t in schema.items())
    if isinstance(schema, pa.Schema):
        return ", ".join(f'"{f.name}" {_sql_type(f.type)}' for f in schema)
    raise TypeError(f"register_source: schema must be a pyarrow.Schema or a dict, not {type(schema).__name__}")


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "TIMESTAMP"
    simple = {
        pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INT", pa.int64(): "BIGINT",
        pa.float32(): "REAL", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN",
        pa.string(): "VARCHAR", pa.large_string(): "VARCHAR", pa.binary(): "BYTEA", pa.date32(): "DATE",
    }
    if t in simple:
        return simple[t]
    raise TypeError(f"register_source: no SQL type for {t}")


class _Feed:
    """Pulls one generator into one source, on a daemon thread."""

    def __init__(self, conn: Any, name: str, func: Callable[..., Any], on_error: Optional[Callable[[BaseException], None]]):
        self.conn = conn
        self.name = name
        self.func = func
        self.on_error = on_error
        self.thread = threading.Thread(target=self._run, name=f"laminardb-source-{name}", daemon=True)
        self.thread.start()

    def _started(self) -> bool:
        while not self.conn.is_closed:
            if self.conn.pipeline_state == "Running":
                return True
            time.sleep(0.005)
        return False

    def _put(self, item: Any) -> None:
        if isinstance(item, (pa.RecordBatch, pa.Table, dict, list)) or hasattr(item, "to_arrow") or hasattr(item, "to_dict"):
            if isinstance(item, list) and not item:
                return
            self.conn.insert(self.name, item)
        else:
            raise TypeError(f"source '{self.name}' yielded a {type(item).__name__}: yield dicts, lists of dicts, RecordBatches or DataFrames")

    def _fail(self, exc: BaseException) -> None:
        if self.conn.is_closed:
            return
        error = _laminardb.ConnectorError(f"python source '{self.name}': {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        try:
            self.conn._source_error(self.name, str(error))
        except Exception:
            pass
        if self.on_error is not None:
            self.on_error(error)

    def _run(self) -> None:
        if not self._started():
            return
        try:
            produced = self.func()
            if inspect.isasyncgen(produced):
                asyncio.run(self._drain_async(produced))
            else:
                for item in produced:
                    if self.conn.is_closed:
                        return
                    self._put(item)
        except Exception as exc:  # noqa: BLE001 - reported on the source, never raised into the thread
            self._fail(exc)

    async def _drain_async(self, produced: Any) -> None:
        async for item in produced:
            if self.conn.is_closed:
                return
            # The insert may wait for room: off the event loop's thread.
            await asyncio.to_thread(self._put, item)


def _register(conn: Any, name: str, func: Callable[..., Any], schema: Any, watermark: Optional[str], delay_ms: Optional[int], on_error: Any) -> None:
    spec = getattr(func, _MARK, None) or {}
    schema = schema if schema is not None else spec.get("schema")
    watermark = watermark if watermark is not None else spec.get("watermark")
    delay = delay_ms if delay_ms is not None else spec.get("delay_ms", 0)
    if not callable(func):
        raise _laminardb.ConnectorError(f"register_source('{name}', …): the source is not callable")
    if name not in conn.list_tables():
        if schema is None:
            raise _laminardb.ConnectorError(f"register_source('{name}', …) needs a schema (or a function decorated with @laminardb.source)")
        options = f" WITH (watermark_column = '{watermark}', watermark_delay_ms = '{int(delay)}')" if watermark else ""
        conn.execute(f'CREATE SOURCE "{name}" ({_columns(schema)}){options}')
    _Feed(conn, name, func, on_error)
