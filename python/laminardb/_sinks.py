"""Python sinks: `@laminardb.sink(name=…)` and `Connection.register_sink`, used by
`CREATE SINK … WITH (connector = 'python', name = '…')`."""

from __future__ import annotations

from typing import Any, Callable, Optional

from laminardb import _laminardb


def sink(
    name: Optional[str] = None, *, format: str = "arrow", on_error: Optional[Callable[[BaseException], None]] = None
) -> Callable[[Any], Any]:
    """Registers the decorated function (called with each batch) or class instance (its
    `write(batch)`, and `open(shard)`, `checkpoint(id)`, `close()` when it has them) as
    the Python sink `name` (default: its `__name__`); returned unchanged."""

    def register(target: Any) -> Any:
        _laminardb._register_sink(name or getattr(target, "__name__", type(target).__name__), target, format, on_error)
        return target

    return register


def _convert(batch: Any, format: str) -> Any:
    """A pyarrow RecordBatch as the sink asked for it."""
    if format == "pandas":
        return batch.to_pandas()
    if format == "polars":
        import polars

        return polars.from_arrow(batch)
    return batch
