"""The `kafka` source and sink against a real Kafka-protocol broker (tansu on 127.0.0.1),
checked with an independent client (confluent-kafka): exact bars from 100,000 trades,
offsets in checkpoints across a kill -9, option errors at CREATE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

import laminardb
from conftest import poll_rows, wait_until
from kafka_broker import read_messages

SYMBOLS = [f"S{i:02d}" for i in range(12)]
WINDOW_MS = 1_000


def trades(n: int) -> list[dict]:
    """`n` trades, 4 ms apart: symbol, price, qty, ts (ms)."""
    return [
        {"symbol": SYMBOLS[i % len(SYMBOLS)], "price": float(100 + (i * 7919) % 1000) / 4, "qty": 1 + i % 9, "ts": 4 * i}
        for i in range(n)
    ]


def partition_of(symbol: str, partitions: int) -> int:
    # One symbol, one partition: its trades keep their order, so FIRST/LAST are exact.
    return zlib.crc32(symbol.encode()) % partitions


def produce(servers: str, topic: str, rows: list[dict], partitions: int, *, by=lambda r: r["symbol"]) -> None:
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 5})
    for i, row in enumerate(rows):
        producer.produce(topic, json.dumps(row).encode(), partition=partition_of(by(row), partitions))
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def closing_trades(partitions: int) -> list[tuple[int, dict]]:
    """A trade far ahead on every partition: every partition's watermark passes every
    real window (the window these open never closes, and is not expected)."""
    return [(p, {"symbol": f"ZZ{p}", "price": 1.0, "qty": 1, "ts": 10**9}) for p in range(partitions)]


def produce_closing(servers: str, topic: str, partitions: int) -> None:
    producer = Producer({"bootstrap.servers": servers})
    for p, row in closing_trades(partitions):
        producer.produce(topic, json.dumps(row).encode(), partition=p)
    assert producer.flush(30) == 0


def expected_bars(rows: list[dict]) -> dict:
    bars: dict = {}
    for r in rows:
        key = (r["symbol"], r["ts"] // WINDOW_MS * WINDOW_MS)
        b = bars.get(key)
        if b is None:
            bars[key] = {"open": r["price"], "high": r["price"], "low": r["price"], "close": r["price"], "volume": r["qty"], "trades": 1}
        else:
            b["high"] = max(b["high"], r["price"])
            b["low"] = min(b["low"], r["price"])
            b["close"] = r["price"]
            b["volume"] += r["qty"]
            b["trades"] += 1
    return bars


def consume(
    servers: str, topic: str, partitions: int, until, timeout_s: float = 60, isolation: str = "read_uncommitted", sizes: list | None = None
) -> list[dict]:
    """Records of `topic` as JSON, read by an independent client until `until(records)`
    (their payloads' lengths appended to `sizes`)."""
    consumer = Consumer(
        {"bootstrap.servers": servers, "group.id": f"check-{topic}", "enable.auto.commit": False, "isolation.level": isolation}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    records: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(records) and time.monotonic() < deadline:
            for m in consumer.consume(10_000, 0.2):
                assert m.error() is None, m.error()
                records.append(json.loads(m.value()))
                if sizes is not None:
                    sizes.append(len(m.value()))
    finally:
        consumer.close()
    return records


def bar_key(bar: dict) -> tuple:
    return (bar["symbol"], bar["window_start"])


def as_expected(bar: dict) -> dict:
    return {k: bar[k] for k in ("open", "high", "low", "close", "volume", "trades")}


SOURCE = """CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty BIGINT, ts BIGINT, WATERMARK FOR ts AS ts)
    WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}', topic = '{topic}', 'group.id' = '{group}',
          format = 'json', 'auto.offset.reset' = 'earliest')"""
BARS = """CREATE STREAM bars AS SELECT symbol, window_start, FIRST_VALUE(price) AS open, MAX(price) AS high,
    MIN(price) AS low, LAST_VALUE(price) AS close, SUM(qty) AS volume, COUNT(*) AS trades
    FROM trades GROUP BY symbol, TUMBLE(ts, INTERVAL '1' SECOND) EMIT ON WINDOW CLOSE"""
SINK = """CREATE SINK bars_out FROM bars WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}',
    topic = '{topic}', format = 'json', partitioner = 'key-hash', key = 'symbol')"""


def test_trades_from_kafka_become_exact_bars_in_kafka(kafka, tmp_path):
    rows = trades(100_000)
    src, out = kafka.create_topic(3, "trades"), kafka.create_topic(2, "bars")
    produce(kafka.servers, src, rows, 3)
    produce_closing(kafka.servers, src, 3)
    expected = expected_bars(rows)
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.execute(SOURCE.format(servers=kafka.servers, topic=src, group="bars-test"))
    db.execute(BARS)
    db.execute(SINK.format(servers=kafka.servers, topic=out))
    db.start()
    sizes: list = []
    bars = consume(kafka.servers, out, 2, lambda got: len(got) >= len(expected), sizes=sizes)
    metrics, sink = db.source_metrics("trades"), db.sink_metrics("bars_out")
    db.close()
    assert (sink.connector, sink.total_events, sink.errors) == ("kafka", len(expected), 0)
    assert sink.total_bytes == sum(sizes)
    got = {bar_key(b): as_expected(b) for b in bars}
    assert len(bars) == len(expected), "each bar once"
    assert got == expected
    assert metrics.total_events == len(rows) + 3


def dead_letter_source(db, servers: str, src: str, dead: str, extra: str = "") -> None:
    """`CREATE SOURCE s (v BIGINT)` reading `src` from its start, its dead letters to `dead`."""
    db.execute(
        f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}', "
        f"topic = '{src}', 'group.id' = 'g', 'auto.offset.reset' = 'earliest', 'dead_letter.topic' = '{dead}'{extra})"
    )


def test_records_that_do_not_decode_are_counted_sent_to_the_dead_letter_topic_and_the_rest_read(kafka):
    src, dead = kafka.create_topic(1, "mixed"), kafka.create_topic(1, "dlq")
    producer = Producer({"bootstrap.servers": kafka.servers})
    for payload in [b'{"v": 1}', b"not json", b'{"v": 2}', b'{"v": "three"}', b'{"v": 4}']:
        producer.produce(src, payload, partition=0)
    assert producer.flush(30) == 0
    db = laminardb.open(":memory:")
    dead_letter_source(db, kafka.servers, src, dead)
    sub = db.subscribe_stream("s")
    db.start()
    values = [v for (v,) in poll_rows(sub, ("v",), 3, timeout=30)]
    wait_until(lambda: db.source_metrics("s").errors >= 2)
    metrics = db.source_metrics("s")
    db.close()
    assert values == [1, 2, 4]
    assert metrics.errors == 2, metrics.last_error
    assert "partition 0 offset 3: did not decode" in metrics.last_error
    letters = read_messages({"bootstrap.servers": kafka.servers, "group.id": "dlq-check"}, dead, 1, 2, timeout_s=20)
    assert [m.value() for m in letters] == [b"not json", b'{"v": "three"}']
    headers = dict(letters[1].headers())
    assert headers["origin"] == b"partition 0 offset 3"
    assert b"did not decode" in headers["error"]


def test_dead_letters_still_held_by_their_producer_are_delivered_at_close(kafka):
    """A dead letter waiting in its producer when the database closes still reaches the
    topic: with a 10 s linger none is sent before `close()`, which sends them all."""
    src, dead = kafka.create_topic(1, "mixed"), kafka.create_topic(1, "dlq")
    producer = Producer({"bootstrap.servers": kafka.servers, "linger.ms": 5})
    bad = [f"bad {i}".encode() for i in range(300)]
    for i, payload in enumerate(bad):
        producer.produce(src, json.dumps({"v": i}).encode(), partition=0)
        producer.produce(src, payload, partition=0)
    assert producer.flush(30) == 0
    db = laminardb.open(":memory:")
    dead_letter_source(db, kafka.servers, src, dead, ", 'kafka.linger.ms' = '10000'")
    db.start()
    assert wait_until(lambda: db.source_metrics("s").errors >= 300, timeout=30)
    db.close()
    letters = read_messages({"bootstrap.servers": kafka.servers, "group.id": "dlq-check"}, dead, 1, 300, timeout_s=20)
    assert [m.value() for m in letters] == bad


def test_pending_in_source_metrics_is_the_consumer_lag(kafka):
    """`pending` counts the records the broker holds that the source has not handed over:
    a stream slowed down by a Python function (20 ms a batch of at most 50) falls behind
    3,000 records, then catches up to 0."""
    import pyarrow as pa

    topic = kafka.create_topic(1, "lag")
    producer = Producer({"bootstrap.servers": kafka.servers, "linger.ms": 5})
    for i in range(3_000):
        producer.produce(topic, json.dumps({"v": i}).encode(), partition=0)
    assert producer.flush(30) == 0
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1))
    try:

        def slow(v):
            time.sleep(0.02)
            return v

        db.register_udf("slow", slow, pa.int64(), arg_types=[pa.int64()], vectorized=True)
        db.execute(
            f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
            f"topic = '{topic}', 'group.id' = 'lag', 'auto.offset.reset' = 'earliest', 'max.poll.records' = '50')"
        )
        db.execute("CREATE STREAM slowed AS SELECT slow(v) AS v FROM s")
        db.start()
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = db.source_metrics("s")
            seen.append(m.pending)
            if m.total_events == 3_000 and m.pending == 0:
                break
            time.sleep(0.02)
        m = db.source_metrics("s")
        assert m.total_events == 3_000
        assert max(seen) >= 1_000, max(seen)
        assert m.pending == 0
        assert m.capacity == 1_000_000
        assert not m.is_backpressured
    finally:
        db.close()


CHILD = textwrap.dedent(
    """
    import sys, time, laminardb
    path, servers, src, out, stage = sys.argv[1:6]
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000))
    if stage == "first":
        db.execute('''%s'''.format(servers=servers, topic=src, group="crash"))
        db.execute('''%s''')
        db.execute('''%s'''.format(servers=servers, topic=out))
    db.start()
    want = int(sys.argv[6])
    deadline = time.monotonic() + 60
    while db.source_metrics("trades").total_events < want and time.monotonic() < deadline:
        time.sleep(0.01)
    db.checkpoint()
    print("checkpointed", db.source_metrics("trades").total_events, flush=True)
    sys.stdin.read()
    """
) % (SOURCE, BARS, SINK)


def test_a_killed_pipeline_reopens_from_its_checkpoint_and_counts_each_trade_once(kafka, tmp_path):
    rows = trades(60_000)
    src, out = kafka.create_topic(3, "trades"), kafka.create_topic(2, "bars")
    path = str(tmp_path / "db")
    produce(kafka.servers, src, rows[:30_000], 3)
    run = lambda stage, want: subprocess.Popen(  # noqa: E731
        [sys.executable, "-c", CHILD, path, kafka.servers, src, out, stage, str(want)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = run("first", 30_000)
    line = child.stdout.readline().split()
    assert line[0] == "checkpointed" and int(line[1]) == 30_000, line
    # More trades arrive, are read, and are lost with the process, uncheckpointed.
    produce(kafka.servers, src, rows[30_000:45_000], 3)
    time.sleep(1.0)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    produce(kafka.servers, src, rows[45_000:], 3)
    produce_closing(kafka.servers, src, 3)
    expected = expected_bars(rows)
    child = run("again", 0)
    assert child.stdout.readline().startswith("checkpointed")
    bars = consume(kafka.servers, out, 2, lambda got: {bar_key(b) for b in got} >= set(expected), timeout_s=90)
    child.kill()
    child.wait()
    # At-least-once: a bar sent after the checkpoint may come twice, always the same.
    got: dict = {}
    for b in bars:
        assert got.setdefault(bar_key(b), as_expected(b)) == as_expected(b), f"two different bars for {bar_key(b)}"
    assert got == expected


@pytest.mark.parametrize(
    ("with_", "named"),
    [
        ("topic = 't', 'group.id' = 'g'", "'bootstrap.servers'"),
        ("'bootstrap.servers' = '127.0.0.1:1', 'group.id' = 'g'", "'topic'"),
        ("'bootstrap.servers' = '127.0.0.1:1', topic = 't'", "'group.id'"),
        ("'bootstrap.servers' = '127.0.0.1:1', topic = 't', 'group.id' = 'g', colour = 'red'", "'colour'"),
        ("'bootstrap.servers' = '127.0.0.1:1', topic = 't', 'group.id' = 'g', format = 'avro'", "avro"),
    ],
)
def test_bad_kafka_source_options_are_connector_errors_at_create(db, with_, named):
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', {with_})")
    assert named in str(ei.value)


@pytest.mark.parametrize(
    ("with_", "named"),
    [
        ("topic = 't'", "'bootstrap.servers'"),
        ("'bootstrap.servers' = '127.0.0.1:1'", "'topic'"),
        ("'bootstrap.servers' = '127.0.0.1:1', topic = 't', 'delivery.guarantee' = 'twice'", "twice"),
        ("'bootstrap.servers' = '127.0.0.1:1', topic = 't', partitioner = 'lunar'", "lunar"),
    ],
)
def test_bad_kafka_sink_options_are_connector_errors_at_create(db, with_, named):
    db.execute("CREATE SOURCE s (v BIGINT)")
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(f"CREATE SINK k FROM s WITH (connector = 'kafka', {with_})")
    assert named in str(ei.value)


EXACTLY_ONCE_CHILD = textwrap.dedent(
    """
    import sys, time, laminardb
    path, servers, out = sys.argv[1:4]
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000))
    db.execute("CREATE SOURCE t (v BIGINT)")
    db.execute(f"CREATE SINK k FROM t WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}', topic = '{out}', "
               "partitioner = 'key-hash', 'delivery.guarantee' = 'exactly-once')")
    db.insert("t", [{"v": i} for i in range(100)])
    db.checkpoint()
    db.insert("t", [{"v": i} for i in range(100, 150)])
    while db.sink_metrics("k").total_events < 150:
        time.sleep(0.01)
    time.sleep(1.0)  # the open transaction's records reach the broker
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_exactly_once_a_killed_sinks_open_transaction_is_aborted_and_each_row_committed_once(kafka, tmp_path):
    from kafka_broker import read_committed

    out, path = kafka.create_topic(2, "eo"), str(tmp_path / "db")
    child = subprocess.Popen(
        [sys.executable, "-c", EXACTLY_ONCE_CHILD, path, kafka.servers, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # Rows 100..149 are in the WAL and in a transaction the dead process left open.
    db = laminardb.open(path, config=laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=3_600_000))
    db.start()
    db.close()  # replays them; the reopened shards abort the old transactions, commit anew
    committed, aborted, markers = [], [], []
    for p in range(2):
        t = read_committed(kafka.servers, out, p)
        committed += [json.loads(v)["v"] for _, v in t.committed]
        aborted += [json.loads(v)["v"] for _, v in t.aborted]
        markers += [kind for _, kind in t.markers]
    assert sorted(committed) == list(range(150)), "each row committed exactly once"
    assert sorted(aborted) == list(range(100, 150)), "the dead process's open transaction was aborted"
    assert "ABORT" in markers and "COMMIT" in markers


def test_start_fails_naming_a_topic_that_does_not_exist(kafka):
    db = laminardb.open(":memory:")
    try:
        db.execute(
            f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
            "topic = 'no-such-topic', 'group.id' = 'g')"
        )
        with pytest.raises(laminardb.ConnectorError) as ei:
            db.start()
        assert "source 's' could not start" in str(ei.value) and "'no-such-topic'" in str(ei.value)
    finally:
        db.close()



def test_partition_discovery_interval_is_checked_at_create(db):
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(
            "CREATE SOURCE s (k BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:1', "
            "topic = 't', 'group.id' = 'g', 'partition.discovery.interval.ms' = 'often')"
        )
    assert "partition.discovery.interval.ms" in str(ei.value)


def client_threads(prefixes: tuple = ("rdk:", "laminardb-kafka")) -> set:
    """(id, name) of this process's threads whose names start with one of `prefixes`."""
    found = set()
    for t in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{t}/comm").read().strip()
        except FileNotFoundError:  # ended meanwhile
            continue
        if name.startswith(prefixes):
            found.add((t, name))
    return found


def test_a_source_reads_many_partitions_on_few_shards_through_one_client(kafka):
    """Seven partitions on two shards: every record once, each partition's in order, and
    the source has one librdkafka client for all of them (one `rdk:main` thread)."""
    partitions, n = 7, 7_000
    src = kafka.create_topic(partitions, "many")
    producer = Producer({"bootstrap.servers": kafka.servers, "linger.ms": 5})
    for i in range(n):
        producer.produce(src, json.dumps({"v": i}).encode(), partition=i % partitions)
    assert producer.flush(30) == 0
    before = client_threads(("rdk:main",))
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    try:
        db.execute(
            f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
            f"topic = '{src}', 'group.id' = 'many', 'auto.offset.reset' = 'earliest')"
        )
        sub = db.subscribe_stream("s")
        db.start()
        values = [v for (v,) in poll_rows(sub, ("v",), n, timeout=60)]
        # A consumer made for a moment at start (to count the partitions) may still be
        # closing.
        assert wait_until(lambda: len(client_threads(("rdk:main",)) - before) == 1, timeout=10), client_threads(("rdk:main",)) - before
    finally:
        db.close()
    assert sorted(values) == list(range(n)), "every record once"
    for p in range(partitions):
        own = [v for v in values if v % partitions == p]
        assert own == sorted(own), f"partition {p} in order"


def test_close_leaves_no_kafka_client_thread_behind(kafka):
    """After `close()` no librdkafka thread and no partition-counting thread of ours is
    left (they ended with the last open partition), though the database object lives on."""

    def ours() -> set:
        # Other tests' clients (confluent-kafka's, in this process) are not this test's.
        return client_threads() - before

    before = client_threads()
    src, out = kafka.create_topic(3, "src"), kafka.create_topic(3, "out")
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.execute(
        f"CREATE SOURCE s (v BIGINT) WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', "
        f"topic = '{src}', 'group.id' = 'g', 'partition.discovery.interval.ms' = '60000')"
    )
    db.execute(f"CREATE SINK k FROM s WITH (connector = 'kafka', 'bootstrap.servers' = '{kafka.servers}', topic = '{out}')")
    db.start()
    assert "laminardb-kafka" in {name for _, name in ours()}
    db.close()
    assert wait_until(lambda: not ours(), timeout=5), ours()
