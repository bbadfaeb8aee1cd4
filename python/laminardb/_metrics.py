"""The connection's metrics in the Prometheus text exposition format (`metrics_text()`),
and the opt-in HTTP endpoint serving them (`LaminarConfig(metrics_port=…)`: GET /metrics on
127.0.0.1, on a daemon thread, closed with the connection)."""

from __future__ import annotations

import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, List, Optional, Tuple

_Sample = Tuple[str, Optional[dict], float]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(lines: List[str], name: str, kind: str, help_text: str, samples: Iterable[_Sample]) -> None:
    samples = list(samples)
    if not samples:
        return
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for suffix, labels, value in samples:
        text = ",".join(f'{k}="{_label(str(v))}"' for k, v in (labels or {}).items())
        lines.append(f"{name}{suffix}{{{text}}} {float(value)!r}" if text else f"{name}{suffix} {float(value)!r}")


def _per_object(lines: List[str], table: list, objects: list, labels: Callable[[Any], dict]) -> None:
    """One family per (name, kind, help, attribute) row of `table`, a sample per object."""
    for name, kind, help_text, attr in table:
        _family(lines, name, kind, help_text, [("", labels(o), getattr(o, attr)) for o in objects])


def render(conn: Any) -> str:
    lines: List[str] = []
    m = conn.metrics()
    pipeline = [
        ("laminardb_events_ingested_total", "counter", "Rows inserted into or read by sources.", m.total_events_ingested),
        ("laminardb_events_emitted_total", "counter", "Rows emitted by streams and written by sinks.", m.total_events_emitted),
        ("laminardb_events_dropped_total", "counter", "Rows dropped (late rows, lagging subscribers).", m.total_events_dropped),
        ("laminardb_uptime_seconds", "gauge", "Seconds since the connection opened.", m.uptime_secs),
        ("laminardb_checkpoints_total", "counter", "Checkpoints taken by this connection.", m.checkpoints),
        ("laminardb_last_checkpoint_duration_ms", "gauge", "Duration of the last checkpoint.", m.last_checkpoint_ms),
        ("laminardb_last_checkpoint_bytes", "gauge", "Bytes the last checkpoint wrote.", m.last_checkpoint_bytes),
        ("laminardb_recovered_rows", "gauge", "Rows replayed from the WAL at open.", m.recovered_rows),
    ]
    for name, kind, help_text, value in pipeline:
        _family(lines, name, kind, help_text, [("", None, value)])
    _family(lines, "laminardb_pipeline_running", "gauge", "1 while the pipeline runs.", [("", None, 1 if m.state == "Running" else 0)])

    sources = conn.all_source_metrics()
    per_source = [
        ("laminardb_source_events_total", "counter", "Rows of the source.", "total_events"),
        ("laminardb_source_pending", "gauge", "Rows or messages waiting to enter the engine.", "pending"),
        ("laminardb_source_errors_total", "counter", "Input the source left out or could not reach.", "errors"),
        ("laminardb_source_late_events_total", "counter", "Rows streams dropped as too late.", "late_events"),
        ("laminardb_source_watermark_ms", "gauge", "The source's watermark (epoch ms).", "watermark"),
        ("laminardb_source_utilization", "gauge", "Share of the source's queue in use.", "utilization"),
    ]
    _per_object(lines, per_source, sources, lambda s: {"source": s.name})

    streams = conn.all_stream_metrics()
    per_stream = [
        ("laminardb_stream_events_total", "counter", "Rows the stream emitted.", "total_events"),
        ("laminardb_stream_errors_total", "counter", "Errors the stream met.", "errors"),
        ("laminardb_stream_rejected_rows_total", "counter", "Input rows the stream's expressions failed on.", "rejected_rows"),
        ("laminardb_stream_lagged_batches_total", "counter", "Batches subscribers lost by reading too slowly.", "lagged_batches"),
        ("laminardb_stream_subscribers", "gauge", "Subscribers of the stream.", "subscribers"),
        ("laminardb_stream_watermark_ms", "gauge", "The stream's watermark (epoch ms).", "watermark"),
        ("laminardb_stream_join_left_rows", "gauge", "Rows of its left input the stream's join holds.", "join_left_rows"),
        ("laminardb_stream_join_right_rows", "gauge", "Rows of its right input the stream's join holds.", "join_right_rows"),
    ]
    _per_object(lines, per_stream, streams, lambda s: {"stream": s.name})
    latency: List[_Sample] = []
    for s in streams:
        if s.latency_count == 0:
            continue
        for quantile, value in (("0.5", s.latency_p50_us), ("0.99", s.latency_p99_us), ("0.999", s.latency_p999_us), ("1", s.latency_max_us)):
            latency.append(("", {"stream": s.name, "quantile": quantile}, value))
        latency.append(("_count", {"stream": s.name}, s.latency_count))
    _family(lines, "laminardb_stream_latency_microseconds", "summary",
            "Engine latency from an insert entering the engine to its rows reaching subscribers.", latency)

    sinks = conn.all_sink_metrics()
    per_sink = [
        ("laminardb_sink_events_total", "counter", "Rows handed to the sink's connector.", "total_events"),
        ("laminardb_sink_bytes_total", "counter", "Bytes the sink put out.", "total_bytes"),
        ("laminardb_sink_errors_total", "counter", "Writes, deliveries or commits that failed.", "errors"),
    ]
    _per_object(lines, per_sink, sinks, lambda s: {"sink": s.name, "connector": s.connector})
    _family(lines, "laminardb_sink_last_commit_id", "gauge", "The last checkpoint the sink committed at.",
            [("", {"sink": s.name}, s.last_commit_id) for s in sinks if s.last_commit_id is not None])
    return "\n".join(lines) + "\n"


def serve(conn: Any, port: int) -> ThreadingHTTPServer:
    """Serves `render(conn)` at http://127.0.0.1:`port`/metrics until `conn` closes (or is
    dropped: the server holds it only weakly)."""
    ref = weakref.ref(conn)
    del conn

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            try:
                conn = ref()
                if conn is None:
                    raise RuntimeError("the connection is gone")
                body = render(conn).encode()
                status = 200
            except Exception as exc:  # noqa: BLE001 - a closed connection, say
                body, status = f"# {type(exc).__name__}: {exc}\n".encode(), 503
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="laminardb-metrics", daemon=True).start()

    def close_with_connection() -> None:
        while True:
            conn = ref()
            if conn is None or conn.is_closed:
                break
            del conn
            time.sleep(0.1)
        server.shutdown()
        server.server_close()

    threading.Thread(target=close_with_connection, name="laminardb-metrics-close", daemon=True).start()
    return server
