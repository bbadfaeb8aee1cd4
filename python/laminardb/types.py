"""Pure-Python conveniences over the engine: materialized views, change events, schemas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

OP_COLUMN = "_op"
# Change types of a changelog stream's `_op` column, as ChangeRow.op names them.
_OPS = {"+I": "Insert", "-U": "UpdateBefore", "+U": "UpdateAfter", "-D": "Delete"}


@dataclass(frozen=True)
class Column:
    name: str
    type: Any
    nullable: bool = True


class Schema:
    """A pyarrow schema with list-like access to its columns."""

    def __init__(self, arrow_schema: Any) -> None:
        self._schema = arrow_schema

    @property
    def arrow(self) -> Any:
        return self._schema

    @property
    def arrow_schema(self) -> Any:
        """The pyarrow schema (as `arrow`)."""
        return self._schema

    @property
    def names(self) -> List[str]:
        return list(self._schema.names)

    @property
    def columns(self) -> List[Column]:
        return [Column(f.name, f.type, f.nullable) for f in self._schema]

    def __len__(self) -> int:
        return len(self._schema)

    def __getitem__(self, key: Union[int, str]) -> Column:
        field = self._schema.field(key)
        return Column(field.name, field.type, field.nullable)

    def __iter__(self) -> Iterator[Column]:
        return iter(self.columns)

    def __repr__(self) -> str:
        return "Schema(" + ", ".join(f"{f.name}: {f.type}" for f in self._schema) + ")"


class ChangeRow:
    """One row of a change event, with its change type (`op`)."""

    __slots__ = ("_data", "op")

    def __init__(self, op: str, data: Dict[str, Any]) -> None:
        self.op = op
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def keys(self) -> List[str]:
        return list(self._data.keys())

    def values(self) -> List[Any]:
        return list(self._data.values())

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"ChangeRow(op={self.op!r}, {self._data!r})"


class ChangeEvent:
    """A batch of changes: a QueryResult and the change type of each row. Rows of a
    changelog stream carry their own type in `_op` (`+I`, `-U`, `+U`); other rows take `op`."""

    def __init__(self, result: Any, op: str = "Insert") -> None:
        self._result = result
        self.op = op
        self._rows: Optional[List[ChangeRow]] = None

    def _materialize(self) -> List[ChangeRow]:
        if self._rows is None:
            table = self._result.to_arrow()
            ops = None
            if OP_COLUMN in table.column_names:
                ops = [_OPS.get(v, v) for v in table.column(OP_COLUMN).to_pylist()]
                table = table.drop_columns([OP_COLUMN])
            rows = table.to_pylist()
            self._rows = [ChangeRow(ops[i] if ops else self.op, r) for i, r in enumerate(rows)]
        return self._rows

    def __len__(self) -> int:
        return len(self._result)

    def __iter__(self) -> Iterator[ChangeRow]:
        return iter(self._materialize())

    def __getitem__(self, i: int) -> ChangeRow:
        return self._materialize()[i]

    def df(self) -> Any:
        return self._result.to_pandas()

    def pl(self) -> Any:
        return self._result.to_polars()

    def arrow(self) -> Any:
        return self._result.to_arrow()

    def __repr__(self) -> str:
        return f"ChangeEvent(op={self.op!r}, rows={len(self)})"


class MaterializedView:
    """A handle on a stream or materialized view created with SQL: query its current
    state, read its schema, subscribe to its changes. It does not own the stream."""

    def __init__(self, conn: Any, name: str, sql: Optional[str] = None) -> None:
        self._conn = conn
        self._name = name
        if sql is None:
            sql = next((s.sql for s in conn.streams() if s.name == name), None)
        self._sql = sql

    @property
    def name(self) -> str:
        return self._name

    @property
    def sql(self) -> Optional[str]:
        return self._sql

    def query(self, where: str = "") -> Any:
        """The view's current rows, optionally filtered by a SQL condition."""
        return self._conn.query_stream(self._name, where or None)

    def schema(self) -> Schema:
        return Schema(self._conn.schema(self._name))

    def subscribe(self, handler: Optional[Callable[[ChangeEvent], None]] = None) -> Any:
        """Without a handler, the raw StreamSubscription; with one, a daemon thread that
        calls `handler(ChangeEvent)` for every batch (returned, already started)."""
        sub = self._conn.subscribe_stream(self._name)
        if handler is None:
            return sub

        from laminardb._subscriptions import follow

        return follow(sub, lambda batch: handler(ChangeEvent(batch)), f"laminardb-mv-{self._name}")

    def __repr__(self) -> str:
        return f"MaterializedView({self._name!r})"


def mv(conn: Any, name: str, sql_def: Optional[str] = None) -> MaterializedView:
    """A MaterializedView over stream `name` of `conn`."""
    return MaterializedView(conn, name, sql_def)


class CheckpointResult(int):
    """What `checkpoint()` returns: the checkpoint's id, as an `int`."""

    @property
    def checkpoint_id(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"CheckpointResult(checkpoint_id={int(self)})"


@dataclass(frozen=True)
class CheckpointStatus:
    """A checkpoint's id (what `checkpoint()` returned, `None` without one) and whether
    the connection checkpoints (`is_checkpoint_enabled`)."""

    checkpoint_id: Optional[int]
    enabled: bool


class Metrics:
    """Convenience view of a PipelineMetrics snapshot, with derived rates."""

    def __init__(self, snapshot: Any) -> None:
        self._m = snapshot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    @property
    def events_per_second(self) -> float:
        """Ingested rows per second of uptime."""
        up = float(self._m.uptime_secs)
        return float(self._m.total_events_ingested) / up if up > 0 else 0.0

    def __repr__(self) -> str:
        return f"Metrics(state={self._m.state!r}, eps={self.events_per_second:.1f}, uptime={float(self._m.uptime_secs):.1f}s)"
