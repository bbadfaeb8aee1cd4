"""The `websocket` source and sink against real WebSocket peers (the `websockets` package,
on 127.0.0.1): a feed read and read again after its server drops the connection, a server
source taking many publishers, a server sink fanning out with a slow client dropped or
disconnected by policy, replay for late joiners, tokens, a client sink."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve

import laminardb
from conftest import poll_rows, wait_until

# websockets 16+ prefers `with connect(…)`; the tests hold connections across steps.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect(sub, n: int, column: str) -> list:
    return [v for (v,) in poll_rows(sub, (column,), n, timeout=20)]


class Feed:
    """A WebSocket server in a thread: `handler(ws, n)` for its n-th connection; with
    `ssl` (a server `SSLContext`) a `wss://` one, at `localhost`."""

    def __init__(self, handler, ssl=None):
        self.port = free_port()
        self.connections = 0
        self.headers: list = []
        self.secure = ssl is not None

        def on_connect(ws):
            self.connections += 1
            self.headers.append(ws.request.headers.get("Authorization"))
            handler(ws, self.connections)

        self.server = serve(on_connect, "127.0.0.1", self.port, ssl=ssl)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"wss://localhost:{self.port}/feed" if self.secure else f"ws://127.0.0.1:{self.port}/feed"

    def close(self) -> None:
        self.server.shutdown()


def test_a_client_source_reads_a_feed_and_reconnects_after_the_server_drops_it():
    stop = threading.Event()

    def handler(ws, n):
        base = 0 if n == 1 else 3
        for i in range(base, base + 3):
            ws.send(json.dumps({"symbol": "A", "px": float(i), "seq": i}))
        if n == 1:
            return  # the server drops the first connection
        stop.wait(30)

    feed = Feed(handler)
    db = laminardb.open(":memory:")
    try:
        db.execute(
            "CREATE SOURCE ticks (symbol VARCHAR, px DOUBLE, seq BIGINT) WITH (connector = 'websocket', "
            f"url = '{feed.url}', auth = 'Bearer t0k', 'reconnect.initial_delay_ms' = '50')"
        )
        sub = db.subscribe_stream("ticks")
        db.start()
        assert collect(sub, 6, "seq") == [0, 1, 2, 3, 4, 5]
        metrics = db.source_metrics("ticks")
        assert feed.connections == 2
        assert feed.headers == ["Bearer t0k", "Bearer t0k"]
        assert metrics.errors >= 1 and "connecting again in" in metrics.last_error, metrics.last_error
        assert metrics.total_events == 6
    finally:
        stop.set()
        db.close()
        feed.close()


def test_a_server_source_takes_many_publishers_and_refuses_a_wrong_token(tmp_path):
    port, dead = free_port(), tmp_path / "dead.jsonl"
    db = laminardb.open(":memory:")
    try:
        db.execute(
            "CREATE SOURCE telemetry (device VARCHAR, temp DOUBLE) WITH (connector = 'websocket', mode = 'server', "
            f"bind_address = '127.0.0.1:{port}', auth = 'Bearer s3cret', 'dead_letter.path' = '{dead}')"
        )
        sub = db.subscribe_stream("telemetry")
        db.start()
        url = f"ws://127.0.0.1:{port}/"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers={"Authorization": "Bearer guess"})
        assert refused.value.response.status_code == 401
        publishers = [connect(url, additional_headers={"Authorization": "Bearer s3cret"}) for _ in range(2)]
        publishers.append(connect(url + "?token=s3cret"))
        for p, ws in enumerate(publishers):
            for i in range(5):
                ws.send(json.dumps({"device": f"d{p}", "temp": float(i)}))
        ws = publishers[0]
        ws.send("not json")
        got = collect(sub, 15, "device")
        assert sorted(got) == sorted([f"d{p}" for p in range(3) for _ in range(5)])
        # Two errors: the refused client and the message that did not decode.
        wait_until(lambda: db.source_metrics("telemetry").errors >= 2)
        assert db.source_metrics("telemetry").errors == 2
        metrics = db.source_metrics("telemetry")
        # The one reader's queue (queue.capacity, 65,536 by default), drained by now.
        assert (metrics.capacity, metrics.pending, metrics.is_backpressured) == (65_536, 0, False)
        [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
        assert letter["payload"] == "not json" and letter["source"] == f"websocket server 127.0.0.1:{port}"
        for ws in publishers:
            ws.close()
    finally:
        db.close()


PAD = "x" * 1000


def read_all(ws, out: list, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            out.append(json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))["v"])
    except (ConnectionClosed, TimeoutError):
        pass


@pytest.mark.parametrize("policy", ["drop", "disconnect"])
def test_a_server_sink_fans_out_and_a_stalled_client_never_holds_it_back(policy):
    port = free_port()
    n = 20_000  # 20 MB of messages: more than the stalled client's socket buffers hold
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=2))
    try:
        db.execute("CREATE SOURCE t (v BIGINT, pad VARCHAR)")
        db.execute(
            f"CREATE SINK out FROM t WITH (connector = 'websocket', bind_address = '127.0.0.1:{port}', "
            f"slow_client_policy = '{policy}', 'client.buffer' = '2000')"
        )
        url = f"ws://127.0.0.1:{port}/"
        fast, stalled = (connect(url, max_size=None, ping_interval=None) for _ in range(2))
        time.sleep(0.2)  # both are registered before the first row
        got: list = []
        reader = threading.Thread(target=read_all, args=(fast, got, n, 60))
        reader.start()
        for start in range(0, n, 1000):
            db.insert("t", [{"v": i, "pad": PAD} for i in range(start, start + 1000)])
            # The reading client keeps up (its queue takes a 1,000-row burst); the stalled
            # one falls further behind with every batch.
            deadline = time.monotonic() + 10
            while len(got) < start + 1000 and time.monotonic() < deadline:
                time.sleep(0.001)
        reader.join()
        assert sorted(got) == list(range(n)), "the client that reads gets every row"
        late: list = []
        read_all(stalled, late, n, 3)
        assert len(late) < n, "the stalled client lost messages instead of holding the sink back"
        if policy == "disconnect":
            with pytest.raises(ConnectionClosed):
                stalled.recv(timeout=3)
        else:
            db.insert("t", [{"v": n, "pad": PAD}])
            assert json.loads(stalled.recv(timeout=5))["v"] == n, "a dropping client stays connected"
        assert db.sink_metrics("out").total_events >= n
        fast.close()
        stalled.close()
    finally:
        db.close()


def test_a_late_client_gets_the_replay_buffer_and_a_wrong_token_is_refused():
    port = free_port()
    # One shard: the replay buffer keeps the last rows in the order they were sent, and
    # with several shards that order between them is not fixed.
    db = laminardb.open(":memory:", config=laminardb.LaminarConfig(shards=1))
    try:
        db.execute("CREATE SOURCE t (v BIGINT)")
        db.execute(
            f"CREATE SINK out FROM t WITH (connector = 'websocket', bind_address = '127.0.0.1:{port}', "
            "replay_buffer_size = '3', auth = 'Bearer k')"
        )
        db.insert("t", [{"v": i} for i in range(5)])
        url = f"ws://127.0.0.1:{port}/"
        with pytest.raises(InvalidStatus) as refused:
            connect(url)
        assert refused.value.response.status_code == 401
        late = connect(url, additional_headers={"Authorization": "Bearer k"})
        assert [json.loads(late.recv(timeout=5))["v"] for _ in range(3)] == [2, 3, 4]
        db.insert("t", [{"v": 5}])
        assert json.loads(late.recv(timeout=5)) == {"v": 5}
        late.close()
    finally:
        db.close()


def test_a_client_sink_sends_every_row_to_its_server_in_csv():
    received: list = []
    done = threading.Event()

    def handler(ws, _n):
        for message in ws:
            received.append(message)
            if len(received) == 100:
                done.set()

    feed = Feed(handler)
    db = laminardb.open(":memory:")
    try:
        db.execute("CREATE SOURCE t (v BIGINT, s VARCHAR)")
        db.execute(f"CREATE SINK up FROM t WITH (connector = 'websocket', mode = 'client', url = '{feed.url}', format = 'csv')")
        db.insert("t", [{"v": i, "s": f"r{i}"} for i in range(100)])
        assert done.wait(10)
        assert sorted(received, key=lambda m: int(m.split(",")[0])) == [f"{i},r{i}" for i in range(100)]
    finally:
        db.close()
        feed.close()


@pytest.mark.parametrize(
    ("kind", "with_", "named"),
    [
        ("SOURCE", "connector = 'websocket'", "'url'"),
        ("SOURCE", "connector = 'websocket', mode = 'server'", "'bind_address'"),
        ("SOURCE", "connector = 'websocket', url = 'wss://feed.example/x', 'ssl.ca.location' = '/nonexistent.pem'", "ssl.ca.location"),
        ("SINK", "connector = 'websocket'", "'bind_address'"),
        ("SINK", "connector = 'websocket', mode = 'client'", "'url'"),
        ("SINK", "connector = 'websocket', bind_address = '127.0.0.1:1', slow_client_policy = 'wait'", "'wait'"),
    ],
)
def test_missing_or_bad_websocket_options_are_connector_errors_at_create(db, kind, with_, named):
    if kind == "SOURCE":
        statement = f"CREATE SOURCE s (v BIGINT) WITH ({with_})"
    else:
        db.execute("CREATE SOURCE t (v BIGINT)")
        statement = f"CREATE SINK s FROM t WITH ({with_})"
    with pytest.raises(laminardb.ConnectorError) as ei:
        db.execute(statement)
    assert named in str(ei.value)


def test_start_fails_naming_the_address_when_a_server_source_cannot_listen():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    db = laminardb.open(":memory:")
    try:
        db.execute(f"CREATE SOURCE s (v BIGINT) WITH (connector = 'websocket', mode = 'server', bind_address = '127.0.0.1:{port}')")
        with pytest.raises(laminardb.ConnectorError) as ei:
            db.start()
        assert "source 's' could not start" in str(ei.value) and f"127.0.0.1:{port}" in str(ei.value)
        taken.close()
        db.start()  # the address is free now: starting again opens it
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send('{"v": 7}')
        wait_until(lambda: db.source_metrics("s").total_events >= 1)
        assert db.query("SELECT v FROM s").to_arrow().column("v").to_pylist() == [7]
    finally:
        db.close()


def test_a_second_sink_on_the_same_address_is_refused_and_the_first_goes_on():
    port = free_port()
    db = laminardb.open(":memory:")
    try:
        db.execute("CREATE SOURCE t (v BIGINT)")
        db.execute(f"CREATE SINK a FROM t WITH (connector = 'websocket', bind_address = '127.0.0.1:{port}')")
        with pytest.raises(laminardb.ConnectorError) as ei:
            db.execute(f"CREATE SINK b FROM t WITH (connector = 'websocket', bind_address = '127.0.0.1:{port}')")
        assert f"127.0.0.1:{port}" in str(ei.value)
        assert db.list_sinks() == ["a"]
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            time.sleep(0.1)
            db.insert("t", [{"v": 1}])
            assert json.loads(ws.recv(timeout=5)) == {"v": 1}
    finally:
        db.close()


def test_a_bare_number_into_a_timestamp_column_is_epoch_milliseconds_as_in_an_insert():
    port = free_port()
    db = laminardb.open(":memory:")
    db.execute(
        f"CREATE SOURCE w (ts TIMESTAMP, v BIGINT) WITH (connector = 'websocket', mode = 'server', "
        f"bind_address = '127.0.0.1:{port}')"
    )
    db.start()
    with connect(f"ws://127.0.0.1:{port}/") as ws:
        ws.send(json.dumps({"ts": 1_700_000_000_000, "v": 1}))
        ws.send(json.dumps({"ts": "2023-11-14T22:13:20Z", "v": 2}))
    wait_until(lambda: db.source_metrics("w").total_events >= 2)
    db.insert("w", {"ts": 1_700_000_000_000, "v": 3})
    got = db.query("SELECT CAST(ts AS BIGINT) AS t FROM w ORDER BY v").to_dicts()["t"]
    db.close()
    assert got == [1_700_000_000_000_000] * 3
