"""Prequal (Google, NSDI 2024, "Load is not what you should balance"): pick by probed load.

Upstreams are probed asynchronously, off the request path: each probe brings back what the
upstream says about itself, its requests in flight (RIF) and its recent typical latency. Results
wait in a small pool (the oldest makes room for a new one), each usable for at most ``max_age``
seconds and ``max_reuse`` picks. The pool holds responses, not upstreams: an upstream probed
twice has two entries, as in the paper, so that the reuse budget adds up (a probe rate of 1 per
pick and a reuse of 3 keep the pool supplied even for an upstream that is probed only every
other pick). A pick applies the hot-cold lexicographic (HCL) rule to the pooled results of its
candidates:

- a result is *hot* when its in-flight count is above the ``hot_quantile`` of the in-flight
  counts across the pool (linear interpolation between the pool's sorted counts), else *cold*;
- among cold candidates the lowest latency wins (then the fewest in flight);
- when every candidate is hot, the fewest in flight wins (then the lowest latency).

Balancing latency among servers with headroom, and load only among overloaded ones, is what the
paper found to beat both least-load and least-latency at high utilisation.

Every pick asks for ``probes_per_request`` new probes (a fractional rate accumulates) to
candidates drawn at random without replacement; the proxy collects them through
:meth:`Prequal.probes` and reports back through :meth:`Prequal.on_probe`. An upstream whose probes
fail (not a WebTorch server, or unwell) is probed with a growing back-off, up to
``PROBE_BACKOFF_MAX`` seconds.

Without a fresh result for any candidate (start-up, probes failing, upstreams that do not answer
probes) the same HCL rule runs on the proxy's own view: ``Upstream.inflight`` as the in-flight
count and a peak-EWMA of the latencies ``observe`` reports (failures counted as penalties, see
:func:`~webtorch.balance.peak_ewma.failure_latency`). An upstream never observed counts as fast,
so that each is tried and measured.

Sans-IO: time comes in as ``now``, randomness from an injected :class:`random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from webtorch.balance.base import Outcome, Policy, ProbeResult, Upstream
from webtorch.balance.peak_ewma import LatencyEstimate, failure_latency
from webtorch.balance.settings import PrequalSettings
from webtorch.http.messages import Request

# The proxy's own latency estimates (the fallback) forget a peak over this many seconds.
OWN_DECAY_TIME = 10.0
# What a failed attempt counts as at least, in the fallback (peak_ewma's default initial_latency).
OWN_FAILURE_LATENCY = 1.0
# Seconds a failing upstream waits before its next probe at most (the back-off doubles from
# max_age per consecutive failure up to this).
PROBE_BACKOFF_MAX = 30.0


@dataclass(eq=False, slots=True)
class PooledProbe:
    """One probe result in the pool: what the upstream reported, and (``sent``) how many
    requests this policy had sent it by then, so that a pick can add those sent since."""

    upstream: Upstream
    inflight: int
    latency: float
    received: float
    sent: int = 0  # the upstream's pick count (_Own.picks) when this result arrived
    uses: int = 0


class _Own:
    """The policy's per-upstream state (kept in ``Upstream.stats["prequal"]``)."""

    __slots__ = ("estimate", "picks", "probe_failures")

    def __init__(self) -> None:
        self.estimate = LatencyEstimate(0.0, OWN_DECAY_TIME)
        self.probe_failures = 0
        self.picks = 0  # requests this policy sent it, ever


def hot_threshold(inflights: Sequence[int], quantile: float) -> float:
    """The ``quantile`` of ``inflights`` by linear interpolation between order statistics (as
    numpy's default); a count above it is hot. Two results 1 and 50 give 42.16 at 0.84: the
    busier one is hot, though a nearest-rank quantile of two values would call neither hot."""
    ordered = sorted(inflights)
    if not ordered:
        return math.inf
    position = quantile * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


class Prequal(Policy):
    """See the module doc. ``pool`` holds the live probe results, oldest first."""

    name = "prequal"
    learns = True
    probing = True
    KEY = "prequal"  # its key in ``Upstream.stats``

    def __init__(
        self,
        group: Sequence[Upstream],
        settings: PrequalSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(group)
        # probe_path and probe_timeout belong to the prober, not to the policy.
        s = settings if settings is not None else PrequalSettings()
        self.probes_per_request = s.probes_per_request
        self.pool_size = s.pool_size
        self.max_age = s.max_age
        self.max_reuse = s.max_reuse
        self.hot_quantile = s.hot_quantile
        self._rng = rng if rng is not None else random.Random()
        self.pool: list[PooledProbe] = []
        self._credit = 0.0  # probes owed, fractional
        self._due: list[Upstream] = []  # asked for, not yet collected by probes()
        self._backoff: dict[Upstream, float] = {}  # failing upstreams: no probe before then
        for upstream in self.group:
            upstream.stats[self.KEY] = _Own()

    def _own(self, upstream: Upstream) -> _Own:
        own = upstream.stats.get(self.KEY)
        if not isinstance(own, _Own):
            own = upstream.stats[self.KEY] = _Own()
        return own

    # -- picking ------------------------------------------------------------------------------

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        if self.probes_per_request:
            self._ask_probes(candidates, now)
        if len(candidates) == 1:
            self.last_reason = "only_candidate"
            return candidates[0]
        self._expire(now)
        if self.pool:
            members: Collection[Upstream] = candidates if len(candidates) <= 8 else set(candidates)
            usable = [p for p in self.pool if p.upstream in members]
            if usable:
                return self._pick_pooled(usable)
        self.last_reason = "prequal_fallback"  # no fresh probe: the proxy's own view
        return self._pick_own(candidates, now)

    def _pick_pooled(self, usable: list[PooledProbe]) -> Upstream:
        # A result's in-flight count is what the upstream reported plus every request sent to
        # it since, through any of its results: counting only the result's own uses (the
        # paper's increment) lets a pool holding several results of one fast upstream send it
        # max_reuse requests on each, all priced at the same stale count: a herd, measured at
        # a p99 of ~460 ms against least_conn's ~80 ms in capacity 1:2:4 (webtorch_lab/offline.py).
        rif = {id(p): p.inflight + self._own(p.upstream).picks - p.sent for p in self.pool}
        threshold = hot_threshold(list(rif.values()), self.hot_quantile)
        best: PooledProbe | None = None
        best_key = (0.0, 0)
        for probe in usable:
            count = rif[id(probe)]
            if count <= threshold and (best is None or (probe.latency, count) < best_key):
                best, best_key = probe, (probe.latency, count)
        if best is None:  # all hot
            best = min(usable, key=lambda p: (rif[id(p)], p.latency))
            self.last_reason = "prequal_hot"
        else:
            self.last_reason = "prequal_cold"
        best.uses += 1
        self._own(best.upstream).picks += 1
        if best.uses >= self.max_reuse:
            self.pool.remove(best)
        return best.upstream

    def _pick_own(self, candidates: Sequence[Upstream], now: float) -> Upstream:
        count = len(candidates)
        if count > self.pool_size:
            view = self._rng.sample(candidates, self.pool_size)
        else:
            # Start at a random place so that ties (all unknown, all idle) spread.
            start = self._rng.randrange(count)
            view = [*candidates[start:], *candidates[:start]]
        threshold = hot_threshold([u.inflight for u in view], self.hot_quantile)
        best: Upstream | None = None
        best_key = (0.0, 0)
        for upstream in view:
            if upstream.inflight > threshold:
                continue
            key = (self._own(upstream).estimate.get(now), upstream.inflight)
            if best is None or key < best_key:
                best, best_key = upstream, key
        if best is None:
            best = min(view, key=lambda u: (u.inflight, self._own(u).estimate.get(now)))
        return best

    def _expire(self, now: float) -> None:
        pool = self.pool
        if pool and now - pool[0].received > self.max_age:  # oldest first: one look if fresh
            self.pool = [p for p in pool if now - p.received <= self.max_age]

    # -- probing ------------------------------------------------------------------------------

    def _ask_probes(self, candidates: Sequence[Upstream], now: float) -> None:
        self._credit += self.probes_per_request
        wanted = int(self._credit)
        if wanted <= 0:
            return
        self._credit -= wanted
        targets: Sequence[Upstream] = candidates
        if self._backoff:
            for upstream, until in list(self._backoff.items()):
                if until <= now:
                    del self._backoff[upstream]
            if self._backoff:
                targets = [u for u in candidates if u not in self._backoff]
        if not targets:
            return
        rng = self._rng
        if wanted == 1:
            chosen = [targets[rng.randrange(len(targets))]]
        else:
            chosen = rng.sample(targets, min(wanted, len(targets)))
        due = self._due
        due.extend(chosen)
        if len(due) > self.pool_size:
            # Nobody collects them (a test, a group without a prober): keep the newest.
            del due[: len(due) - self.pool_size]

    def probes(self, now: float) -> Sequence[Upstream]:
        due = self._due
        if not due:
            return ()
        self._due = []
        return due

    def on_probe(self, upstream: Upstream, load: ProbeResult | None, now: float) -> None:
        own = self._own(upstream)
        if load is None:
            self._drop(upstream)  # its earlier answers are not to be trusted either
            own.probe_failures += 1
            wait = min(self.max_age * 2.0 ** (own.probe_failures - 1), PROBE_BACKOFF_MAX)
            self._backoff[upstream] = now + wait
            return
        own.probe_failures = 0
        self._backoff.pop(upstream, None)
        self._expire(now)
        pool = self.pool
        if len(pool) >= self.pool_size:
            del pool[0]  # the oldest makes room
        pool.append(
            PooledProbe(
                upstream, max(load.inflight, 0), max(load.latency, 0.0), now, sent=own.picks
            )
        )

    def _drop(self, upstream: Upstream) -> None:
        """Forget every pooled result of ``upstream``."""
        if any(p.upstream is upstream for p in self.pool):
            self.pool = [p for p in self.pool if p.upstream is not upstream]

    # -- learning -----------------------------------------------------------------------------

    def observe(
        self,
        upstream: Upstream,
        outcome: Outcome,
        latency: float,
        now: float,
        request: Request | None = None,
    ) -> None:
        if outcome is Outcome.CANCELLED:
            return
        estimate = self._own(upstream).estimate
        if outcome.is_failure:
            # A server that reports itself idle but fails requests must not keep drawing them
            # on the strength of its last probe.
            self._drop(upstream)
            latency = failure_latency(estimate.get(now), latency, OWN_FAILURE_LATENCY)
        estimate.observe(latency, now)

    def maintain(self, now: float) -> None:
        self._expire(now)
