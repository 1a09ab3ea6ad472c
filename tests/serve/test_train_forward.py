"""serve/train_forward.py: a train request forwarded to the worker that trains the model, over a
unix socket, against a real asyncio server standing in for that worker: the request as it came, the
answer unchanged, its limits, and what the client is told when the trainer is away or goes away
mid-request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from webtorch.errors import ServiceUnavailable
from webtorch.http.messages import Request, Response
from webtorch.serve.train_forward import RemoteTrainer

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ANSWER = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{"step":1}'
)


def request(body: bytes = b'{"inputs": [[0, 1]], "targets": [[1]]}') -> Request:
    headers = [
        (b"host", b"example"),
        (b"content-type", b"application/json"),
        (b"idempotency-key", b"k1"),
        (b"connection", b"keep-alive"),
        (b"content-length", b"999"),
    ]
    return Request("POST", "/models/m/train", "", headers, body, target=b"/models/m/train")


def run(
    path: Path, serve: Serve, test: Callable[[RemoteTrainer], Awaitable[None]], **kw: float
) -> None:
    async def main() -> None:
        server = await asyncio.start_unix_server(serve, str(path))
        remote = RemoteTrainer("m", 0, str(path), **kw)  # type: ignore[arg-type]
        try:
            await test(remote)
        finally:
            remote.close()
            server.close()

    asyncio.run(main())


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


def test_the_request_goes_as_it_came_and_the_answer_comes_back(tmp_path: Path) -> None:
    seen: list[tuple[bytes, bytes]] = []
    connections = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        for _ in range(2):
            seen.append(await read_request(reader))
            writer.write(ANSWER)

    async def test(remote: RemoteTrainer) -> None:
        for _ in range(2):
            answer = await remote.forward(request())
            assert isinstance(answer, Response)
            assert (answer.status, answer.body, answer.content_type) == (
                200,
                b'{"step":1}',
                b"application/json",
            )

    run(tmp_path / "s", serve, test)
    assert connections == [1]  # kept alive
    head, body = seen[0]
    assert head.startswith(b"POST /models/m/train HTTP/1.1\r\n")
    assert b"idempotency-key: k1\r\n" in head and b"host: example\r\n" in head
    assert b"connection" not in head and b"content-length: %d\r\n" % len(body) in head
    assert body == request().body


def test_nobody_listening_is_503_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        remote = RemoteTrainer("m", 0, str(tmp_path / "nobody"))
        answer = await remote.forward(request())
        assert answer.status == 503
        assert dict(answer.headers)[b"retry-after"] == b"1"
        assert b"is starting" in answer.body

    asyncio.run(main())


def test_a_connection_that_breaks_after_sending_is_502(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()  # the trainer died with the request

    async def test(remote: RemoteTrainer) -> None:
        answer = await remote.forward(request())
        assert answer.status == 502 and b"Idempotency-Key" in answer.body

    run(tmp_path / "s", serve, test)


def test_forwarded_requests_in_flight_are_bounded_and_answers_timed(tmp_path: Path) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await release.wait()
        writer.write(ANSWER)

    async def test(remote: RemoteTrainer) -> None:
        first = asyncio.ensure_future(remote.forward(request()))
        await arrived.wait()
        with pytest.raises(ServiceUnavailable, match="on their way"):
            await remote.forward(request())
        release.set()
        assert (await first).status == 200

    run(tmp_path / "s", serve, test, max_in_flight=1)

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.Event().wait()

    async def late(remote: RemoteTrainer) -> None:
        assert (await remote.forward(request())).status == 504

    run(tmp_path / "t", never, late, timeout=0.05)
