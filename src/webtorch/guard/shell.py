"""The guard's thin I/O shell: it wraps the server's handler, so every request passes
:meth:`Guard.check` before reaching its route, and answers the refused ones itself.

A throttled request gets 429 with ``Retry-After``, a blocked one 403; both with a JSON error that
says why, as every WebTorch error does. The decision is noted on the request for the access log.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webtorch.config import GuardConfig
from webtorch.errors import HTTPError
from webtorch.guard.core import BLOCK, Decision, Guard, GuardSettings, retry_after_header
from webtorch.guard.features import RequestView
from webtorch.guard.scorer import Scorer
from webtorch.http.messages import (
    Handler,
    HandlerResult,
    Pending,
    Request,
    Response,
    error_response,
    response_for_error,
)
from webtorch.proxy.headers import TrustedProxies

if TYPE_CHECKING:
    from webtorch.guard.feedback import Feedback  # torch: only with online adaptation on

log = logging.getLogger("webtorch.guard")
DEFAULT_MODEL = Path(__file__).parent / "guard.safetensors"
_MESSAGES = {
    "deny_list": "this address is not allowed here",
    "banned": "this client is banned for a while after an earlier blocked request",
    "rate_limit": "too many requests from this client; slow down",
    "new_keys": "too many new client keys from this address; slow down",
    "surge": "the server is under a surge of traffic from new clients; slow down",
    "connections": "too many connections from this client",
    "injection": "the request looks like an attack (injection) and was blocked",
    "abuse": "this client's traffic looks abusive",
}


ADAPTED = "guard.safetensors"  # the adapted weights' name in the guard's state directory
# A client key (client_key = "header:...") longer than this is kept as its digest: the client
# table's bytes stay bounded whatever keys clients send.
KEY_LIMIT = 64
# X-Forwarded-For entries read from the right, at most: a chain of trusted proxies is short.
FORWARDED_HOPS = 16


def state_dir(config: GuardConfig, base_dir: Path) -> Path:
    if config.state_dir is None:
        return Path.cwd() / "webtorch-state" / "guard"
    return base_dir / config.state_dir


def weights_of(config: GuardConfig, base_dir: Path) -> Path | None:
    """The detector's weights: adapted ones from an earlier run's feedback if there are any,
    else the configured model, else the shipped one; None for model = "none"."""
    if config.model == "none":
        return None
    adapted = state_dir(config, base_dir) / ADAPTED
    if config.feedback and adapted.is_file():
        return adapted
    return DEFAULT_MODEL if config.model is None else base_dir / config.model


def make_guard(config: GuardConfig, base_dir: Path) -> Guard:
    weights = weights_of(config, base_dir)
    scorer = None if weights is None else Scorer.from_file(weights)
    # GuardSettings holds the decision policy's share of the config, under the same names.
    settings = GuardSettings(**{f.name: getattr(config, f.name) for f in fields(GuardSettings)})
    return Guard(settings, scorer)


class GuardedHandler:
    """``handler`` behind ``guard``: the server's handler when [guard] is configured."""

    def __init__(
        self,
        guard: Guard,
        handler: Handler,
        client_key: str = "ip",
        clock: Callable[[], float] = time.monotonic,
        feedback: Feedback | None = None,
        trusted: Callable[[Request], bool] | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.guard = guard
        self.handler = handler
        self.feedback = feedback
        # Requests that skip the guard: those bearing the server's token (operators, whose
        # feedback would otherwise be scored as the attacks it quotes).
        self._trusted = trusted
        self._header = client_key[len("header:") :].lower().encode() if client_key != "ip" else None
        # Behind these, a request's client is the address they forwarded it for (server.
        # trusted_proxies): decisions and bans apply to it, never to the proxy.
        self._proxies = TrustedProxies(trusted_proxies)
        self._addresses: dict[bytes, str | None] = {}  # X-Forwarded-For entry -> canonical
        self._clock = clock
        self._batch: list[_Waiting] = []  # scored at the end of this loop turn
        self._tasks: set[asyncio.Future[Response]] = set()  # coroutine handlers' results

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

    def __call__(self, request: Request) -> HandlerResult:
        if self._trusted is not None and self._trusted(request):
            request.guard_action = "allow"
            return self.handler(request)
        declared = request.body_length() if request.stream is not None else None
        view = RequestView(
            request.method, request.path, request.query, request.headers, request.body, declared
        )
        address = self.address_of(request)
        key = self.key_of(request)
        client = address if key is None else key
        keyed = None if key is None else address  # the address a keyed client pays from
        now = self._clock()
        decided = self.guard.rules(view, client, now, keyed)
        if isinstance(decided, Decision):
            return self._decided(request, decided)
        scorer = self.guard.scorer
        assert scorer is not None
        if request.stream is not None:
            # A streaming body's handler must take the stream as it is handed over, not a loop
            # turn later: scored alone, at once.
            injection, abuse = scorer.score_one(view, decided)
            decision = self.guard.decide(client, injection, abuse, now, keyed)
            self._remember(request, view, decided, decision)
            return self._decided(request, decision)
        # Scored with the requests that arrive in the same loop turn, in one numpy pass (see
        # Scorer.score): the handler runs a turn later, from _flush.
        pending = Pending()
        waiting = _Waiting(request, view, client, keyed, decided, pending)
        pending.on_cancel = waiting.cancel
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append(waiting)
        return pending

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        scorer = self.guard.scorer
        assert scorer is not None
        try:
            if len(batch) == 1:  # a lone request: the per-request path has fewer numpy calls
                scores = [scorer.score_one(batch[0].view, batch[0].history)]
            else:
                views, histories = [w.view for w in batch], [w.history for w in batch]
                scores = [(i, a) for i, a in scorer.score(views, histories).tolist()]
        except Exception:  # a scoring bug must not leave requests hanging
            log.exception("guard scoring failed; letting the batch through")
            scores = [(0.0, 0.0)] * len(batch)
        now = self._clock()
        for waiting, (injection, abuse) in zip(batch, scores, strict=True):
            decision = self.guard.decide(waiting.client, injection, abuse, now, waiting.keyed)
            if waiting.cancelled:
                continue  # the client went away (the decision still counts)
            self._remember(waiting.request, waiting.view, waiting.history, decision)
            waiting.forward(
                functools.partial(self._decided, waiting.request, decision), self._tasks
            )

    def _remember(
        self, request: Request, view: RequestView, history: list[float], decision: Decision
    ) -> None:
        score = decision.score
        if self.feedback is not None and score is not None:
            self.feedback.remember(request.request_id, view, history, score)

    def _decided(self, request: Request, decision: Decision) -> HandlerResult:
        """Note ``decision`` on the request; its refusal, or its handler's result."""
        request.guard_action = decision.action
        request.guard_score = decision.score
        if decision.refused:
            return refusal(decision)
        return self.handler(request)

    # -- the server's connection gate ----------------------------------------------------------

    def admit(self, address: str) -> bool:
        # A trusted proxy's connections carry everyone behind it: a ban or a cap of one of
        # them is answered per request (403, 429), never by cutting the proxy off.
        if address in self._proxies:
            return True
        return not self.guard.connect(address, self._clock()).refused

    def release(self, address: str) -> None:
        if address not in self._proxies:
            self.guard.disconnect(address)

    def answered(self, request: Request, status: int) -> None:
        """The server's observer: responses feed the client's 4xx share."""
        self.guard.answered(self.client_of(request), status)


class _Waiting:
    """A request waiting for its batch's scores, and the Pending its client waits on."""

    __slots__ = (
        "cancelled",
        "client",
        "history",
        "inner",
        "keyed",
        "pending",
        "request",
        "view",
    )

    def __init__(
        self,
        request: Request,
        view: RequestView,
        client: str,
        keyed: str | None,
        history: list[float],
        pending: Pending,
    ) -> None:
        self.request, self.view, self.client, self.history = request, view, client, history
        self.keyed = keyed
        self.pending = pending
        self.cancelled = False
        self.inner: Pending | asyncio.Future[Response] | None = None  # the handler's, once run

    def cancel(self) -> None:
        self.cancelled = True
        if self.inner is not None:
            self.inner.cancel()

    def forward(
        self, run: Callable[[], HandlerResult], tasks: set[asyncio.Future[Response]]
    ) -> None:
        """Run the handler (or the refusal) and pass its response on to the client's Pending,
        with the errors the server's own dispatch would turn into answers."""
        pending = self.pending
        try:
            result = run()
        except HTTPError as exc:
            pending.resolve(response_for_error(exc))
            return
        except Exception:
            # %r: the path is the client's, decoded; it may hold line breaks.
            log.exception("handler failed for %s %r", self.request.method, self.request.path)
            pending.resolve(error_response(500, "internal server error"))
            return
        if isinstance(result, Response):
            pending.resolve(result)
        elif isinstance(result, Pending):
            self.inner = result
            result.subscribe(_resolve, pending)
        else:
            future = asyncio.ensure_future(result)
            self.inner = future
            tasks.add(future)
            future.add_done_callback(functools.partial(_finished, pending, tasks))


def _resolve(pending: Pending, response: Response) -> None:
    pending.resolve(response)


def _finished(
    pending: Pending, tasks: set[asyncio.Future[Response]], future: asyncio.Future[Response]
) -> None:
    tasks.discard(future)
    if future.cancelled():
        return
    exc = future.exception()
    if exc is None:
        pending.resolve(future.result())
    elif isinstance(exc, HTTPError):
        pending.resolve(response_for_error(exc))
    else:
        log.error("handler failed", exc_info=exc)
        pending.resolve(error_response(500, "internal server error"))


def refusal(decision: Decision) -> HandlerResult:
    message = _MESSAGES.get(decision.reason, "refused by the guard")
    if decision.action == BLOCK:
        return error_response(403, message)
    return error_response(
        429, message, [(b"retry-after", retry_after_header(decision.retry_after))]
    )


def metric_families(guard: Guard) -> Iterator[Metric]:
    """The guard's metrics, for /metrics (see docs/METRICS.md)."""
    stats = guard.stats
    decisions = CounterMetricFamily(
        "webtorch_guard_decisions",
        "Requests and connections decided, by action and reason (in monitor mode: what the "
        "guard would have done)",
        labels=["action", "reason"],
    )
    for (action, reason), count in sorted(stats.decisions.items()):
        decisions.add_metric([action, reason], count)
    yield decisions
    scores = HistogramMetricFamily(
        "webtorch_guard_score", "The detector's score of each request it scored (higher head)"
    )
    scores.add_metric([], stats.scores.buckets(), stats.scores.total)
    yield scores
    yield GaugeMetricFamily("webtorch_guard_bans", "Clients banned now", value=len(guard.bans))
    if guard.surge is not None:
        surge = guard.surge
        yield GaugeMetricFamily(
            "webtorch_guard_surge", "1 while a surge is under way", value=float(surge.active)
        )
        yield CounterMetricFamily("webtorch_guard_surges", "Surges seen", value=surge.surges)
        yield GaugeMetricFamily(
            "webtorch_guard_surge_baseline_rate",
            "The server's request rate the surge detector takes as normal (requests/s)",
            value=surge.baseline,
        )
    yield GaugeMetricFamily(
        "webtorch_guard_clients", "Clients whose recent history is kept", value=len(guard.clients)
    )
    yield CounterMetricFamily(
        "webtorch_guard_clients_evicted",
        "Client histories forgotten to stay within max_clients",
        value=guard.clients.evicted,
    )
