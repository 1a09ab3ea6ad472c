"""The HTTP form of a model stream (streams/ndjson.py): a chunked NDJSON request body answered
by a chunked NDJSON response, line by line while the body still arrives, in order, with the
same per-stream state as the WebSocket form."""

from __future__ import annotations

import json
import socket

import httpx
import numpy as np

from tests.conftest import Running
from tests.streams.conftest import stream_server
from tests.streams.test_models import _alone

GRU = "/v2/models/gru/stream"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _ChunkedReader:
    """Reads a chunked response's body line by line off a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")
        status = self.file.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        headers = {}
        while (line := self.file.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "application/x-ndjson"
        self.buffer = b""

    def line(self) -> dict | None:  # type: ignore[type-arg]
        while b"\n" not in self.buffer:
            size = int(self.file.readline().strip(), 16)
            if size == 0:
                return None
            self.buffer += self.file.read(size)
            self.file.readline()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]


def _open(running: Running, path: str = GRU) -> socket.socket:
    sock = socket.create_connection((running.host, running.port), timeout=30)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % path.encode()
    )
    return sock


def test_items_are_answered_while_the_body_still_arrives() -> None:
    items = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    with stream_server() as running:
        sock = _open(running, GRU + "?stream=http-1")
        reader = None
        got = []
        for i, item in enumerate(items):
            # A line split across two chunks is still one item.
            line = json.dumps({"id": i, "x": item.tolist()}).encode() + b"\n"
            sock.sendall(_chunk(line[:7]) + _chunk(line[7:]))
            if reader is None:
                reader = _ChunkedReader(sock)
                assert reader.line() == {"stream": "http-1", "resumed": False}
            answer = reader.line()  # before the body's end: full duplex
            assert answer is not None and answer["id"] == i
            got.append(answer["outputs"]["y"])
        sock.sendall(b"0\r\n\r\n")
        assert reader is not None and reader.line() is None  # the answer ends with the body
        sock.close()
    np.testing.assert_allclose(got, _alone(items), rtol=1e-4, atol=1e-5)


def test_a_whole_body_at_once_and_a_resume_by_id() -> None:
    items = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    lines = [json.dumps({"x": item.tolist()}) for item in items]
    with stream_server() as running:
        url = running.url + GRU + "?stream=batch"
        headers = {"content-type": "application/x-ndjson"}
        first = httpx.post(
            url, content=iter([("\n".join(lines[:3]) + "\n").encode()]), headers=headers
        )
        second = httpx.post(url, content=iter(["\n".join(lines[3:]).encode()]), headers=headers)
    answers = [json.loads(line) for line in first.text.splitlines()]
    assert answers[0] == {"stream": "batch", "resumed": False}
    rest = [json.loads(line) for line in second.text.splitlines()]
    assert rest[0] == {"stream": "batch", "resumed": True}
    outputs = [a["outputs"]["y"] for a in answers[1:] + rest[1:]]
    assert [a["id"] for a in answers[1:] + rest[1:]] == list(range(6))
    np.testing.assert_allclose(outputs, _alone(items), rtol=1e-4, atol=1e-5)


def test_the_http_form_refuses_what_it_cannot_take() -> None:
    with stream_server() as running:
        wrong_type = httpx.post(running.url + GRU, content=iter([b"{}\n"]))
        assert wrong_type.status_code == 415
        unknown = httpx.post(
            running.url + "/v2/models/nope/stream",
            content=iter([b"{}\n"]),
            headers={"content-type": "application/x-ndjson"},
        )
        assert unknown.status_code == 404
        bad = httpx.post(
            running.url + GRU,
            content=iter([b'not json\n{"x": [1, 2, 3]}\n']),
            headers={"content-type": "application/x-ndjson"},
        )
        lines = [json.loads(line) for line in bad.text.splitlines()]
        assert "JSON" in lines[1]["error"] and "outputs" in lines[2]
