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


def _spec(func: Any) -> dict:
    """What `@laminardb.source` said of `func` (empty for an undecorated function)."""
    return getattr(func, _MARK, None) or {}


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
