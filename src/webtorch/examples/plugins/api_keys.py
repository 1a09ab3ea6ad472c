"""API keys with per-key quotas: a plugin for ``[[plugins]]`` (docs/PLUGINS.md).

A request without a known key in the configured header gets 401; a key past its quota for the
current window gets 429 with Retry-After. The key never reaches the route or the upstream (the
header is removed), and each response says how much of the quota is left.

    [[plugins]]
    path = "examples/plugins/api_keys.py"
    routes = ["/api"]
    [plugins.settings]
    header = "x-api-key"
    window = 60                      # seconds
    [plugins.settings.keys]          # key -> requests per window
    "k-alice-1f9c" = 100
    "k-bob-77aa" = 10
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from webtorch.plugins import Context, Host, Response, every


def _digest(key: str) -> bytes:
    # Keys are looked up by digest: the table holds no key itself, and a lookup's time does
    # not depend on how much of a guess matches a real key.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.header = "x-api-key"
        self.window = 60.0
        self.quotas: dict[bytes, int] = {}
        # key digest -> (the window it counts, requests in it)
        self.used: dict[bytes, tuple[int, int]] = {}

    def startup(self, host: Host) -> None:
        settings = host.settings
        self.header = str(settings.get("header", "x-api-key")).lower()
        self.window = float(settings.get("window", 60))
        keys = settings.get("keys", {})
        if not keys:
            raise ValueError("settings.keys: no keys configured (key = requests per window)")
        self.quotas = {_digest(k): int(v) for k, v in keys.items()}
        host.log.info("%d API key(s), quotas per %g s", len(self.quotas), self.window)

    def request(self, ctx: Context) -> Response | None:
        key = ctx.header(self.header)
        digest = _digest(key) if key is not None else b""
        quota = self.quotas.get(digest)
        if quota is None:
            what = "missing" if key is None else "unknown"
            return Response(
                401,
                b'{"error": "%s API key (header %s)"}' % (what.encode(), self.header.encode()),
                headers=[(b"www-authenticate", b'ApiKey header="%s"' % self.header.encode())],
            )
        now = self.clock()
        window = int(now // self.window)
        counted, count = self.used.get(digest, (window, 0))
        if counted != window:
            count = 0
        if count >= quota:
            retry = math.ceil((window + 1) * self.window - now)
            return Response(
                429,
                b'{"error": "quota of %d requests per %g s used up"}' % (quota, self.window),
                headers=[(b"retry-after", b"%d" % max(retry, 1))],
            )
        self.used[digest] = (window, count + 1)
        ctx.state["api_quota_left"] = quota - count - 1
        # The key is the client's secret with this server: it is not forwarded.
        ctx.request.headers = [(k, v) for k, v in ctx.headers if k != self.header.encode()]
        return None

    def response(self, ctx: Context, response: Response) -> None:
        left = ctx.state.get("api_quota_left")
        if left is not None:
            response.headers = [*response.headers, (b"x-quota-remaining", b"%d" % left)]

    @every(10.0)
    def forget(self) -> None:
        """Counts of past windows go: the table holds at most one entry per configured key."""
        window = int(self.clock() // self.window)
        self.used = {d: u for d, u in self.used.items() if u[0] == window}


plugin = ApiKeys()
