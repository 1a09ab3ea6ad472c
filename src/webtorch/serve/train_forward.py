"""Train requests for a model that another worker trains: forwarded to it, answered with its
answer (``server.workers > 1``; the placement is ``serve/trainers.py``'s).

A model has one trainer worker, the only writer of its WAL and checkpoints and the only keeper of
its idempotency keys. A worker that receives a train request for a model it does not train
checks it as its own would be checked first (training on, CSRF, token: ``ModelEndpoint``), then
sends it as it came (method, target, headers, body) over a unix socket in the master's private
directory to the trainer worker, which serves it as any request (its limits, its train queue
and ``max_queue``, its idempotency keys) and answers after the optimizer step: the answer comes
back only then, unchanged.

Limits here too: at most ``max_in_flight`` requests forwarded at once per worker (a 503 beyond),
and an answer must come within ``timeout`` seconds. When the trainer worker is not there (it
died and its master is starting it again: it replays its WAL before it listens) the answer is
503 with Retry-After, so no example is accepted that its log does not hold; a connection that
breaks after the request was sent is a 502: the example may have been trained on, and a retry
with the same Idempotency-Key is safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import httptools

from webtorch.errors import ServiceUnavailable
from webtorch.http.messages import Request, Response, error_response

log: Final = logging.getLogger("webtorch.serve")

# Not forwarded: this hop's own (RFC 9110 7.6.1), and the length, which is written again.
_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)
_MAX_ANSWER: Final = 16 * 1024 * 1024
RETRY_AFTER: Final = b"1"


class _Answer:
    """httptools' callbacks for one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done = False
        self.size = 0
        self.parser: httptools.HttpResponseParser | None = None
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value)
        if self.size > _MAX_ANSWER:
            raise ValueError("the trainer's answer is too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # Asked here: once the message is complete, llhttp no longer knows.
        assert self.parser is not None
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > _MAX_ANSWER:
            raise ValueError("the trainer's answer is too large")

    def on_message_complete(self) -> None:
        self.done = True


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class RemoteTrainer:
    """One model's trainer in another worker, reached at ``path``."""

    def __init__(
        self,
        model: str,
        slot: int,
        path: str,
        *,
        max_in_flight: int = 256,
        timeout: float = 60.0,
    ) -> None:
        self.model = model
        self.slot = slot
        self.path = path
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.in_flight = 0
        self._idle: list[_Connection] = []
        self.forwarded = 0

    async def forward(self, request: Request) -> Response:
        if self.in_flight >= self.max_in_flight:
            raise ServiceUnavailable(
                f"model {self.model!r}: {self.in_flight} train requests are on their way to its "
                "trainer from this worker already"
            )
        self.in_flight += 1
        try:
            async with asyncio.timeout(self.timeout):  # no task per request, as wait_for makes
                return await self._exchange(request)
        except TimeoutError:
            return error_response(
                504, f"model {self.model!r}: its trainer (worker {self.slot}) did not answer"
            )
        finally:
            self.in_flight -= 1

    async def _exchange(self, request: Request) -> Response:
        try:
            reader, writer = self._pooled() or await self._connect()
        except OSError:
            # Nobody listens: the trainer worker is starting (again). Nothing was sent.
            return error_response(
                503,
                f"model {self.model!r}: its trainer (worker {self.slot}) is starting; "
                "retry shortly",
                [(b"retry-after", RETRY_AFTER)],
            )
        try:
            writer.write(_encode(request))
            answer = _Answer()
            parser = answer.parser = httptools.HttpResponseParser(answer)
            while not answer.done:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("the trainer worker closed the connection")
                parser.feed_data(data)
        except asyncio.CancelledError:  # timed out, or the server stops: the answer is lost
            writer.close()
            raise
        except (OSError, ValueError, httptools.HttpParserError) as exc:
            writer.close()
            log.warning("model %s: forwarding to worker %d: %s", self.model, self.slot, exc)
            return error_response(
                502,
                f"model {self.model!r}: the connection to its trainer (worker {self.slot}) broke "
                "after the request was sent; whether it trained on it is unknown (retry with "
                "the same Idempotency-Key to be sure it trains once)",
            )
        if answer.keep_alive and len(self._idle) < self.max_in_flight:
            self._idle.append((reader, writer))
        else:
            writer.close()
        self.forwarded += 1
        return _response(parser.get_status_code(), answer)

    def _pooled(self) -> _Connection | None:
        """An idle connection the trainer has not closed (it closes idle ones after its
        keep-alive timeout, and all of them when it exits)."""
        idle = self._idle
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def _connect(self) -> _Connection:
        return await asyncio.open_unix_connection(self.path)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def _encode(request: Request) -> bytes:
    target = request.target or request.path.encode()
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), target)]
    for name, value in request.headers:
        if name not in _HOP:
            lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"content-length: %d\r\n\r\n" % len(request.body))
    lines.append(request.body)
    return b"".join(lines)


def _response(status: int, answer: _Answer) -> Response:
    content_type: bytes | None = None
    headers: list[tuple[bytes, bytes]] = []
    for name, value in answer.headers:
        if name == b"content-type":
            content_type = value
        elif name not in _HOP and name not in (b"date", b"server", b"x-request-id"):
            headers.append((name, value))
    return Response(status, bytes(answer.body), content_type, headers)
