"""Key-affine balancing: consistent hashing with bounded loads, and the request keys it hashes.

A key (a model name in a header, a session cookie, a path segment...) should keep going to the
upstream that already has its model warm or its cache filled, but never at the price of piling
hot keys on one upstream. Consistent hashing with bounded loads (Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018; HAProxy's
``hash-balance-factor``) gives both: a key goes to the first upstream clockwise from its point on
the ring that is below ``ceil((1 + balance) * average load)``, so it moves only when its home is
overloaded, and then to the next upstream on the ring, the same one every time.
"""

from __future__ import annotations

import hashlib
import math
import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

from webtorch.balance.base import Policy, Upstream
from webtorch.balance.classic import RoundRobin
from webtorch.http.messages import Headers, Request

KeyKind = Literal["header", "cookie", "path", "query", "client_ip"]

# RFC 9110 token: the characters a header field name (and an RFC 6265 cookie name) may use.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SPEC_FORMS = "header:NAME, cookie:NAME, path:N, query:NAME or client_ip"


def cookie_values(headers: Headers, name: bytes) -> Iterator[bytes]:
    """Every value of cookie ``name`` in the request's Cookie header(s), in the order sent.

    Split by hand rather than with ``http.cookies``: SimpleCookie stops at the first pair it
    finds malformed and silently drops the rest, so one odd cookie set by another application
    on the same domain would hide ours. HTTP/2 clients may split cookies over several headers.
    Cookie names are case-sensitive; surrounding double quotes (RFC 6265 allows them) are removed.
    """
    for key, value in headers:
        # find, not ``in``: bytes ``in`` first tries its needle as an int, and formats and clears
        # a TypeError before it searches (twice the cost).
        if key != b"cookie" or value.find(name) < 0:
            continue
        for pair in value.split(b";"):
            cookie_name, sep, cookie_value = pair.partition(b"=")
            if not sep or cookie_name.strip() != name:
                continue
            cookie_value = cookie_value.strip()
            if len(cookie_value) >= 2 and cookie_value[0] == 0x22 and cookie_value[-1] == 0x22:
                cookie_value = cookie_value[1:-1]
            yield cookie_value


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Which part of a request is the balancing key, parsed from a config string.

    ``header:NAME`` (first value; name case-insensitive), ``cookie:NAME`` (first cookie of that
    name; name case-sensitive), ``path:N`` (N-th non-empty segment of the decoded path, from 1:
    in ``/v2/models/resnet/infer`` ``path:3`` is ``resnet``), ``query:NAME`` (first non-empty
    value of that query argument, decoded) or ``client_ip``. An absent or empty part gives no key
    (``None``), as nginx's ``hash`` treats an empty key.
    """

    kind: KeyKind
    name: str = ""  # header (lower-cased), cookie or query argument name
    segment: int = 0  # path:N
    # The name as the header list holds it, encoded once rather than on every request.
    _raw: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = self.name.lower() if self.kind == "header" else self.name
        object.__setattr__(self, "_raw", raw.encode("utf-8", "surrogatepass"))

    @classmethod
    def parse(cls, spec: str) -> KeySpec:
        """Parse ``spec``; ValueError naming the problem when it is not one of the forms."""
        text = spec.strip()
        kind, sep, arg = text.partition(":")
        kind = kind.strip().lower()
        arg = arg.strip()
        if kind == "client_ip":
            if sep:
                raise ValueError(f"hash key {spec!r}: client_ip takes no argument")
            return cls("client_ip")
        if kind not in ("header", "cookie", "path", "query"):
            raise ValueError(f"hash key {spec!r}: unknown kind {kind!r}; expected {_SPEC_FORMS}")
        if not arg:
            what = "a segment number" if kind == "path" else "a name"
            raise ValueError(f"hash key {spec!r}: {kind}: needs {what}, as in {_SPEC_FORMS}")
        if kind == "path":
            if not arg.isdecimal():
                raise ValueError(f"hash key {spec!r}: path segment {arg!r} is not a number")
            segment = int(arg)
            if segment < 1:
                raise ValueError(f"hash key {spec!r}: path segments count from 1")
            return cls("path", segment=segment)
        if kind == "header":
            if not _TOKEN.fullmatch(arg):
                raise ValueError(f"hash key {spec!r}: {arg!r} is not a valid header name")
            return cls("header", name=arg.lower())
        if kind == "cookie":
            if not _TOKEN.fullmatch(arg):
                raise ValueError(f"hash key {spec!r}: {arg!r} is not a valid cookie name")
            return cls("cookie", name=arg)
        if any(ch.isspace() or ch in "&=#" for ch in arg):
            raise ValueError(f"hash key {spec!r}: {arg!r} is not a valid query argument name")
        return cls("query", name=arg)

    def __str__(self) -> str:
        if self.kind == "client_ip":
            return "client_ip"
        if self.kind == "path":
            return f"path:{self.segment}"
        return f"{self.kind}:{self.name}"

    def extract(self, request: Request) -> str | None:
        """The key of ``request``, or None when the request does not carry it."""
        kind = self.kind
        value: str | None
        if kind == "header":
            raw = request.header(self._raw)
            # Header bytes are not necessarily UTF-8; latin-1 maps every byte and round-trips.
            value = raw.decode("latin-1") if raw is not None else None
        elif kind == "cookie":
            found = next(cookie_values(request.headers, self._raw), None)
            value = found.decode("latin-1") if found is not None else None
        elif kind == "path":
            value = _path_segment(request.path, self.segment)
        elif kind == "query":
            value = _query_argument(request.query, self.name)
        else:
            value = request.client
        return value or None


def _path_segment(path: str, number: int) -> str | None:
    # Empty segments are skipped, as nginx's default merge_slashes would: "//v2/x" is "/v2/x".
    # Request.path is already percent-decoded by the protocol; decoding again would turn "%2541"
    # into "A" instead of "%41".
    count = 0
    for segment in path.split("/"):
        if segment:
            count += 1
            if count == number:
                return segment
    return None


def _query_argument(query: str, name: str) -> str | None:
    if not query:
        return None
    for arg, value in parse_qsl(query):
        if arg == name:
            return value
    return None


def hash64(data: bytes) -> int:
    # blake2b, not hash(): the ring must place keys the same in every worker process and after
    # every restart (PYTHONHASHSEED randomises str hashes per process).
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _key_bytes(key: str) -> bytes:
    # surrogatepass: a key decoded from odd bytes must still hash, never raise.
    return key.encode("utf-8", "surrogatepass")


# The bounded-load epsilon when none is configured (``hash_balance``): no upstream above 1.25x
# the average in-flight load.
DEFAULT_BALANCE = 0.25


def capacity(balance: float, total_inflight: int, count: int) -> int:
    """The most in-flight requests one of ``count`` candidates may hold after this pick.

    ``total_inflight`` is the candidates' total before the pick, so ``+ 1`` counts the request
    being placed. Rounded to 9 places first so that float error (1.1 * 50 giving
    55.00000000000001) cannot raise the cap by one.
    """
    return math.ceil(round((1.0 + balance) * (total_inflight + 1) / count, 9))


class BoundedLoadHash(Policy):
    """Consistent hashing with bounded loads over the whole group's ring.

    Each upstream has ``vnodes * weight`` points on the ring (the configured ``weight``, fixed at
    construction: moving points as slow start ramps a weight would reshuffle keys, and the load
    bound already keeps a ramping upstream from being swamped). A pick walks clockwise from the
    key's point to the first upstream that is a candidate and holds fewer than
    ``capacity(balance, total in-flight over the candidates, len(candidates))`` requests, so no
    candidate ever goes above that cap, and a key whose home is healthy and not overloaded always
    lands there. Because the ring spans the whole group, an upstream leaving the candidates moves
    only the keys it owned.

    Requests without the key (see :class:`KeySpec`) fall back to smooth weighted round robin
    over the candidates, which ignores the load bound, as nginx's ``hash`` falls back to round
    robin on an empty key.
    """

    name = "hash"

    def __init__(
        self,
        group: Sequence[Upstream],
        key: KeySpec | str,
        *,
        balance: float = DEFAULT_BALANCE,
        vnodes: int = 160,
    ) -> None:
        super().__init__(group)
        if not math.isfinite(balance) or balance < 0.0:
            raise ValueError(f"hash balance must be a finite number >= 0, got {balance!r}")
        if vnodes < 1:
            raise ValueError(f"hash vnodes must be >= 1, got {vnodes!r}")
        self.key = key if isinstance(key, KeySpec) else KeySpec.parse(key)
        self.balance = balance
        self._fallback = RoundRobin(group)
        ring: list[tuple[int, int, Upstream]] = []
        for upstream in self.group:
            for replica in range(vnodes * max(upstream.weight, 0)):
                point = hash64(f"{upstream.address}#{replica}".encode())
                ring.append((point, upstream.index, upstream))
        # Ties on a point (2**-64 odds) are ordered by index so every process builds one ring.
        ring.sort(key=lambda entry: (entry[0], entry[1]))
        self._points = [point for point, _, _ in ring]
        self._owners = [upstream for _, _, upstream in ring]

    def key_of(self, request: Request) -> str | None:
        """The request's balancing key (for the access log), None when it has none."""
        return self.key.extract(request)

    def home_of(self, key: str) -> Upstream | None:
        """The upstream owning ``key`` on the ring, loads and health aside (None: empty ring)."""
        if not self._points:
            return None
        start = bisect_right(self._points, hash64(_key_bytes(key)))
        return self._owners[start % len(self._owners)]

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        return self.pick_key(self.key.extract(request), request, candidates, now)

    def pick_key(
        self, key: str | None, request: Request, candidates: Sequence[Upstream], now: float
    ) -> Upstream:
        """:meth:`pick` with the key already extracted (the proxy logs it, so it has it).

        ``last_reason``: "hash" (the key's home among the candidates), "hash_overflow" (its
        home was at the load cap: the next one on the ring), "hash_no_key" (round robin),
        "hash_least_loaded" (no candidate on the ring) or "only_candidate"."""
        if key is None:
            self.last_reason = "hash_no_key"
            return self._fallback.pick(request, candidates, now)
        if len(candidates) == 1:
            self.last_reason = "only_candidate"
            return candidates[0]
        total = 0
        for upstream in candidates:
            total += upstream.inflight
        cap = capacity(self.balance, total, len(candidates))
        # Non-empty: the least loaded holds at most total / n < (total + 1) / n <= cap.
        eligible = {upstream for upstream in candidates if upstream.inflight < cap}
        owners = self._owners
        start = bisect_right(self._points, hash64(_key_bytes(key)))
        found = None
        for position in range(start, len(owners)):
            if owners[position] in eligible:
                found = owners[position]
                break
        else:
            for position in range(start):
                if owners[position] in eligible:
                    found = owners[position]
                    break
        if found is None:
            # Only when no eligible candidate has a point (weight 0, or not of this group).
            self.last_reason = "hash_least_loaded"
            return min(candidates, key=_inflight)
        if len(eligible) == len(candidates):
            self.last_reason = "hash"  # nobody at the cap: this is the key's home
        else:
            self.last_reason = (
                "hash_overflow" if self._passed_full(key, found, candidates) else "hash"
            )
        return found

    def _passed_full(self, key: str, found: Upstream, candidates: Sequence[Upstream]) -> bool:
        """Whether the ring walk for ``key`` passed a candidate (one at the load cap) before
        reaching ``found``: the key left its home for load."""
        owners = self._owners
        start = bisect_right(self._points, hash64(_key_bytes(key)))
        members = set(candidates)
        for step in range(len(owners)):
            owner = owners[(start + step) % len(owners)]
            if owner is found:
                return False
            if owner in members:
                return True
        return False


def _inflight(upstream: Upstream) -> int:
    return upstream.inflight
