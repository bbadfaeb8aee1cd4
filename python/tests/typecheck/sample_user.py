"""A user script that must type-check under `mypy --strict` against laminardb's stubs."""

from __future__ import annotations

from typing import Any, Optional

import laminardb
from laminardb import LaminarConfig, QueryResult


def load(db: laminardb.Connection) -> int:
    db.execute("CREATE SOURCE trades (ts BIGINT, symbol VARCHAR, price DOUBLE)")
    n: int = db.insert("trades", [{"ts": 1, "symbol": "A", "price": 1.0}])
    with db.writer("trades") as w:
        w.insert({"ts": 2, "symbol": "B", "price": 2.0})
        w.watermark(2)
        mark: int = w.current_watermark
        assert mark == 2
    return n + db.insert_json("trades", '[{"ts": 3, "symbol": "C", "price": 3.0}]')


def report(result: QueryResult) -> list[tuple[Any, ...]]:
    first: Optional[tuple[Any, ...]] = result.fetchone()
    assert first is not None
    names: list[str] = result.columns
    assert names
    return result.fetchall()


def main() -> None:
    config = LaminarConfig(buffer_size=1024, shards=1)
    with laminardb.open(":memory:", config=config) as db:
        rows = load(db)
        result = db.sql("SELECT symbol, price FROM trades WHERE price > $1", [0.5])
        assert len(report(result)) == rows + 1
        outcome = db.execute("INSERT INTO trades VALUES (4, 'D', 4.0)")
        assert int(outcome) == 1 and outcome.result_type == "rows_affected"
        for batch in db.stream("SELECT * FROM trades"):
            assert batch.num_rows >= 1
        try:
            db.schema("missing")
        except laminardb.SchemaError as e:
            assert e.code == laminardb.codes.TABLE_NOT_FOUND
        plan: str = db.explain("SELECT * FROM trades")
        stats: dict[str, Any] = db.stats("trades")
        assert plan and stats["total_events"] == rows + 2


def streaming() -> None:
    with laminardb.open(":memory:") as db:
        db.execute("CREATE SOURCE ticks (ts BIGINT, symbol VARCHAR, price DOUBLE, WATERMARK FOR ts)")
        db.execute(
            "CREATE STREAM bars AS SELECT symbol, MAX(price) AS high FROM ticks "
            "GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND)"
        )
        sub: laminardb.StreamSubscription = db.subscribe_stream("bars")
        db.insert("ticks", [{"ts": 100, "symbol": "A", "price": 1.0}, {"ts": 1500, "symbol": "A", "price": 2.0}])
        bar: Optional[QueryResult] = sub.next_timeout(5000)
        assert bar is not None and bar.num_rows == 1
        seen: list[int] = []
        handle = db.subscribe_stream_callback("bars", lambda r: seen.append(r.num_rows))
        handle.cancel()
        metrics: laminardb.PipelineMetrics = db.metrics()
        assert metrics.total_events_ingested == 2
        edges = [(e.from_node, e.to_node) for e in db.topology().edges]
        assert edges == [("ticks", "bars")]
        view = laminardb.mv(db, "bars")
        assert view.schema().names[0] == "symbol"
        db.shutdown()


if __name__ == "__main__":
    main()
    streaming()
