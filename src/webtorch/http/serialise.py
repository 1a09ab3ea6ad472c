"""Responses as bytes: status lines, heads (cached per status and content type), body framing.
Sans-IO: the connection (http/delivery.py, http/streams.py) decides what to write and when.

Most responses differ from the one before only in their body and its length, so the head up to
``content-length: `` is made once per (status, content type) and second (its Date), and a
response costs one formatting of head, length and body into one buffer.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Final

from webtorch.http.messages import Request, Response

_REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    417: b"Expectation Failed",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}
NO_BODY_STATUSES: Final = frozenset({204, 304})
# Bodies up to this size go out in one write with their head (one copy); larger ones in a
# write of their own (no copy).
JOINED_BODY_MAX: Final = 65536
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
_BUSY_BODY: Final = b'{"error":"too many connections open; retry shortly"}'
# The answer to a connection over the cap with none idle to make room: before its request is
# read, so it says close.
AT_CAPACITY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status\r\n" % status
    return line


class HeadCache:
    """One server's Server and Date headers, and its response heads up to
    ``content-length: `` by (status, content type), remade when Date changes (:meth:`refresh`,
    from the server's once-a-second tick). Shared by the server's connections."""

    def __init__(self, server_name: bytes) -> None:
        self.server_header = b"server: " + server_name + b"\r\n"
        self.date_header = b""
        self.heads: dict[tuple[int, bytes | None], bytes] = {}
        # The head last asked for, and its key: most responses repeat the one before, and
        # comparing two fields costs less than building a key (see Delivery._write).
        self.last_status = -1
        self.last_type: bytes | None = None
        self.last_head = b""
        self.refresh()

    def refresh(self) -> None:
        """A new Date header, and heads that carry it."""
        self.date_header = b"date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"
        self.heads.clear()
        self.last_status = -1

    def head(self, status: int, content_type: bytes | None) -> bytes:
        """Status line, Server, Date and Content-Type, ending with ``content-length: ``."""
        key = (status, content_type)
        head = self.heads.get(key)
        if head is None:
            ctype = b"content-type: " + content_type + b"\r\n" if content_type is not None else b""
            head = status_line(status) + self.server_header + self.date_header + ctype
            head += b"content-length: "
            if len(self.heads) < 64:  # statuses x content types in use: few; stay bounded
                self.heads[key] = head
        self.last_status, self.last_type, self.last_head = status, content_type, head
        return head


def head_lines(
    heads: HeadCache,
    response: Response,
    request: Request | None,
    framing: bytes,
    keep_alive: bool,
) -> list[bytes]:
    """A response's head, line by line, for the responses the cached heads do not fit (their
    own headers, a HEAD request, HTTP/1.0, closing, a streamed or large body). ``framing`` is
    the body's Content-Length or Transfer-Encoding line, or empty."""
    parts = [status_line(response.status), heads.server_header, heads.date_header]
    if response.content_type is not None:
        parts.append(b"content-type: " + response.content_type + b"\r\n")
    if framing:
        parts.append(framing)
    for name, value in response.headers:
        parts.append(name + b": " + value + b"\r\n")
    if request is not None and request.request_id:
        parts.append(b"x-request-id: " + request.request_id + b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    elif request is not None and request.http_version == "1.0":
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return parts


def content_length(size: int) -> bytes:
    return b"content-length: %d\r\n" % size


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (RFC 9112 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
