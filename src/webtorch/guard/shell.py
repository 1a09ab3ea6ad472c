"""The guard's work on the request path, phase by phase (``plugin.py`` makes it the plugin):

- ``connect`` / ``disconnect``: the connection gate (bans, per-address connection caps).
- ``request``: :meth:`Guard.rules` (lists, bans, buckets, new keys, surge), then the detector's
  score. Requests are scored in batches, those of one loop turn together in one numpy pass: the
  phase returns a :class:`Later` that the batch settles (no task per request). A body already
  whole (a model route's) is probed with the head; a streamed one is scored at its head alone,
  at once (its route takes the stream as it is handed over).
- ``request_body`` (``body = "stream"``): a streamed body's values probed chunk by chunk before
  each goes on (``body.py``); a refusal stops the upload (the runner cancels the route).
- ``log``: each response feeds its client's share of 4xx.

Refusals are answered from ``answers.py``; each decision is noted on the request for the access
log and the plugins after it (``ctx.guard_action``, ``ctx.guard_score``). Its decisions are
``core.py``'s, its features ``features.py``'s.

Compiled (compiled.py): it runs for every request the guard sees, around the detector's numpy.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from webtorch.guard.answers import refusal
from webtorch.guard.body import BodyScan, probe_views
from webtorch.guard.clients import shown_client
from webtorch.guard.core import Decision, Guard
from webtorch.guard.features import (
    HEAD_PROBES,
    MULTIPART,
    PROBE_BUDGET,
    SUSPICIOUS,
    BodyScanner,
    RequestView,
    body_kind,
    head_probes,
)
from webtorch.http.messages import Request, Response
from webtorch.plugins.context import Context
from webtorch.plugins.later import Later
from webtorch.proxy.headers import TrustedProxies

if TYPE_CHECKING:
    from webtorch.guard.feedback import Feedback  # torch: only with online adaptation on

log = logging.getLogger("webtorch.guard")


# A client key (client_key = "header:...") longer than this is kept as its digest: the client
# table's bytes stay bounded whatever keys clients send.
KEY_LIMIT: Final = 64
# X-Forwarded-For entries read from the right, at most: a chain of trusted proxies is short.
FORWARDED_HOPS: Final = 16
# The guard's key in ``ctx.state``: a streamed body's scan.
STATE: Final = "guard.body"


class GuardShell:
    """The guard's phases (methods named after them), over one :class:`Guard`."""

    def __init__(
        self,
        guard: Guard,
        client_key: str = "ip",
        clock: Callable[[], float] = time.monotonic,
        feedback: Feedback | None = None,
        trusted: Callable[[Request], bool] | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.guard = guard
        self.feedback = feedback
        # Requests that skip the guard: those bearing the server's token (operators, whose
        # feedback would otherwise be scored as the attacks it quotes).
        self._trusted = trusted
        self._header = client_key[len("header:") :].lower().encode() if client_key != "ip" else None
        # Behind these, a request's client is the address they forwarded it for (server.
        # trusted_proxies): decisions and bans apply to it, never to the proxy.
        self._proxies = TrustedProxies(trusted_proxies)
        self._addresses: dict[bytes, str | None] = {}  # X-Forwarded-For entry -> canonical
        self.clock = clock
        # Bytes of a body scanned for parameters to probe (0: only the prefix the detector
        # reads), and whether a body longer than that is refused rather than let through.
        settings = guard.settings
        self._scan_bytes = settings.body_scan_bytes if guard.scorer is not None else 0
        self._refuse_over = settings.body_scan_over == "refuse"
        self._over_logged = -math.inf  # when a body last went past the budget, logged
        self._batch: list[_Waiting] = []  # scored at the end of this loop turn

    def address_of(self, request: Request) -> str:
        """The client's address: the peer's, or behind trusted proxies the right-most address
        in X-Forwarded-For that is not a trusted proxy's (nginx's real_ip_recursive). Entries
        left of it are the client's to write, so they are never believed."""
        peer = request.client
        if peer not in self._proxies:
            return peer
        values = [v for n, v in request.headers if n == b"x-forwarded-for"]
        if not values:
            return peer
        entries = b",".join(values).rsplit(b",", FORWARDED_HOPS)
        found = peer
        for entry in reversed(entries[-FORWARDED_HOPS:]):
            address = self._canonical(entry.strip())
            if address is None:
                break  # not an address: nothing left of it can be told apart from a forgery
            found = address
            if address not in self._proxies:
                break
        return found

    def _canonical(self, entry: bytes) -> str | None:
        """An X-Forwarded-For entry as an address in canonical form (so that one client is
        one key however its address is spelled), port or brackets dropped; None if it is
        not one. Cached: a proxy forwards for the same clients again and again."""
        if len(entry) > 64:  # longer than any address with a port: not one (and not cached)
            return None
        cache = self._addresses
        if entry in cache:
            return cache[entry]
        text = entry.decode("latin-1")
        if text.startswith("[") and "]" in text:  # [v6]:port
            text = text[1 : text.index("]")]
        elif text.count(":") == 1:  # v4:port
            text = text.split(":", 1)[0]
        try:
            address: str | None = str(ipaddress.ip_address(text))
        except ValueError:
            address = None
        if len(cache) >= 4096:
            cache.clear()
        cache[entry] = address
        return address

    def key_of(self, request: Request) -> str | None:
        """The configured client key (a header's value), if the request has one. Prefixed, so
        that a key is never taken for an address (nor its ban for an address's), and beyond
        KEY_LIMIT bytes replaced by its digest."""
        if self._header is None:
            return None
        value = request.header(self._header)
        if value is None:
            return None
        if len(value) > KEY_LIMIT:
            return "key#" + hashlib.blake2b(value, digest_size=16).hexdigest()
        return "key:" + value.decode("latin-1")

    def client_of(self, request: Request) -> str:
        key = self.key_of(request)
        return key if key is not None else self.address_of(request)

    # -- request ---------------------------------------------------------------------------

    def request(self, ctx: Context) -> Response | Later | None:
        """The rules, then the detector: a refusal, None (go on), or a Later that this loop
        turn's batch settles."""
        request = ctx.request
        if self._trusted is not None and self._trusted(request):
            request.guard_action = "allow"
            return None
        address = self.address_of(request)
        key = self.key_of(request)
        client = address if key is None else key
        keyed = None if key is None else address  # the address a keyed client pays from
        now = self.clock()
        decided = self.guard.rules(request.path, client, now, keyed)
        if isinstance(decided, Decision):
            return self._decided(request, decided)
        # To be scored (the rules settled nothing, and there is a detector): the detector's view.
        stream = request.stream
        declared = request.body_length() if stream is not None else None
        view = RequestView(
            request.method, request.path, request.query, request.headers, request.body, declared
        )
        if stream is not None:
            # A streaming body's route must take the stream as it is handed over, not a loop
            # turn later: scored alone, at once; the body is scanned as it arrives.
            injection, abuse = self._score_alone(view, head_probes(view), decided)
            decision = self.guard.decide(client, injection, abuse, now, keyed)
            self._remember(request, view, decided, decision)
            kind = body_kind(request.headers) if self._scan_bytes else None
            if not decision.refused and kind is not None:
                budget = PROBE_BUDGET - HEAD_PROBES
                scanner = BodyScanner(kind[0], self._scan_bytes, kind[1], budget)
                ctx.state[STATE] = BodyScan(self, view, request, scanner, client, keyed, decided)
            return self._decided(request, decision)
        probes = head_probes(view)
        if request.body and self._scan_bytes and self._scan_body(request, probes):
            refused = self.over_budget(client, now)
            if refused is not None:
                return self._decided(request, refused)
        # Scored with the requests that arrive in the same loop turn, in one numpy pass (see
        # Scorer.score): the request goes on a turn later, from _flush.
        later = Later()
        waiting = _Waiting(request, view, client, keyed, decided, later, probes)
        later.on_cancel = waiting.cancel
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append(waiting)
        return later

    def request_body(self, ctx: Context, chunk: bytes, end: bool) -> Response | None:
        """A streamed body's chunk, probed before it goes on (a refusal stops the upload)."""
        scan = ctx.state.get(STATE)
        if not isinstance(scan, BodyScan):
            return None  # trusted, refused at its head, not scanned, or the budget is spent
        decision = scan.feed(chunk)
        answer = None if decision is None else self._decided(ctx.request, decision)
        if scan.done or answer is not None:
            del ctx.state[STATE]  # the rest goes on unread (monitor mode: read on)
        return answer

    def _scan_body(self, request: Request, probes: list[bytes]) -> bool:
        """Add the probes of a whole ``body`` (its parameters, up to the budget) to ``probes``;
        whether the budget ran out before the body did."""
        kind = body_kind(request.headers)
        if kind is None:
            return False
        budget = self._scan_bytes
        body = request.body
        if kind[0] != MULTIPART and SUSPICIOUS.search(body, 0, budget) is None:
            return len(body) > budget  # nothing an attack needs: no value to probe (common)
        scanner = BodyScanner(kind[0], budget, kind[1], PROBE_BUDGET - len(probes))
        probes += scanner.feed(body, True)
        return scanner.over

    def _score_alone(
        self, view: RequestView, probes: list[bytes], history: list[float]
    ) -> tuple[float, float]:
        """(injection, abuse) of one request and its probes (the higher injection of all)."""
        scorer = self.guard.scorer
        assert scorer is not None
        if not probes:
            return scorer.score_one(view, history)
        views = [view, *probe_views(view, probes)]
        scores = scorer.score(views, [history] * len(views))
        return float(scores[:, 0].max()), float(scores[0, 1])

    def over_budget(self, client: str, now: float) -> Decision | None:
        """A body past the scanning budget: the refusal with body_scan_over = "refuse", else
        None (the rest goes unread). Logged at most once a minute either way."""
        if now >= self._over_logged + 60.0:
            self._over_logged = now
            log.warning(
                "guard: a request body from %r went past the scanning budget (%d bytes, "
                "or %d suspicious values); %s (guard.body_scan_over)",
                shown_client(client),  # a client key is a secret: never logged whole
                self._scan_bytes,
                PROBE_BUDGET,
                "refused" if self._refuse_over else "the rest went unread",
            )
        if not self._refuse_over:
            return None
        return self.guard.refuse(client, "body_budget", now)

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        scorer = self.guard.scorer
        assert scorer is not None
        try:
            if len(batch) == 1:  # a lone request: the per-request path has fewer numpy calls
                lone = batch[0]
                scores = [self._score_alone(lone.view, lone.probes, lone.history)]
            else:
                scores = self._score_batch(batch)
        except Exception:  # a scoring bug must not leave requests hanging
            log.exception("guard scoring failed; letting the batch through")
            scores = [(0.0, 0.0)] * len(batch)
        now = self.clock()
        for waiting, (injection, abuse) in zip(batch, scores, strict=True):
            decision = self.guard.decide(waiting.client, injection, abuse, now, waiting.keyed)
            if waiting.cancelled:
                continue  # the client went away (the decision still counts)
            self._remember(waiting.request, waiting.view, waiting.history, decision)
            answer = self._decided(waiting.request, decision)
            if answer is None:
                waiting.later.go_on()
            else:
                waiting.later.respond(answer)

    def _score_batch(self, batch: list[_Waiting]) -> list[tuple[float, float]]:
        """Each request's (injection, abuse), its probes scored in the same numpy pass."""
        scorer = self.guard.scorer
        assert scorer is not None
        views: list[RequestView] = []
        histories: list[list[float]] = []
        for waiting in batch:
            views.append(waiting.view)
            histories.append(waiting.history)
            if waiting.probes:
                views += probe_views(waiting.view, waiting.probes)
                histories += [waiting.history] * len(waiting.probes)
        rows = scorer.score(views, histories).tolist()
        scores = []
        at = 0
        for waiting in batch:
            n = 1 + len(waiting.probes)
            injection = max(row[0] for row in rows[at : at + n])
            scores.append((injection, rows[at][1]))
            at += n
        return scores

    def _remember(
        self, request: Request, view: RequestView, history: list[float], decision: Decision
    ) -> None:
        score = decision.score
        if self.feedback is not None and score is not None:
            self.feedback.remember(request.request_id, view, history, score)

    def _decided(self, request: Request, decision: Decision) -> Response | None:
        """Note ``decision`` on the request; its refusal, or None to let it on."""
        request.guard_action = decision.action
        request.guard_score = decision.score
        if decision.refused:
            return refusal(decision)
        return None

    # -- connect, disconnect, log, every second -----------------------------------------------

    def connect(self, address: str) -> bool:
        # A trusted proxy's connections carry everyone behind it: a ban or a cap of one of
        # them is answered per request (403, 429), never by cutting the proxy off.
        if address in self._proxies:
            return True
        return not self.guard.connect(address, self.clock()).refused

    def disconnect(self, address: str) -> None:
        if address not in self._proxies:
            self.guard.disconnect(address)

    def log(self, ctx: Context) -> None:
        """Responses feed the client's 4xx share."""
        self.guard.answered(self.client_of(ctx.request), ctx.status)


class _Waiting:
    """A request waiting for its batch's scores, and the Later its request phase returned."""

    __slots__ = ("cancelled", "client", "history", "keyed", "later", "probes", "request", "view")

    def __init__(
        self,
        request: Request,
        view: RequestView,
        client: str,
        keyed: str | None,
        history: list[float],
        later: Later,
        probes: list[bytes],
    ) -> None:
        self.request, self.view, self.client, self.history = request, view, client, history
        self.keyed = keyed
        self.probes = probes  # values scored on their own (features.head_probes, BodyScanner)
        self.later = later
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
