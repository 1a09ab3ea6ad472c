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
    BodySink,
    BodySource,
    HandlerResult,
    Pending,
    Request,
    RequestBody,
    Response,
)

if TYPE_CHECKING:
    from webtorch.guard.shell import GuardedHandler

log = logging.getLogger("webtorch.guard")


def probe_views(view: RequestView, probes: list[bytes]) -> list[RequestView]:
    """Each probe as the query of a plain GET to the request's path with its headers: the
    detector's best-read field, and the headers' and path's shares come from its cache."""
    return [RequestView("GET", view.path, p.decode("latin-1"), view.headers) for p in probes]


class BodyWatch:
    """A streamed body's scan: each chunk's values probed as it arrives, before the chunk goes
    anywhere (RequestBody.inspect). A body that turns out to be an attack stops: its
    upstream request is abandoned mid-body (never completed) and the client gets 403, or, if
    its response has begun, sees that response cut short. Also the response's body source
    while the scan may still refuse, to reach the client's side for that."""

    __slots__ = (
        "client",
        "head",
        "history",
        "inner",
        "keyed",
        "outer",
        "request",
        "scanner",
        "shell",
        "sink",
        "source",
        "stream",
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
        self.shell, self.request, self.stream, self.scanner = shell, request, stream, scanner
        self.client, self.keyed, self.history = client, keyed, history
        self.view = RequestView("GET", request.path, "", request.headers)
        # The request as scored at its head; its body's first KiB fills in as it arrives, and
        # is scored as the detector reads a body it is given whole.
        self.head = head
        self.outer = Pending()
        self.inner: Pending | None = None
        self.source: BodySource | None = None
        self.sink: BodySink | None = None

    def run(self, result: HandlerResult) -> HandlerResult:
        """The handler's ``result``, watched: a Pending the scan can still answer first."""
        if not isinstance(result, Pending):
            self.stream.inspect = None  # answered already (or a coroutine: not proxied)
            return result
        self.inner = result
        self.outer.on_cancel = result.cancel
        result.subscribe(_relay, self)
        return self.outer

    def answered(self, response: Response) -> None:
        if response.stream is not None and self.stream.inspect is not None:
            self.source = response.stream
            response.stream = self
        self.outer.resolve(response)

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
        self.stream.inspect = None
        if self.outer.response is None:
            if self.inner is not None:
                self.inner.cancel()  # the upstream request is abandoned, its body detached
            response = refusal(decision)
            assert isinstance(response, Response)
            self.outer.resolve(response)
            return
        # The response has begun: stop its source and make the client see a truncation.
        source, sink = self.source, self.sink
        if source is not None:
            source.cancel()
        if sink is not None:
            sink.abort()

    # -- the response body's source, relayed ----------------------------------------------

    def start(self, sink: BodySink) -> None:
        self.sink = sink
        assert self.source is not None
        self.source.start(sink)

    def pause(self) -> None:
        assert self.source is not None
        self.source.pause()

    def resume(self) -> None:
        assert self.source is not None
        self.source.resume()

    def cancel(self) -> None:
        self.stream.inspect = None
        assert self.source is not None
        self.source.cancel()


def _relay(watch: BodyWatch, response: Response) -> None:
    watch.answered(response)
