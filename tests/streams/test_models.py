"""Model streams (streams/models.py, streams/store.py): per-stream state across batches (many
streams batched give what each alone gives), windows, resuming, expiry on the hub's clock, the
bounds on streams and state memory, backpressure from a client that does not read, /metrics."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack

import httpx
import numpy as np
import pytest
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.streams.conftest import MODELS, on_loop, stream_server, ws_url
from tests.streams.test_websocket import _frame, _handshake, _masked
from webtorch.serve.model import import_model_file
from webtorch.streams.store import Full, InUse, StreamState, StreamStore

GRU = "/v2/models/gru/stream"


def _alone(items: np.ndarray) -> np.ndarray:
    """The GRU model run on one stream's items one at a time, in this process."""
    net = import_model_file(MODELS / "gru.py").network()  # type: ignore[operator]
    net.eval()
    h = torch.zeros(1, 8)
    out = []
    with torch.inference_mode():
        for item in items:
            y, h = net(torch.tensor(item[None], dtype=torch.float32), h)
            out.append(y[0].numpy())
    return np.stack(out)


def test_streams_batched_together_answer_what_each_alone_would() -> None:
    rng = np.random.default_rng(1)
    streams, steps = 12, 15
    data = rng.normal(size=(streams, steps, 3)).astype(np.float32)
    with stream_server() as running:
        executor = running.app.repository.endpoints["gru"].executor
        stack = ExitStack()
        clients = [stack.enter_context(connect(ws_url(running, GRU))) for _ in range(streams)]
        for ws in clients:
            ws.recv(timeout=10)
        batches0 = on_loop(running, lambda: executor.stats.batches)
        got = np.zeros((streams, steps, 4), dtype=np.float32)
        for t in range(steps):
            # Every stream's item t queued while the model is held, then one batch: the
            # states of all streams gathered, the new ones scattered.
            on_loop(running, executor.hold)
            for s, ws in enumerate(clients):
                ws.send(json.dumps({"id": t, "x": data[s, t].tolist()}))
            while on_loop(running, lambda: executor.scheduler.queued_rows) < streams:
                pass  # the items are on their way through the sockets
            on_loop(running, executor.release)
            for s, ws in enumerate(clients):
                answer = json.loads(ws.recv(timeout=10))
                assert answer["id"] == t
                got[s, t] = answer["outputs"]["y"]
        stack.close()
        batches = on_loop(running, lambda: executor.stats.batches) - batches0
    # One forward pass per step for all twelve streams.
    assert batches == steps
    for s in range(streams):
        np.testing.assert_allclose(got[s], _alone(data[s]), rtol=1e-4, atol=1e-5)


def test_a_window_model_answers_every_nth_item_once_the_window_is_full() -> None:
    with stream_server() as running, connect(ws_url(running, "/v2/models/window/stream")) as ws:
        ws.recv(timeout=10)
        for i in range(9):
            ws.send(json.dumps({"x": [1, 0, i]}))
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
        # Items 3, 5, 7 complete windows (4 items, every 2nd): sums of the last four.
        assert [a["id"] for a in answers] == [3, 5, 7]
        assert [a["outputs"]["y"] for a in answers] == [
            [4, 0, 0 + 1 + 2 + 3],
            [4, 0, 2 + 3 + 4 + 5],
            [4, 0, 4 + 5 + 6 + 7],
        ]


def _run(ws: ClientConnection, items: np.ndarray) -> list[list[float]]:
    for item in items:
        ws.send(json.dumps({"x": item.tolist()}))
    return [json.loads(ws.recv(timeout=10))["outputs"]["y"] for _ in items]


def test_a_stream_resumed_by_its_id_carries_on_its_state() -> None:
    items = np.random.default_rng(2).normal(size=(10, 3)).astype(np.float32)
    with stream_server() as running:
        with connect(ws_url(running, GRU + "?stream=car-7")) as ws:
            assert json.loads(ws.recv(timeout=10)) == {"stream": "car-7", "resumed": False}
            first = _run(ws, items[:5])
        # Closed cleanly: the server detached it when the close handshake ended. A resume
        # may still come first: 409 until then.
        for _ in range(1000):
            try:
                ws = connect(ws_url(running, GRU + "?stream=car-7"))
                break
            except InvalidStatus as exc:
                assert exc.response.status_code == 409
        with ws:
            assert json.loads(ws.recv(timeout=10)) == {"stream": "car-7", "resumed": True}
            rest = _run(ws, items[5:])
            with pytest.raises(InvalidStatus) as info:  # one connection per stream
                connect(ws_url(running, GRU + "?stream=car-7"))
            assert info.value.response.status_code == 409
    np.testing.assert_allclose(first + rest, _alone(items), rtol=1e-4, atol=1e-5)


def test_a_closed_stream_expires_after_the_configured_time() -> None:
    with stream_server({"expiry": 30}) as running:
        streams = running.app.streams
        assert streams is not None
        with connect(ws_url(running, GRU + "?stream=s1")) as ws:
            ws.recv(timeout=10)
            _run(ws, np.ones((2, 3), dtype=np.float32))
        store, hub = streams.store, streams.hub
        while on_loop(running, lambda: store.attached):  # the close handshake's end
            pass
        now = on_loop(running, hub.clock)
        on_loop(running, lambda: hub.tick(now + 29))
        assert on_loop(running, lambda: len(store.streams)) == 1
        on_loop(running, lambda: hub.tick(now + 31))
        assert on_loop(running, lambda: (len(store.streams), store.bytes, store.expired)) == (
            0,
            0,
            1,
        )
        with connect(ws_url(running, GRU + "?stream=s1")) as ws:
            assert json.loads(ws.recv(timeout=10))["resumed"] is False


def test_streams_and_state_memory_are_bounded() -> None:
    with stream_server({"max_streams": 2}) as running, ExitStack() as two:
        two.enter_context(connect(ws_url(running, GRU)))
        two.enter_context(connect(ws_url(running, GRU)))
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(running, GRU))
        assert info.value.response.status_code == 503
        assert b"streams.max_streams = 2" in info.value.response.body
    # 8 float32 of GRU state per stream = 32 bytes: 64 bytes hold two.
    with stream_server({"max_state_bytes": 64}) as running, ExitStack() as two:
        two.enter_context(connect(ws_url(running, GRU)))
        two.enter_context(connect(ws_url(running, GRU)))
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(running, GRU))
        assert b"max_state_bytes = 64" in info.value.response.body
    with stream_server({"max_connections": 1}) as running:
        with connect(ws_url(running, GRU)), pytest.raises(InvalidStatus) as info:
            connect(ws_url(running, GRU))
        assert b"streams.max_connections = 1" in info.value.response.body


def test_the_store_on_a_fake_clock() -> None:
    store = StreamStore(max_streams=2, max_bytes=1000, expiry=10)
    a = store.attach(StreamState(("m", "a"), np.zeros(4, np.float32), None), now=0)
    with pytest.raises(InUse):
        store.attach(StreamState(("m", "a"), np.zeros(4, np.float32), None), now=1)
    store.attach(StreamState(("m", "b"), np.zeros(4, np.float32), None), now=1)
    with pytest.raises(Full):
        store.attach(StreamState(("m", "c"), np.zeros(4, np.float32), None), now=2)
    store.detach(a, now=5)
    with pytest.raises(Full):  # detached, not yet expired: still kept
        store.attach(StreamState(("m", "c"), np.zeros(4, np.float32), None), now=14)
    c = store.attach(StreamState(("m", "c"), np.zeros(4, np.float32), None), now=15)
    assert set(store.streams) == {("m", "b"), ("m", "c")} and store.bytes == 32
    assert store.expired == 1 and c.attached
    window = StreamState(("m", "w"), None, np.zeros((3, 1), np.float32))
    for i in range(5):
        window.push(np.array([i], np.float32))
    assert window.recent()[:, 0].tolist() == [2, 3, 4]


def test_a_client_that_does_not_read_stops_being_read() -> None:
    """Backpressure: the server stops reading a stream whose client does not read its answers
    (write buffer above its mark) and whose queue is full, so the client's sends block, with
    what the server holds bounded; once the client reads, every answer comes, in order."""
    with stream_server({"write_buffer": 65536, "max_pending": 8}) as running:
        sock = _handshake(running, "/v2/models/wide/stream")
        sock.setblocking(False)
        pad = "p" * 60_000  # big items fill the socket buffers fast
        sent = 0
        blocked = False
        pending = b""
        while sent < 5000:
            if not pending:
                pending = _masked(0x1, json.dumps({"id": sent, "x": [sent], "pad": pad}).encode())
            try:
                n = sock.send(pending)
            except BlockingIOError:
                blocked = True
                break
            pending = pending[n:]
            if not pending:
                sent += 1
        assert blocked, "the server read everything a non-reading client sent"
        streams = running.app.streams
        assert streams is not None

        def held() -> tuple[int, int, int]:
            (ws,) = streams.hub.open
            session = ws.handler
            assert ws.transport is not None
            return ws.transport.get_write_buffer_size(), len(session.queue), int(ws.held)

        buffered, queued, _ = on_loop(running, held)
        answer = 8192 * 5  # about, as JSON
        assert queued <= 8 and buffered <= 65536 + 9 * answer
        # Now read: every item sent in full is answered, in order.
        sock.setblocking(True)
        sock.settimeout(30)
        if pending:
            threading.Thread(target=sock.sendall, args=(pending,), daemon=True).start()
            sent += 1
        ids = [json.loads(_frame(sock)[1])["id"] for _ in range(sent)]
        assert ids == list(range(sent))
        sock.close()


def test_metrics_show_streams_items_latency_and_state() -> None:
    with stream_server() as running:
        with connect(ws_url(running, GRU)) as ws:
            ws.recv(timeout=10)
            _run(ws, np.ones((3, 3), dtype=np.float32))
            text = httpx.get(running.url + "/metrics").text
        assert "webtorch_streams_open 1.0" in text
        assert "webtorch_streams_items_total 3.0" in text
        assert "webtorch_streams_item_seconds_count 3.0" in text
        assert "webtorch_streams_state_bytes 32.0" in text
        assert "webtorch_websocket_connections 1.0" in text


def test_a_message_may_carry_several_items_in_order() -> None:
    items = np.random.default_rng(5).normal(size=(6, 3)).astype(np.float32)
    with stream_server() as running, connect(ws_url(running, GRU)) as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps([{"x": item.tolist()} for item in items[:4]]))
        ws.send(json.dumps([{"x": [1, 2]}, {"x": items[4].tolist()}, {"x": items[5].tolist()}]))
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(7)]
    errors = [a for a in answers if "error" in a]
    assert len(errors) == 1 and "expected [3]" in errors[0]["error"]
    good = [a for a in answers if "outputs" in a]
    assert [a["id"] for a in good] == list(range(6))
    np.testing.assert_allclose(
        [a["outputs"]["y"] for a in good], _alone(items), rtol=1e-4, atol=1e-5
    )


def test_binary_messages_carry_items_as_little_endian_rows() -> None:
    """A binary message is one or more items as float32 rows of the item's shape, numbered in
    arrival order: the GRU answers them as it does the JSON items; a length that is not a whole
    number of rows gets an error answer naming the size, and the stream goes on."""
    items = np.random.default_rng(7).normal(size=(6, 3)).astype(np.float32)
    with stream_server() as running, connect(ws_url(running, GRU)) as ws:
        ws.recv(timeout=10)
        ws.send(items[0].astype("<f4").tobytes())  # one item
        ws.send(items[1:5].astype("<f4").tobytes())  # four
        ws.send(b"\x00" * 13)  # not a whole row (12 bytes each)
        ws.send(b"")
        ws.send(json.dumps({"x": items[5].tolist()}))  # the JSON form numbers on
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(8)]
    errors = [a for a in answers if "error" in a]
    assert len(errors) == 2
    assert all("[3] float32 little-endian, 12 bytes each" in e["error"] for e in errors)
    assert "13 bytes" in errors[0]["error"]
    good = [a for a in answers if "outputs" in a]
    assert [a["id"] for a in good] == list(range(6))
    np.testing.assert_allclose(
        [a["outputs"]["y"] for a in good], _alone(items), rtol=1e-4, atol=1e-5
    )


def test_binary_rows_fill_a_window_as_json_items_do() -> None:
    with stream_server() as running, connect(ws_url(running, "/v2/models/window/stream")) as ws:
        ws.recv(timeout=10)
        rows = np.array([[1, 0, i] for i in range(9)], dtype="<f4")
        ws.send(rows[:5].tobytes())
        ws.send(rows[5:].tobytes())
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
    assert [a["id"] for a in answers] == [3, 5, 7]
    assert [a["outputs"]["y"] for a in answers][2] == [4, 0, 4 + 5 + 6 + 7]


def test_binary_items_need_a_fixed_item_shape() -> None:
    with stream_server() as running, connect(ws_url(running, "/v2/models/free/stream")) as ws:
        ws.recv(timeout=10)
        ws.send(b"\x00" * 8)
        assert "not fixed: send items as JSON" in json.loads(ws.recv(timeout=10))["error"]
        ws.send(b"\x00" * 8)  # and the stream goes on
        assert "not fixed" in json.loads(ws.recv(timeout=10))["error"]
