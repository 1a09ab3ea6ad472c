"""The live dashboard: its page, its static files and its JSON stats, served by WebTorch itself.

``GET /dashboard`` is one HTML page (``static/dashboard.html``) that polls ``GET
/dashboard/stats?since=SEQ`` once a second and draws charts with uPlot, vendored under
``static/vendor/`` so that the page works with no internet. The stats are the
:class:`~webtorch.observe.timeline.Timeline`'s samples plus a snapshot of the current state.

When the server has a token, every dashboard URL needs it: as ``Authorization: Bearer <token>``,
or as HTTP Basic credentials with the token as the password (any user name). Basic is what makes
the page usable in a browser: after one prompt, the browser sends the credentials with the page's
own ``fetch`` calls too, and the token never appears in a URL (or an access log).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import mimetypes
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from webtorch import __version__
from webtorch.errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized
from webtorch.http.messages import JSON, HandlerResult, Request, Response
from webtorch.metrics import Metrics
from webtorch.observe.timeline import Timeline
from webtorch.proxy.upstream import Proxies
from webtorch.serve.oip import Auth

if TYPE_CHECKING:
    from webtorch.guard.core import Guard  # torch: loaded only when the guard is on

STATIC = Path(__file__).parent / "static"
PAGE = "dashboard.html"
PREFIX = "/dashboard/static/"
_NO_STORE = (b"cache-control", b"no-store")
_CHALLENGE = [(b"www-authenticate", b'Basic realm="webtorch dashboard", charset="UTF-8"')]


class Dashboard:
    """The handler of ``/dashboard`` and ``/dashboard/...``."""

    def __init__(
        self,
        timeline: Timeline,
        metrics: Metrics,
        proxies: Callable[[], Proxies | None],
        auth: Auth,
        enabled: bool = True,
        guard: Callable[[], Guard | None] = lambda: None,
        static: Path = STATIC,
        plugins: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        self.timeline = timeline
        self.metrics = metrics
        self._proxies = proxies
        self._guard = guard
        self._plugins = plugins  # per plugin and phase: calls, errors, seconds (plugins/)
        self.enabled = enabled
        # The stats of the whole server, where several workers serve (workers/board.py sets
        # it); None: this process's own, as :meth:`local` makes them.
        self.merged: Callable[[int], dict[str, Any]] | None = None
        self._auth = auth  # its token is read per request: a reload may rotate it
        # Every file is read once, here: a request can only name one of these, so no path from a
        # client ever reaches the filesystem.
        self._files: dict[str, tuple[bytes, bytes]] = {}
        if static.is_dir():
            for path in sorted(static.rglob("*")):
                if path.is_file():
                    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                    if kind.startswith("text/") or kind.endswith("javascript"):
                        kind += "; charset=utf-8"
                    relative = path.relative_to(static).as_posix()
                    self._files[relative] = (path.read_bytes(), kind.encode())

    def __call__(self, request: Request) -> HandlerResult:
        if not self.enabled:
            raise NotFound("the dashboard is off (server.dashboard = false)")
        self._authorize(request)
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}", ("GET",))
        path = request.path
        if path in ("/dashboard", "/dashboard/"):
            return self._file(PAGE)
        if path == "/dashboard/stats":
            return self.stats(request)
        if path.startswith(PREFIX):
            return self._file(path[len(PREFIX) :])
        raise NotFound(f"no dashboard resource at {path}")

    def _authorize(self, request: Request) -> None:
        expected = self._auth.token
        if expected is None:
            return
        given = request.header(b"authorization")
        if given is not None:
            scheme, _, credentials = given.partition(b" ")
            scheme = scheme.lower()
            if scheme == b"bearer" and hmac.compare_digest(credentials.strip(), expected):
                return
            if scheme == b"basic":
                try:
                    decoded = base64.b64decode(credentials.strip(), validate=True)
                except (binascii.Error, ValueError):
                    decoded = b""
                password = decoded.partition(b":")[2]
                if hmac.compare_digest(password, expected):
                    return
        raise Unauthorized(
            "the dashboard needs the server's token: `Authorization: Bearer <token>`, or a "
            "browser login with the token as the password"
            if given is None
            else "wrong credentials for the dashboard",
            headers=list(_CHALLENGE),
        )

    def _file(self, name: str) -> Response:
        found = self._files.get(name)
        if found is None:
            raise NotFound(f"no dashboard file {name!r}")
        body, kind = found
        return Response(200, body, kind, [_NO_STORE] if name == PAGE else [])

    def stats(self, request: Request) -> Response:
        since = 0
        if request.query:
            for part in request.query.split("&"):
                key, _, value = part.partition("=")
                if key == "since":
                    if not value.isdigit():
                        raise BadRequest(f"since must be a sample number, not {value!r}")
                    since = int(value)
        merged = self.merged
        body = self.local(since) if merged is None else merged(since)
        return Response(200, orjson.dumps(body), JSON, [_NO_STORE])

    def local(self, since: int) -> dict[str, Any]:
        """This process's stats: the timeline's samples newer than ``since`` and the present."""
        timeline = self.timeline
        return {
            "version": __version__,
            "started": timeline.started,
            "now": timeline.samples[-1]["t"] if timeline.samples else timeline.started,
            "interval": 1.0,
            "seq": timeline.seq,
            "samples": timeline.since(since),
            **self.current(),
        }

    def current(self) -> dict[str, Any]:
        """The present state (not a time series): upstreams, models, guard, pipeline totals."""
        return {
            "upstreams": self._upstreams(),
            "models": self._models(),
            "guard": self._guard_now(),
            "pipelines": self._pipelines(),
            "plugins": self._plugins(),
        }

    def _upstreams(self) -> dict[str, Any]:
        proxies = self._proxies()
        if proxies is None:
            return {}
        out: dict[str, Any] = {}
        now = time.monotonic()  # the health machinery's clock
        for name, group in sorted(proxies.groups.items()):
            policy = group.policy
            error = getattr(policy, "prediction_error", None)
            # The learned policy's guard rail (balance/learned.py; not imported here: torch).
            backed_off_for = getattr(policy, "backed_off_for", None)
            learned = callable(backed_off_for)
            servers = [
                {
                    "address": upstream.address,
                    "weight": upstream.weight,
                    "state": group.health.state_of(upstream, now),
                    "inflight": upstream.inflight,
                }
                for upstream in group.upstreams
            ]
            out[name] = {
                "policy": policy.name,
                "retries": group.retries,
                "prediction_error": error if isinstance(error, float) else None,
                "train_steps": getattr(policy, "steps", None) if isinstance(error, float) else None,
                # The learned policy's guard rail: back-offs to its prior so far, and seconds it
                # still follows the prior (0.0: the network decides).
                "guard_backoffs": getattr(policy, "guard_backoffs", None) if learned else None,
                "backed_off_for": backed_off_for(now) if callable(backed_off_for) else None,
                "servers": servers,
            }
        return out

    def _guard_now(self) -> dict[str, Any] | None:
        guard = self._guard()
        if guard is None:
            return None
        from webtorch.guard.clients import shown_client  # stdlib only; with the guard

        return {
            "mode": guard.settings.mode,
            "bans": guard.ban_count(time.monotonic()),
            "clients": len(guard.clients),
            # A client key is an API key: never shown whole (an address is).
            "top_blocked": [
                {"client": shown_client(client), "blocked": count}
                for client, count in guard.stats.blocked_clients.most_common(10)
            ],
        }

    def _pipelines(self) -> dict[str, list[dict[str, Any]]]:
        """Each pipeline's stages in order, with their running totals: the page takes the
        differences between two polls (a second's mean times, rows/s, bytes/s)."""
        return {
            name: [
                {
                    "stage": stage,
                    "requests": stats.latency.count,
                    "seconds": stats.latency.total,  # queue wait and run, summed per request
                    "wait": stats.wait.total,
                    "batches": stats.batches,
                    "rows": stats.rows,
                    "errors": stats.errors,
                    "bytes_in": stats.bytes_in,
                    "bytes_out": stats.bytes_out,
                }
                for stage, stats in stages.items()
            ]
            for name, stages in sorted(self.metrics.pipelines.items())
        }

    def _models(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in sorted(set(self.metrics.models) | set(self.metrics.training)):
            training = self.metrics.training.get(name)
            loss = training.loss if training is not None else None
            out[name] = {
                "trainable": training is not None,
                "steps": training.steps if training is not None else 0,
                "loss": loss if loss is not None and math.isfinite(loss) else None,  # NaN: no step
            }
        return out
