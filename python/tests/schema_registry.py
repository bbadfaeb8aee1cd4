"""A schema registry for the Avro tests, speaking the part of Confluent's REST API that
clients use: register a schema under a subject, look one up by id, list subjects.

No Confluent-compatible registry installs on this machine (Karapace is not on PyPI;
Confluent's and Apicurio's registries come from Maven or Docker), so the tests run this
one. The Avro messages themselves are written and read by confluent-kafka's
`AvroSerializer`/`AvroDeserializer` (fastavro), independent of laminardb's code."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SchemaRegistry:
    """Plain HTTP by default; `ssl_context` serves it over TLS, and `user_info`
    (`user:password`) refuses requests without that basic authentication (401).
    `handshake_delay` (seconds) holds each TLS handshake back that long; `connections`
    counts the connections taken."""

    def __init__(self, ssl_context=None, user_info: str | None = None, handshake_delay: float = 0) -> None:
        self.schemas: list[str] = []  # id - 1 -> schema text
        self.subjects: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.refused = 0
        self.connections = 0
        registry = self
        expected = "Basic " + base64.b64encode(user_info.encode()).decode() if user_info else None

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                with registry.lock:
                    registry.connections += 1
                if handshake_delay:
                    time.sleep(handshake_delay)
                    self.request.do_handshake()
                super().setup()

            def log_message(self, *args) -> None:
                pass

            def allowed(self) -> bool:
                if expected is None or self.headers.get("Authorization") == expected:
                    return True
                registry.refused += 1
                self.answer(401, {"error_code": 401, "message": "Unauthorized"})
                return False

            def answer(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if not self.allowed():
                    return
                path = self.path.split("?")[0]
                if path == "/subjects":
                    return self.answer(200, sorted(registry.subjects))
                m = re.fullmatch(r"/schemas/ids/(\d+)", path)
                if m and 0 < int(m[1]) <= len(registry.schemas):
                    return self.answer(200, {"schema": registry.schemas[int(m[1]) - 1]})
                m = re.fullmatch(r"/subjects/([^/]+)/versions/latest", path)
                if m and m[1] in registry.subjects:
                    ids = registry.subjects[m[1]]
                    return self.answer(200, {"subject": m[1], "id": ids[-1], "version": len(ids), "schema": registry.schemas[ids[-1] - 1]})
                self.answer(404, {"error_code": 40403, "message": "Schema not found"})

            def do_POST(self) -> None:
                if not self.allowed():
                    return
                path = self.path.split("?")[0]
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                m = re.fullmatch(r"/subjects/([^/]+)/versions", path)
                if not m:
                    return self.answer(404, {"error_code": 404, "message": "not found"})
                schema = json.dumps(json.loads(body["schema"]), separators=(",", ":"), sort_keys=True)
                with registry.lock:
                    if schema in registry.schemas:
                        id_ = registry.schemas.index(schema) + 1
                    else:
                        registry.schemas.append(schema)
                        id_ = len(registry.schemas)
                    versions = registry.subjects.setdefault(m[1], [])
                    if id_ not in versions:
                        versions.append(id_)
                self.answer(200, {"id": id_})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(
                self.server.socket, server_side=True, do_handshake_on_connect=not handshake_delay
            )
            if handshake_delay:
                # A client that gave a delayed handshake up is no error of the server's.
                self.server.handle_error = lambda request, address: None
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
