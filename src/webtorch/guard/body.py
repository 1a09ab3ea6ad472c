"""Streamed request bodies under the guard: :class:`BodyScan` probes each chunk's values as it
arrives, before the chunk goes on to the upstream (the guard's ``request_body`` phase), and can
still refuse the request (403: the runner stops it, or cuts its response short)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from webtorch.guard.core import Decision
from webtorch.guard.features import BODY_PREFIX, BodyScanner, RequestView
from webtorch.http.messages import Request

if TYPE_CHECKING:
    from webtorch.guard.shell import GuardShell

log = logging.getLogger("webtorch.guard")


def probe_views(view: RequestView, probes: list[bytes]) -> list[RequestView]:
    """Each probe as the query of a plain GET to the request's path with its headers: the
    detector's best-read field, and the headers' and path's shares come from its cache."""
    return [RequestView("GET", view.path, p.decode("latin-1"), view.headers) for p in probes]


class BodyScan:
    """A streamed body's scan, the guard's ``request_body`` state for one request: each chunk's
    values probed as it arrives, before the chunk goes anywhere. :meth:`feed` answers the
    decision about the body (a refusal: the runner abandons its upstream request mid-body, or
    cuts its response short if it began), or None to let the chunk on; :attr:`done` once
    nothing more is to be read (the budget is spent, or scoring failed)."""

    __slots__ = (
        "client",
        "done",
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
        shell: GuardShell,
        head: RequestView,
        request: Request,
        scanner: BodyScanner,
        client: str,
        keyed: str | None,
        history: list[float],
    ) -> None:
        self.shell, self.request, self.scanner = shell, request, scanner
        self.client, self.keyed, self.history = client, keyed, history
        self.view = RequestView("GET", request.path, "", request.headers)
        # The request as scored at its head; its body's first KiB fills in as it arrives, and
        # is scored as the detector reads a body it is given whole.
        self.head = head
        self.done = False

    def feed(self, data: bytes) -> Decision | None:
        """A decision on the body with this chunk (a refusal; in monitor mode one that lets it
        on, noted), or None."""
        scanner = self.scanner
        stream = self.request.stream
        # The body's end: the chunk that completes its declared length, or a chunked body's
        # end (an empty chunk): probed whole before the upstream has it.
        declared = self.head.body_length
        final = not data or (
            declared is not None and stream is not None and stream.received >= declared
        )
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
                self.done = True
                return None
            if injection >= guard.settings.block:
                return guard.decide(self.client, injection, 0.0, shell.clock(), self.keyed)
        if scanner.over:
            self.done = True  # the budget is spent: refused, or the rest goes on unread
            return shell.over_budget(self.client, shell.clock())
        return None
