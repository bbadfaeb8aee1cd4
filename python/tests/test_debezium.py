"""`format = 'debezium'`: change events (Debezium's JSON envelope) read from a real broker
(tansu on 127.0.0.1) become a changelog source, whose readers take back what an update or
delete replaces."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Producer

import laminardb
from conftest import wait_until

SCHEMA = {"type": "struct", "name": "dbserver1.public.orders.Envelope"}  # as Kafka Connect wraps it


def event(op: str, before: dict | None, after: dict | None, *, wrapped: bool = False) -> bytes:
    body = {"before": before, "after": after, "op": op, "ts_ms": 1_700_000_000_000, "source": {"table": "orders"}}
    return json.dumps({"schema": SCHEMA, "payload": body} if wrapped else body).encode()


def order(i: int, region: str, amount: float) -> dict:
    return {"id": i, "region": region, "amount": amount}


# What a Postgres table with REPLICA IDENTITY FULL sends through Debezium: (key, event).
EVENTS = [
    (1, event("r", None, order(1, "EU", 10.0))),
    (2, event("r", None, order(2, "US", 20.0), wrapped=True)),
    (3, event("c", None, order(3, "EU", 5.0))),
    (4, event("c", None, order(4, "APAC", 1.0))),
    (1, event("u", order(1, "EU", 10.0), order(1, "US", 12.0), wrapped=True)),
    (2, event("d", order(2, "US", 20.0), None)),
    (2, None),  # the tombstone that follows a delete
    (3, event("u", order(3, "EU", 5.0), order(3, "EU", 7.5))),
    (4, event("d", order(4, "APAC", 1.0), None)),
    (4, None),
    (9, event("u", None, order(9, "EU", 100.0))),  # no old row: refused, counted
]

# The log as the source keeps it: (id, region, amount, _op), per id in event order.
CHANGES = [
    (1, "EU", 10.0, "+I"), (2, "US", 20.0, "+I"), (3, "EU", 5.0, "+I"), (4, "APAC", 1.0, "+I"),
    (1, "EU", 10.0, "-U"), (1, "US", 12.0, "+U"), (2, "US", 20.0, "-D"),
    (3, "EU", 5.0, "-U"), (3, "EU", 7.5, "+U"), (4, "APAC", 1.0, "-D"),
]


def produce_events(servers: str, topic: str, partitions: int) -> None:
    producer = Producer({"bootstrap.servers": servers})
    for key, value in EVENTS:
        producer.produce(topic, value, key=str(key).encode(), partition=key % partitions)
    assert producer.flush(30) == 0


def source_sql(servers: str, topic: str, extra: str = "") -> str:
    return (
        "CREATE SOURCE orders (id BIGINT, region VARCHAR, amount DOUBLE) WITH (connector = 'kafka', "
        f"'bootstrap.servers' = '{servers}', topic = '{topic}', 'group.id' = 'cdc', "
        f"'auto.offset.reset' = 'earliest', format = 'debezium'{extra})"
    )


def by_region(db) -> dict:
    rows = db.query("SELECT region, n, total FROM by_region").to_dicts()
    return {r: (n, t) for r, n, t in zip(rows["region"], rows["n"], rows["total"])}


def test_change_events_from_kafka_keep_a_view_equal_to_the_table(kafka):
    topic = kafka.create_topic(2, "orders")
    produce_events(kafka.servers, topic, 2)
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.execute(source_sql(kafka.servers, topic))
    assert db.query("SELECT * FROM orders").schema.names == ["id", "region", "amount", "_op"]
    db.execute(
        "CREATE MATERIALIZED VIEW by_region AS "
        "SELECT region, COUNT(*) AS n, SUM(amount) AS total FROM orders GROUP BY region"
    )
    db.start()
    wait_until(lambda: db.source_metrics("orders").total_events >= len(CHANGES), timeout=30)
    wait_until(lambda: db.source_metrics("orders").errors >= 1, timeout=10)
    # The table now holds orders 1 (US, 12) and 3 (EU, 7.5); 2 and 4 were deleted.
    wait_until(lambda: by_region(db) == {"US": (1, 12.0), "EU": (1, 7.5)}, timeout=10)
    view = by_region(db)
    log = db.query("SELECT id, region, amount, _op FROM orders").to_dicts()
    metrics = db.source_metrics("orders")
    db.close()
    assert view == {"US": (1, 12.0), "EU": (1, 7.5)}
    got = list(zip(log["id"], log["region"], log["amount"], log["_op"]))
    # Each id's changes in their order (the partitions interleave among themselves).
    for i in range(1, 5):
        assert [c for c in got if c[0] == i] == [c for c in CHANGES if c[0] == i]
    assert len(got) == len(CHANGES)
    assert metrics.total_events == len(CHANGES)
    assert metrics.errors == 1
    assert "without 'before'" in metrics.last_error


def test_a_source_of_changes_is_read_only_as_a_changelog(kafka):
    topic = kafka.create_topic(1, "orders")
    db = laminardb.open(":memory:")
    db.execute(source_sql(kafka.servers, topic))
    with pytest.raises(laminardb.LaminarError, match="changelog source 'orders'"):
        db.execute("CREATE STREAM big AS SELECT id, amount FROM orders WHERE amount > 10")
    with pytest.raises(laminardb.LaminarError, match="Max over the changelog source 'orders'"):
        db.execute("CREATE STREAM top AS SELECT region, MAX(amount) AS m FROM orders GROUP BY region")
    db.execute("CREATE STREAM counts AS SELECT region, COUNT(*) AS n FROM orders GROUP BY region")
    # Rows inserted from Python are changes too, and must say which.
    db.insert("orders", {"id": [1, 1], "region": ["EU", "EU"], "amount": [1.0, 1.0], "_op": ["+I", "+I"]})
    with pytest.raises(laminardb.IngestionError, match="takes changes"):
        db.insert("orders", {"id": 2, "region": "EU", "amount": 1.0, "_op": "+X"})
    with pytest.raises(laminardb.LaminarError):
        db.insert("orders", {"id": 2, "region": "EU", "amount": 1.0})
    db.insert("orders", {"id": 1, "region": "EU", "amount": 1.0, "_op": "-D"})
    assert db.query("SELECT region, n FROM counts").to_dicts() == {"region": ["EU"], "n": [1]}
    db.close()


@pytest.mark.parametrize(
    "columns, extra, message",
    [
        ("id BIGINT, _op VARCHAR", "", "adds the column '_op' itself"),
        ("id BIGINT", ", format = 'debezium-avro'", "is not one of json, csv, raw, debezium"),
    ],
)
def test_bad_change_sources_are_refused_at_create(db, columns, extra, message):
    sql = (
        f"CREATE SOURCE o ({columns}) WITH (connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:1', "
        f"topic = 't', 'group.id' = 'g'{extra or ', format = ' + repr('debezium')})"
    )
    with pytest.raises(laminardb.ConnectorError, match=message):
        db.execute(sql)
