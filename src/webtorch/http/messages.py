"""Request and Response as the rest of WebTorch sees them, and the HTTP-error boundary."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from webtorch.errors import HTTPError

Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


@dataclass(slots=True, eq=False)
class Request:
    """A fully received request. Header names are lower-cased bytes, values raw bytes."""

    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    http_version: str = "1.1"
    keep_alive: bool = True
    client: str = ""
    # Set by the router: the metrics label of the route that handled the request.
    route: str = ""
    # The Content-Type header as received; the protocol notes it while parsing headers.
    raw_content_type: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content_type(self) -> bytes:
        """The media type, lower-cased, without parameters (b"" when absent)."""
        raw = self.raw_content_type
        if raw is None:
            return b""
        media = _MEDIA_TYPES.get(raw)
        if media is None:
            media = raw.split(b";", 1)[0].strip().lower()
            if len(_MEDIA_TYPES) < 256:  # clients send few distinct values; bound the cache
                _MEDIA_TYPES[raw] = media
        return media


_MEDIA_TYPES: dict[bytes, bytes] = {}


@dataclass(slots=True, eq=False)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes | None = JSON
    # A tuple by default: most responses have no extra headers and need no list allocated.
    headers: Sequence[tuple[bytes, bytes]] = ()


class Pending:
    """A response promised for later and resolved by whoever owns the work (a model batch).

    Cheaper than an ``asyncio.Future`` on the hot path: resolving it calls the subscriber at once
    instead of scheduling callbacks for the next loop iteration, and it needs no loop. It is not
    thread-safe: resolve it on the event loop thread.
    """

    __slots__ = ("_arg", "_callback", "response")

    def __init__(self) -> None:
        self.response: Response | None = None
        self._callback: Callable[[Any, Response], None] | None = None
        self._arg: Any = None

    def resolve(self, response: Response) -> None:
        if self.response is not None:
            return
        self.response = response
        callback = self._callback
        if callback is not None:
            arg = self._arg
            self._callback = self._arg = None
            callback(arg, response)

    def subscribe(self, callback: Callable[[Any, Response], None], arg: Any) -> None:
        """Call ``callback(arg, response)`` when resolved (at once if it already is)."""
        if self.response is not None:
            callback(arg, self.response)
        else:
            self._callback = callback
            self._arg = arg


# A handler answers at once (a Response), later through a Pending (model batches: no task, no
# future), or through any other awaitable (coroutines, for handlers that do I/O).
HandlerResult = Response | Pending | Awaitable[Response]
Handler = Callable[[Request], HandlerResult]


def json_response(obj: Any, status: int = 200, headers: Headers | None = None) -> Response:
    return Response(status, orjson.dumps(obj), JSON, headers or [])


def error_response(status: int, message: str, headers: Headers | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), JSON, headers or [])


def response_for_error(exc: HTTPError) -> Response:
    return error_response(exc.status, exc.message, list(exc.headers))
