"""Streamed request bodies under the guard: :class:`BodyWatch` probes each chunk's values as it
arrives, before the chunk goes on to the upstream, and can still refuse the request (403) or cut
its response short."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from webtorch.guard.answers import refusal
from webtorch.guard.core import Decision
from webtorch.guard.features import BODY_PREFIX, BodyScanner, RequestView
from webtorch.http.messages import (
    HandlerResult,
    Pending,
    Request,
    RequestBody,
    Response,
)
from webtorch.http.watch import RouteWatch

if TYPE_CHECKING:
    from webtorch.guard.shell import GuardedHandler

log = logging.getLogger("webtorch.guard")


def probe_views(view: RequestView, probes: list[bytes]) -> list[RequestView]:
    """Each probe as the query of a plain GET to the request's path with its headers: the
    detector's best-read field, and the headers' and path's shares come from its cache."""
    return [RequestView("GET", view.path, p.decode("latin-1"), view.headers) for p in probes]


class BodyWatch(RouteWatch):
    """A streamed body's scan: each chunk's values probed as it arrives, before the chunk goes
    anywhere (RequestBody.inspect). A body that turns out to be an attack stops: its
    upstream request is abandoned mid-body (never completed) and the client gets 403, or, if
    its response has begun, sees that response cut short. Also the response's body source
    while the scan may still refuse, to reach the client's side for that."""

    __slots__ = (
        "client",
        "head",
        "history",
        "keyed",
        "request",
        "scanner",
        "shell",
        "view",
    )

    def __init__(
        self,
        shell: GuardedHandler,
        head: RequestView,
        request: Request,
        stream: RequestBody,
        scanner: BodyScanner,
        client: str,
        keyed: str | None,
        history: list[float],
    ) -> None:
        super().__init__(stream)
        self.shell, self.request, self.scanner = shell, request, scanner
        self.client, self.keyed, self.history = client, keyed, history
        self.view = RequestView("GET", request.path, "", request.headers)
        # The request as scored at its head; its body's first KiB fills in as it arrives, and
        # is scored as the detector reads a body it is given whole.
        self.head = head

    def run(self, result: HandlerResult) -> HandlerResult:
        """The handler's ``result``, watched: a Pending the scan can still answer first."""
        if not isinstance(result, Pending):
            self.stream.inspect = None  # answered already (or a coroutine: not proxied)
            return result
        return self.watch(result)

    def feed(self, data: bytes) -> None:
        scanner = self.scanner
        stream = self.stream
        # The body's end: the chunk that completes its declared length, or a chunked body's
        # end (RequestBody.finish inspects b""): probed whole before the upstream has it.
        declared = self.head.body_length
        final = not data or (declared is not None and stream.received >= declared)
        probes = scanner.feed(data, final)
        shell = self.shell
        guard = shell.guard
        views = probe_views(self.view, probes) if probes else []
        head = self.head
        if data and len(head.body) < BODY_PREFIX:
            head.body += data[: BODY_PREFIX - len(head.body)]
            views.append(head)
        if views:
            assert guard.scorer is not None
            try:
                scores = guard.scorer.score(views, [self.history] * len(views))
                injection = float(scores[:, 0].max())
            except Exception:  # a scoring bug must not break the upload
                log.exception("guard scoring failed; the body goes on unscanned")
                self.stream.inspect = None
                return
            if injection >= guard.settings.block:
                now = shell.clock()
                self.refuse(guard.decide(self.client, injection, 0.0, now, self.keyed))
                return
        if scanner.over:
            self.stream.inspect = None  # the budget is spent: the rest goes on unread
            refused = shell.over_budget(self.client, shell.clock())
            if refused is not None:
                self.refuse(refused)

    def refuse(self, decision: Decision) -> None:
        request = self.request
        request.guard_action = decision.action
        request.guard_score = decision.score
        if not decision.refused:
            return  # monitor mode: counted, let through
        self.stop(lambda: _refusal(decision))


def _refusal(decision: Decision) -> Response:
    response = refusal(decision)
    assert isinstance(response, Response)
    return response
