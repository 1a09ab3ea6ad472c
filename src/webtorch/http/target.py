"""The request target: what a request line's target means, or what is wrong with it. Sans-IO.

A target arrives in one of three forms (RFC 9112 3.2): origin form (``/path?query``, nearly all
requests), absolute form (``http://host/path?query``, whose authority then replaces Host) and
asterisk form (``*``, for OPTIONS). The path is normalised (its dot segments removed, RFC 3986
5.2.4) before anything routes on it, and the normalised form is what a proxy forwards:
``/api/../admin`` is ``/admin`` here as at any upstream that resolves it, not a request for
``/api/``'s upstream that it turns into one for ``/admin`` (nginx normalises before matching its
locations too).
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import unquote

import httptools

from webtorch.errors import BadRequest
from webtorch.http.authority import host_problem

# (decoded path, query, origin-form target, authority): the authority is that of an
# absolute-form target (it replaces the Host header), else empty.
Target = tuple[str, str, bytes, bytes]

_QUESTION: Final = ord("?")
_PERCENT: Final = ord("%")
_DOT: Final = ord(".")


def request_target(url: bytes, method: bytes) -> Target:
    """The target ``url`` of a ``method`` request as a :data:`Target`; raises BadRequest saying
    what is wrong with a bad one. Raises rather than returns the error: a tuple alone is
    returned by value (compiled: no object made), and the caller's ``isinstance`` against the
    interpreted error class would cost more than the rest of this function (0.1 us)."""
    if url.startswith(b"/") and _QUESTION not in url and _PERCENT not in url and _DOT not in url:
        # The common case: no query, nothing escaped, no dot; partition would be a method
        # call looked up by name. The needles are ints: ``b"?" in url`` first tries its
        # needle as an int and formats a TypeError to clear (0.14 us each).
        return url.decode("latin-1"), "", url, b""
    path_b, _, query_b = url.partition(b"?")
    rest = url[len(path_b) :]  # the query as received, with its "?" (forwarded untouched)
    authority = b""
    if not path_b.startswith(b"/"):
        if path_b[:8].lower().startswith((b"http://", b"https://")):
            path_b, query_b, authority = _absolute_form(url)
            rest = b"?" + query_b if query_b else b""
        elif path_b != b"*" or query_b:
            # Authority-form (CONNECT's) and anything else: no route takes them.
            raise BadRequest("request target must start with '/' (origin form)")
        elif method != b"OPTIONS":
            raise BadRequest("the '*' request target is for OPTIONS only")
    target = url
    if path_b.startswith(b"/") and _dot_segment_in(path_b):
        path_b = _remove_dot_segments(path_b)
        target = path_b + rest
    elif authority:
        target = path_b + rest  # made origin-form
    path = path_b.decode("latin-1")
    if "%" in path:
        path = unquote(path)
        if _has_dot_segment(path):
            # Left after the dot segments went, one came from an encoded slash (%2F, as in
            # "a%2F..%2Fb"): %2F stays a character of its segment here and upstream (as
            # nginx forwards it), but a server that decodes it to a slash would resolve a
            # dot segment that this one did not: refused rather than routed one way and
            # served another.
            raise BadRequest(
                "an encoded slash (%2F) beside a '.' or '..' segment in the request path"
            )
    return path, query_b.decode("latin-1"), target, authority


def _absolute_form(url: bytes) -> tuple[bytes, bytes, bytes]:
    """(path, query, authority) of an absolute-form target (``http://host/path?query``, RFC 9112
    3.2.2); raises BadRequest saying what is wrong with it."""
    try:
        # Any, not httptools' type: its stub declares the URL's fields bytes (port int), but a
        # part missing from the target is None, and compiled code checks a value against its
        # declared type when it reads it: ``http://h/v2``, with no query, raised TypeError
        # there and the connection was dropped with a traceback logged (issue 19).
        parsed: Any = httptools.parse_url(url)
    except httptools.HttpParserError:
        # llhttp lets through targets that parse_url refuses (a bad port, say).
        raise BadRequest("invalid absolute request target") from None
    userinfo: bytes | None = parsed.userinfo
    if userinfo is not None:
        # RFC 9110 4.2.4: userinfo in an http(s) URI is an error (and a way to disguise the
        # real host).
        raise BadRequest("userinfo ('user@') in the request target is not allowed")
    # The authority as sent: from after "://" to the path, query or fragment.
    start = url.find(b"://") + 3
    end = len(url)
    for stop in (b"/", b"?", b"#"):
        found = url.find(stop, start)
        if 0 <= found < end:
            end = found
    authority = url[start:end]
    problem = host_problem(authority)
    if problem is not None:
        raise BadRequest(f"the request target's authority: {problem}")
    path: bytes | None = parsed.path
    query: bytes | None = parsed.query
    # The fragment, if any, is dropped: it is never sent on to anyone (RFC 9110 4.2.5).
    return path or b"/", query or b"", authority


def _dot_segment_in(path: bytes) -> bool:
    """Whether ``path`` may hold a dot segment (``.`` or ``..``, ``%2e`` counting as a dot):
    one begins with ``/.`` or, escaped, ``/%2e``."""
    if path.find(b"/.") >= 0:
        return True
    return _PERCENT in path and path.lower().find(b"/%2e") >= 0


def _dot_count(segment: bytes) -> int:
    """1 for a ``.`` segment, 2 for ``..`` (``%2e``/``%2E`` decoded), else 0."""
    if not segment or len(segment) > 6:
        return 0
    if len(segment) > 2:
        segment = segment.lower().replace(b"%2e", b".")
    if segment == b".":
        return 1
    if segment == b"..":
        return 2
    return 0


def _remove_dot_segments(path: bytes) -> bytes:
    """``path`` (absolute, still percent-encoded) without its dot segments, as RFC 3986 5.2.4
    resolves them; a ``..`` that would climb above the root is refused, as nginx does, rather
    than dropped. Only ``/`` separates segments: an encoded ``%2F`` stays inside its segment
    (and empty segments stay: ``/a//b`` is not ``/a/b`` to every server)."""
    segments = path.split(b"/")
    kept: list[bytes] = []
    last = len(segments) - 1
    for i in range(1, last + 1):
        segment = segments[i]
        dots = _dot_count(segment)
        if dots == 0:
            kept.append(segment)
            continue
        if dots == 2:
            if not kept:
                raise BadRequest("the request path climbs above the root with '..'")
            kept.pop()
        if i == last:
            kept.append(b"")  # "/a/b/.." is "/a/", a directory
    return b"/" + b"/".join(kept)


def _has_dot_segment(path: str) -> bool:
    """Whether a decoded path holds a ``.`` or ``..`` segment."""
    return "/./" in path or "/../" in path or path.endswith(("/.", "/.."))
