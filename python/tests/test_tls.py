"""Connectors over TLS against real peers on 127.0.0.1, with certificates of a test
certificate authority (`trustme`): a `kafka` source and sink through librdkafka's TLS to
the tansu broker behind a TLS relay, checked with confluent-kafka over TLS; Avro through
an `https://` schema registry with basic authentication; a `wss://` WebSocket source and
client sink against `websockets` servers. Without the authority the
connection is refused, and said (never rows from an unverified peer)."""

from __future__ import annotations

import json
import ssl
import threading

import pytest
import trustme
from confluent_kafka import Producer

import laminardb
from conftest import poll_rows, wait_until
from kafka_broker import read_messages, start_tls_broker
from test_websocket import Feed


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server_context(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def tls_kafka(server_context, tmp_path_factory):
    broker = start_tls_broker(str(tmp_path_factory.mktemp("kafka-tls") / "broker.log"), server_context)
    try:
        yield broker
    finally:
        broker.stop()


def tls_client(servers: str, ca_file: str, **extra) -> dict:
    return {"bootstrap.servers": servers, "security.protocol": "ssl", "ssl.ca.location": ca_file, **extra}


def test_kafka_source_and_sink_over_tls(tls_kafka, ca_file):
    src, out = tls_kafka.create_topic(2, "tls-in"), tls_kafka.create_topic(2, "tls-out")
    producer = Producer(tls_client(tls_kafka.servers, ca_file))
    for i in range(1_000):
        producer.produce(src, json.dumps({"k": i, "v": i * 3}).encode(), partition=i % 2)
    assert producer.flush(30) == 0
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    try:
        db.execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'kafka', "
            f"'bootstrap.servers' = '{tls_kafka.servers}', topic = '{src}', 'group.id' = 'tls', "
            f"'auto.offset.reset' = 'earliest', 'security.protocol' = 'ssl', 'ssl.ca.location' = '{ca_file}')"
        )
        db.execute("CREATE STREAM odd AS SELECT k, v FROM s WHERE k % 2 = 1")
        db.execute(
            f"CREATE SINK odd_out FROM odd WITH (connector = 'kafka', 'bootstrap.servers' = '{tls_kafka.servers}', "
            f"topic = '{out}', 'security.protocol' = 'ssl', 'ssl.ca.location' = '{ca_file}')"
        )
        db.start()
        assert wait_until(lambda: db.sink_metrics("odd_out").total_events >= 500, 60)
        assert wait_until(lambda: db.source_metrics("s").total_events >= 1_000, 30)
        source = db.source_metrics("s")
    finally:
        db.close()
    assert (source.total_events, source.errors) == (1_000, 0)
    got = [json.loads(m.value()) for m in read_messages(tls_client(tls_kafka.servers, ca_file, **{"group.id": "tls-check"}), out, 2, 500)]
    assert sorted(r["k"] for r in got) == list(range(1, 1_000, 2))
    assert all(r["v"] == r["k"] * 3 for r in got)


def test_a_kafka_source_without_the_authority_reads_nothing_and_says_why(tls_kafka):
    src = tls_kafka.create_topic(1, "tls-untrusted")
    db = laminardb.open(":memory:")
    try:
        # The system's authorities do not know the test one: the handshake must fail.
        db.execute(
            "CREATE SOURCE s (k BIGINT) WITH (connector = 'kafka', "
            f"'bootstrap.servers' = '{tls_kafka.servers}', topic = '{src}', 'group.id' = 'untrusted', "
            "'security.protocol' = 'ssl')"
        )
        with pytest.raises(laminardb.ConnectorError) as ei:
            db.start()
        assert "certificate verify failed" in str(ei.value), str(ei.value)
    finally:
        db.close()


def test_a_wss_source_reads_a_feed_over_tls(server_context, ca_file):
    stop = threading.Event()

    def handler(ws, _n):
        for i in range(5):
            ws.send(json.dumps({"symbol": "A", "px": 100.0 + i, "seq": i}))
        stop.wait(30)

    feed = Feed(handler, ssl=server_context)
    db = laminardb.open(":memory:")
    try:
        db.execute(
            "CREATE SOURCE ticks (symbol VARCHAR, px DOUBLE, seq BIGINT) WITH (connector = 'websocket', "
            f"url = '{feed.url}', 'ssl.ca.location' = '{ca_file}')"
        )
        sub = db.subscribe_stream("ticks")
        db.start()
        got = poll_rows(sub, ("seq", "px"), 5, timeout=20)
        assert got == [(i, 100.0 + i) for i in range(5)]
        assert db.source_metrics("ticks").errors == 0
    finally:
        stop.set()
        db.close()
        feed.close()


def test_a_wss_source_refuses_a_server_it_cannot_verify(server_context):
    feed = Feed(lambda ws, _n: ws.send(json.dumps({"seq": 1})), ssl=server_context)
    db = laminardb.open(":memory:")
    try:
        db.execute(
            "CREATE SOURCE ticks (seq BIGINT) WITH (connector = 'websocket', "
            f"url = '{feed.url}', 'reconnect.initial_delay_ms' = '50', 'reconnect.max_retries' = '1')"
        )
        db.start()
        assert wait_until(lambda: "certificate" in (db.source_metrics("ticks").last_error or "").lower(), 20), db.source_metrics("ticks").last_error
        assert db.source_metrics("ticks").total_events == 0
        assert feed.connections == 0
    finally:
        db.close()
        feed.close()


def test_a_wss_client_sink_sends_every_row(server_context, ca_file):
    received: list = []
    done = threading.Event()

    def handler(ws, _n):
        for message in ws:
            received.append(json.loads(message))
            if len(received) == 50:
                done.set()

    feed = Feed(handler, ssl=server_context)
    db = laminardb.open(":memory:")
    try:
        db.execute("CREATE SOURCE t (v BIGINT)")
        db.execute(
            f"CREATE SINK up FROM t WITH (connector = 'websocket', mode = 'client', url = '{feed.url}', "
            f"'ssl.ca.location' = '{ca_file}')"
        )
        db.insert("t", [{"v": i} for i in range(50)])
        assert done.wait(10)
        assert sorted(r["v"] for r in received) == list(range(50))
    finally:
        db.close()
        feed.close()


def test_an_unreadable_authority_file_is_a_connector_error_at_create(db, tmp_path):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello")
    for path, named in [(tmp_path / "absent.pem", "reading ssl.ca.location"), (bad, "holds no PEM certificate")]:
        with pytest.raises(laminardb.ConnectorError) as ei:
            db.execute(f"CREATE SOURCE s (v BIGINT) WITH (connector = 'websocket', url = 'wss://localhost:1/x', 'ssl.ca.location' = '{path}')")
        assert named in str(ei.value)
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute("CREATE SOURCE s (v BIGINT) WITH (connector = 'websocket', url = 'ws://localhost:1/x', 'ssl.ca.location' = '/x.pem')")
    assert "for wss://" in str(ei.value)


def test_avro_through_an_https_registry_with_basic_authentication(tls_kafka, ca_file, server_context):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from schema_registry import SchemaRegistry

    registry = SchemaRegistry(ssl_context=server_context, user_info="laminar:s3cret")
    topic = tls_kafka.create_topic(1, "avro-tls")
    tls = f"'security.protocol' = 'ssl', 'ssl.ca.location' = '{ca_file}'"
    db = laminardb.open(":memory:")
    try:
        db.execute("CREATE SOURCE t (symbol VARCHAR, qty BIGINT)")
        sink = (
            f"CREATE SINK out FROM t WITH (connector = 'kafka', 'bootstrap.servers' = '{tls_kafka.servers}', "
            f"topic = '{topic}', format = 'avro', 'schema.registry.url' = '{registry.url}', {tls}{{extra}})"
        )
        # Without the password the registry refuses, and so does the sink's CREATE.
        with pytest.raises(laminardb.ConnectorError, match="HTTP 401"):
            db.execute(sink.format(extra=f", 'schema.registry.ssl.ca.location' = '{ca_file}'"))
        db.execute(
            sink.format(
                extra=f", 'schema.registry.ssl.ca.location' = '{ca_file}', 'schema.registry.basic.auth.user.info' = 'laminar:s3cret'"
            )
        )
        rows = [{"symbol": f"S{i % 3}", "qty": i} for i in range(200)]
        db.insert("t", rows)
    finally:
        db.close()
    client = SchemaRegistryClient(
        {"url": registry.url, "ssl.ca.location": ca_file, "basic.auth.user.info": "laminar:s3cret"}
    )
    read = AvroDeserializer(client)
    records = read_messages(tls_client(tls_kafka.servers, ca_file, **{"group.id": "avro-tls"}), topic, 1, len(rows))
    ctx = SerializationContext(topic, MessageField.VALUE)
    try:
        assert sorted((read(m.value(), ctx) for m in records), key=lambda r: r["qty"]) == rows
    finally:
        registry.stop()
    assert registry.refused >= 1


def test_a_signal_during_the_registry_handshake_does_not_fail_the_statement(kafka, ca_file, server_context):
    """A signal that comes while the registry's TLS handshake waits interrupts the
    blocking call (CPython installs its handlers without SA_RESTART), and OpenSSL's
    handshake does not go on after that: the request is made again."""
    import signal

    from schema_registry import SchemaRegistry

    registry = SchemaRegistry(ssl_context=server_context, handshake_delay=0.5)
    topic = kafka.create_topic(1, "avro-signal")
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    interrupt = threading.Timer(0.2, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
    db = laminardb.open(":memory:")
    try:
        db.execute("CREATE SOURCE t (symbol VARCHAR, qty BIGINT)")
        interrupt.start()
        db.execute(
            f"CREATE SINK out FROM t WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
            f"topic = '{topic}', format = 'avro', 'schema.registry.url' = '{registry.url}', "
            f"'schema.registry.ssl.ca.location' = '{ca_file}')"
        )
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGUSR1, previous)
        db.close()
        registry.stop()
    # The interrupted connection, then the one that answered.
    assert registry.connections >= 2


def test_an_https_registry_the_source_cannot_verify_fails_its_start(kafka, server_context):
    from schema_registry import SchemaRegistry

    registry = SchemaRegistry(ssl_context=server_context)
    topic = kafka.create_topic(1, "avro-untrusted")
    db = laminardb.open(":memory:")
    try:
        db.execute(
            f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
            f"topic = '{topic}', 'group.id' = 'g', format = 'avro', 'schema.registry.url' = '{registry.url}')"
        )
        with pytest.raises(laminardb.ConnectorError) as ei:
            db.start()
        assert "TLS" in str(ei.value) and "certificate" in str(ei.value).lower(), str(ei.value)
    finally:
        db.close()
        registry.stop()
