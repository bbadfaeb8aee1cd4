"""laminardb: an embedded streaming SQL database with a thread-per-core Rust engine.

    import laminardb
    db = laminardb.open(":memory:")
    db.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE)")
    db.insert("trades", {"ts": 1, "symbol": "AAPL", "price": 150.0})
    db.query("SELECT symbol, SUM(price) FROM trades GROUP BY symbol").show()
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from laminardb import _laminardb
from laminardb._laminardb import (
    CheckpointError,
    Connection,
    ConnectionError,
    ConnectorError,
    ExecuteResult,
    IngestionError,
    LaminarConfig,
    LaminarError,
    QueryError,
    QueryInfo,
    QueryResult,
    QueryStream,
    PipelineEdge,
    PipelineMetrics,
    PipelineNode,
    PipelineTopology,
    SchemaError,
    SinkInfo,
    SourceInfo,
    StreamError,
    StreamInfo,
    SinkMetrics,
    StreamMetrics,
    StreamSubscription,
    SourceMetrics,
    Subscription,
    SubscriptionError,
    Writer,
    codes,
    connect,
    open,
)

from laminardb._subscriptions import (
    AsyncStreamSubscription,
    AsyncSubscription,
    CallbackSubscription,
    SubscriptionHandle,
)
from laminardb._sinks import sink
from laminardb._sources import source
from laminardb._udf import udaf, udf
from laminardb.types import ChangeEvent, ChangeRow, CheckpointResult, CheckpointStatus, Column, MaterializedView, Metrics, Schema, mv

__version__: str = _laminardb.__version__

Config = LaminarConfig
BatchWriter = Writer

_default_lock = threading.Lock()
_default_connection: Optional[Connection] = None


def _get_default() -> Connection:
    """The module-level connection behind `laminardb.sql()` / `execute()`, opened on first use."""
    global _default_connection
    with _default_lock:
        if _default_connection is None or _default_connection.is_closed:
            _default_connection = open(":memory:")
        return _default_connection


def sql(query: str, params: Optional[Any] = None) -> QueryResult:
    """Run a query on the module-level in-memory connection."""
    return _get_default().sql(query, params)


def execute(query: str, params: Optional[Any] = None) -> ExecuteResult:
    """Execute a statement on the module-level in-memory connection."""
    return _get_default().execute(query, params)


__all__ = [
    "AsyncStreamSubscription",
    "AsyncSubscription",
    "CallbackSubscription",
    "ChangeEvent",
    "ChangeRow",
    "CheckpointResult",
    "CheckpointStatus",
    "Column",
    "MaterializedView",
    "Metrics",
    "PipelineEdge",
    "PipelineMetrics",
    "PipelineNode",
    "PipelineTopology",
    "Schema",
    "SourceMetrics",
    "SinkMetrics",
    "StreamMetrics",
    "StreamSubscription",
    "Subscription",
    "SubscriptionHandle",
    "mv",
    "BatchWriter",
    "CheckpointError",
    "Config",
    "Connection",
    "ConnectionError",
    "ConnectorError",
    "ExecuteResult",
    "IngestionError",
    "LaminarConfig",
    "LaminarError",
    "QueryError",
    "QueryInfo",
    "QueryResult",
    "QueryStream",
    "SchemaError",
    "SinkInfo",
    "SourceInfo",
    "StreamError",
    "StreamInfo",
    "SubscriptionError",
    "Writer",
    "codes",
    "connect",
    "sink",
    "source",
    "udaf",
    "udf",
    "execute",
    "open",
    "sql",
]
