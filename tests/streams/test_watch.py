"""Server-sent events for answers only (streams/watch.py): a watcher follows an open stream's
answers as they are sent; it ends when the stream closes; what it cannot follow is refused."""

from __future__ import annotations

import json

import httpx
from websockets.sync.client import connect

from tests.streams.conftest import on_loop, stream_server, ws_url

GRU = "/v2/models/gru/stream"
SSE = {"accept": "text/event-stream"}


def test_a_watcher_follows_a_streams_answers_until_it_closes() -> None:
    with stream_server() as running:
        streams = running.app.streams
        assert streams is not None
        with (
            connect(ws_url(running, GRU + "?stream=dev-9")) as ws,
            httpx.stream("GET", running.url + GRU + "?stream=dev-9", headers=SSE) as events,
        ):
            ws.recv(timeout=10)
            assert events.status_code == 200
            assert events.headers["content-type"] == "text/event-stream"
            lines = events.iter_lines()
            assert next(lines).startswith(":")  # the comment that opens it
            # The watcher is registered once its response started.
            session = on_loop(running, lambda: streams.models.sessions[("gru", "dev-9")])
            assert on_loop(running, lambda: len(session.watchers)) == 1
            sent = []
            for i in range(5):
                ws.send(json.dumps({"id": i, "x": [1, 2, i]}))
                sent.append(json.loads(ws.recv(timeout=10)))
            seen = []
            for line in lines:
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 5:
                        break
            assert seen == sent
            ws.close()
            # The stream closed: the events end (a read timeout here would fail the test).
            assert not any(line.startswith("data") for line in lines)


def test_what_a_watcher_cannot_follow_is_refused() -> None:
    with stream_server() as running:
        url = running.url + GRU
        assert httpx.get(url + "?stream=nobody", headers=SSE).status_code == 404
        assert httpx.get(url, headers=SSE).status_code == 400  # which stream?
        plain = httpx.get(url + "?stream=x")
        assert plain.status_code == 400 and "WebSocket" in plain.json()["error"]
