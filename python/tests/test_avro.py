"""`format = 'avro'` with a schema registry: Kafka records in the Confluent wire format,
written and read by confluent-kafka's Avro serializers, through a real broker (tansu on
127.0.0.1). The registry is `schema_registry.SchemaRegistry` (see there why)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

import laminardb
from conftest import wait_until
from kafka_broker import read_messages
from schema_registry import SchemaRegistry

V1 = {
    "type": "record",
    "name": "Trade",
    "fields": [
        {"name": "symbol", "type": "string"},
        {"name": "price", "type": "double"},
        {"name": "qty", "type": "long"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "venue", "type": "string"},  # not declared by the source: left out
    ],
}
# The next version of the writers' schema: `qty` as an int, a new optional field.
V2 = {
    **V1,
    "fields": [{**f, "type": "int"} if f["name"] == "qty" else f for f in V1["fields"]]
    + [{"name": "note", "type": ["null", "string"], "default": None}],
}


@pytest.fixture(scope="module")
def registry():
    r = SchemaRegistry()
    yield r
    r.stop()


def trade(i: int) -> dict:
    return {"symbol": f"S{i % 7}", "price": 100 + (i * 37) % 50 / 4, "qty": 1 + i % 5, "ts": 1_700_000_000_000 + i, "venue": "X"}


def test_avro_records_of_two_schema_versions_become_exact_rows(kafka, registry):
    topic = kafka.create_topic(2, "avro-trades")
    client = SchemaRegistryClient({"url": registry.url})
    v1 = AvroSerializer(client, json.dumps(V1))
    v2 = AvroSerializer(client, json.dumps(V2))
    ctx = SerializationContext(topic, MessageField.VALUE)
    rows = [trade(i) for i in range(2_000)]
    producer = Producer({"bootstrap.servers": kafka.servers})
    for i, row in enumerate(rows):
        payload = v1(row, ctx) if i < 1_200 else v2({**row, "note": "late" if i % 2 else None}, ctx)
        producer.produce(topic, payload, partition=i % 2)
    # Three that cannot be read: not the registry's framing, an id the registry does not
    # have, and a record cut short.
    good = v1(trade(0), ctx)
    for bad in [b"\x01not avro", b"\x00\x00\x00\x03\xe7\x02", good[:-3]]:
        producer.produce(topic, bad, partition=0)
    assert producer.flush(30) == 0

    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty BIGINT, ts TIMESTAMP, note VARCHAR) WITH ("
        f"connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', topic = '{topic}', 'group.id' = 'avro', "
        f"'auto.offset.reset' = 'earliest', format = 'avro', 'schema.registry.url' = '{registry.url}')"
    )
    db.execute("CREATE MATERIALIZED VIEW per_symbol AS SELECT symbol, COUNT(*) AS n, SUM(qty) AS q FROM trades GROUP BY symbol")
    db.start()
    wait_until(lambda: db.source_metrics("trades").total_events >= len(rows), timeout=30)
    wait_until(lambda: db.source_metrics("trades").errors >= 3, timeout=10)
    got = db.query("SELECT symbol, price, qty, CAST(ts AS BIGINT) / 1000 AS ts, note FROM trades").to_dicts()
    views = db.query("SELECT symbol, n, q FROM per_symbol").to_dicts()
    metrics = db.source_metrics("trades")
    db.close()
    assert metrics.total_events == len(rows)
    assert metrics.errors == 3, metrics.last_error
    by_ts = {ts: (s, p, q, n) for s, p, q, ts, n in zip(got["symbol"], got["price"], got["qty"], got["ts"], got["note"])}
    expected = {r["ts"]: (r["symbol"], r["price"], r["qty"], ("late" if i % 2 else None) if i >= 1_200 else None) for i, r in enumerate(rows)}
    assert by_ts == expected
    sums: dict = defaultdict(lambda: [0, 0])
    for r in rows:
        sums[r["symbol"]][0] += 1
        sums[r["symbol"]][1] += r["qty"]
    assert {s: [n, q] for s, n, q in zip(views["symbol"], views["n"], views["q"])} == dict(sums)


def test_an_avro_sink_registers_its_schema_and_every_row_reads_back(kafka, registry):
    topic = kafka.create_topic(1, "avro-out")
    db = laminardb.open(":memory:")
    db.execute("CREATE SOURCE t (symbol VARCHAR, price DOUBLE, qty BIGINT)")
    db.execute("CREATE STREAM big AS SELECT symbol, price, qty FROM t WHERE qty > 1")
    db.execute(
        f"CREATE SINK out FROM big WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
        f"topic = '{topic}', format = 'avro', 'schema.registry.url' = '{registry.url}')"
    )
    rows = [{"symbol": f"S{i % 3}", "price": i / 8, "qty": i % 4} for i in range(500)]
    db.insert("t", rows)
    db.close()  # delivers what is queued
    assert f"{topic}-value" in registry.subjects
    read = AvroDeserializer(SchemaRegistryClient({"url": registry.url}))
    want = [r for r in rows if r["qty"] > 1]
    records = read_messages({"bootstrap.servers": kafka.servers, "group.id": "avro-check"}, topic, 1, len(want))
    ctx = SerializationContext(topic, MessageField.VALUE)
    # Each shard sends its share of the rows, in order; the shares interleave.
    key = lambda r: r["price"]  # noqa: E731 - unique per row
    assert sorted((read(m.value(), ctx) for m in records), key=key) == sorted(want, key=key)


def test_avro_needs_a_registry_it_can_reach(kafka, registry):
    db = laminardb.open(":memory:")
    sql = (
        "CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}', "
        "topic = '{topic}', 'group.id' = 'g', format = 'avro'{extra})"
    )
    with pytest.raises(laminardb.ConnectorError, match="needs the option 'schema.registry.url'"):
        db.execute(sql.format(servers=kafka.servers, topic="t", extra=""))
    topic = kafka.create_topic(1, "avro-none")
    db.execute(sql.format(servers=kafka.servers, topic=topic, extra=", 'schema.registry.url' = 'http://127.0.0.1:1'"))
    with pytest.raises(laminardb.ConnectorError, match="schema registry 127.0.0.1:1"):
        db.start()
    db.close()
