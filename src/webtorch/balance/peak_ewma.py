"""Peak-EWMA: the latency-aware balancer of Finagle and Linkerd.

Each upstream carries a latency estimate that jumps to any observation above it (the *peak*: a
server that slows down is noticed on its first slow response) and otherwise moves toward new
observations with the weight ``exp(-elapsed / decay_time)`` of the time since its last update.
Between observations the estimate also decays toward zero at that rate, as Finagle's reads do, so
an upstream that was avoided after a slow spell is tried again once its old peak has faded.

A pick draws two distinct candidates at random and keeps the cheaper, where::

    cost = estimate(now) * (inflight + 1) / effective_weight

so load in flight multiplies a server's latency (a fast server with a queue is not fast) and a
server in slow start counts as costlier. A server never measured is pessimistic: each request in
flight to it counts ``initial_latency`` until its first answer (and, as in Finagle, it costs
nothing while idle, so that a new server gets one request to be measured by rather than
starving behind measured ones). The two random choices, rather than the global minimum,
keep picks spread when estimates are close or stale.

Recovery: an avoided upstream gets no answers, so its estimate would only fade at the decay's
pace (a 2 s peak takes ~45 s to fall to 20 ms with ``decay_time = 10``, a failure's penalty
longer). So an estimate not updated for ``PROBE_AFTER`` seconds makes its upstream *due*: the
next pick that draws it, idle, as the costlier of the two sends it one request anyway (reason
``peak_ewma_probe``). A probe's answer, if faster, replaces the stale estimate outright rather
than being blended in (the peak it held is old news: a healed upstream regains its share at
once). The interval doubles with every probe, up to ``PROBE_MAX``, and starts again from
``PROBE_AFTER`` only ``PROBE_RESET`` seconds after the last probe: one still broken, or slow on a
share of its requests (fast to a probe, slow again soon after), costs a request every
``PROBE_MAX`` seconds, and a healed one is back within that.

Sans-IO: time comes in as ``now``, randomness from an injected :class:`random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from webtorch.balance.base import Outcome, Policy, Upstream
from webtorch.balance.settings import PeakEwmaSettings
from webtorch.http.messages import Request

# The decayed estimate never goes below this (seconds): after a long idle spell in-flight counts
# still rank upstreams instead of every cost underflowing to zero.
FLOOR = 1e-6
# A failure can push an estimate up to this many times ``initial_latency`` by doubling (a failure
# that itself took longer counts as long as it took).
FAILURE_CEILING = 32.0
# Seconds without an answer after which an avoided upstream is sent one request (doubling with
# each probe up to PROBE_MAX; see the module doc).
PROBE_AFTER = 1.0
PROBE_MAX = 8.0
PROBE_RESET = 30.0


class LatencyEstimate:
    """One upstream's peak-sensitive, time-decayed latency estimate, in seconds.

    Until its first observation it is the ``initial`` guess, as it is (a guess has no age to
    decay with); the first observation replaces the guess outright, since a guess is not
    evidence to average with.
    """

    __slots__ = (
        "decay_time",
        "last_probe",
        "observed",
        "peak",
        "probe_after",
        "probing",
        "stamp",
        "value",
    )

    def __init__(self, initial: float, decay_time: float, peak: bool = True) -> None:
        self.value = initial
        self.decay_time = decay_time
        self.peak = peak  # False: a slower observation is blended in like a faster one
        self.stamp = 0.0  # when ``value`` was last set by an observation
        self.observed = False
        self.probe_after = PROBE_AFTER
        self.probing = False  # a probe is out: its answer replaces the estimate if faster
        self.last_probe = -math.inf

    def due(self, now: float, inflight: int) -> bool:
        """Whether its upstream, idle and unmeasured for ``probe_after`` seconds, should be sent
        a request to find out whether it recovered."""
        return self.observed and inflight == 0 and now - self.stamp >= self.probe_after

    def probed(self, now: float) -> None:
        """A probe request went out: the next one waits twice as long (see the module doc)."""
        if now - self.last_probe > PROBE_RESET:
            self.probe_after = PROBE_AFTER
        self.probe_after = min(2.0 * self.probe_after, PROBE_MAX)
        self.last_probe = now
        self.probing = True

    def get(self, now: float) -> float:
        """The estimate at ``now``: the last value decayed toward zero over the time since."""
        elapsed = now - self.stamp
        if not self.observed or elapsed <= 0.0:
            return self.value
        return max(self.value * math.exp(-elapsed / self.decay_time), FLOOR)

    def observe(self, latency: float, now: float) -> None:
        latency = max(latency, 0.0)
        if not self.observed:
            self.observed = True
            self.value = latency
            self.stamp = now
            return
        elapsed = max(now - self.stamp, 0.0)
        weight = math.exp(-elapsed / self.decay_time)
        current = self.value * weight  # what get(now) says
        probing, self.probing = self.probing, False
        if latency > current and self.peak:
            self.value = latency  # the peak: a slowdown counts at once, in full
        elif probing:
            self.value = latency  # the stale peak is old news: measured fast now
        else:
            # A faster response moves the estimate toward it, the more so the longer since the
            # last update; the result stays between the observation and the current estimate.
            self.value = current * weight + latency * (1.0 - weight)
        self.stamp = now


class PeakEwma(Policy):
    """Power of two choices over ``latency estimate x (inflight + 1)``; see the module doc.

    Failures: an attempt that failed (5xx, refused, reset, timed out) counts as an observation of
    ``max(latency, initial_latency, estimate, min(2 x estimate, FAILURE_CEILING x
    initial_latency))``. A fast failure would otherwise look like a fast server and draw more
    traffic; this way every failure raises the upstream's cost (doubling it, geometrically, up to
    the ceiling) and it is tried again only once that penalty has decayed. Cancelled attempts say
    nothing about the upstream and are ignored.
    """

    name = "peak_ewma"
    learns = True
    KEY = "peak_ewma"  # its key in ``Upstream.stats``

    def __init__(
        self,
        group: Sequence[Upstream],
        settings: PeakEwmaSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(group)
        s = settings if settings is not None else PeakEwmaSettings()
        self.decay_time = s.decay_time
        self.initial_latency = s.initial_latency
        self._rng = rng if rng is not None else random.Random()
        for upstream in self.group:
            upstream.stats[self.KEY] = LatencyEstimate(self.initial_latency, self.decay_time)

    def estimate(self, upstream: Upstream) -> LatencyEstimate:
        est = upstream.stats.get(self.KEY)
        if not isinstance(est, LatencyEstimate):
            # An upstream this policy has not met (a test's own list, a group built later).
            est = upstream.stats[self.KEY] = LatencyEstimate(self.initial_latency, self.decay_time)
        return est

    def cost(self, upstream: Upstream, now: float) -> float:
        est = self.estimate(upstream)
        if est.observed:
            cost = est.get(now) * (upstream.inflight + 1)
        else:
            # Finagle's rule for a server never measured: free while idle, so that it gets a
            # first request and is measured, then initial_latency per request in flight, so
            # that it is not flooded before it has answered once.
            cost = est.value * upstream.inflight
        weight = upstream.effective_weight
        return cost / weight if weight > 0.0 else math.inf

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        count = len(candidates)
        if count == 1:
            self.last_reason = "only_candidate"
            return candidates[0]
        self.last_reason = "peak_ewma"
        rng = self._rng
        first = rng.randrange(count)
        second = rng.randrange(count - 1)
        if second >= first:
            second += 1  # two distinct indices, one draw each
        a = candidates[first]
        b = candidates[second]
        cost_a = self.cost(a, now)
        cost_b = self.cost(b, now)
        if cost_a < cost_b:
            return self._or_probe(a, b, now)
        if cost_b < cost_a:
            return self._or_probe(b, a, now)
        return a if rng.random() < 0.5 else b

    def _or_probe(self, cheaper: Upstream, costlier: Upstream, now: float) -> Upstream:
        """``cheaper``, unless ``costlier`` is due a probe (see the module doc)."""
        est = self.estimate(costlier)
        if est.due(now, costlier.inflight):
            est.probed(now)
            self.last_reason = "peak_ewma_probe"
            return costlier
        return cheaper

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
        est = self.estimate(upstream)
        if outcome.is_failure:
            latency = failure_latency(est.get(now), latency, self.initial_latency)
        est.observe(latency, now)

    def failure_latency(self, current: float, latency: float) -> float:
        """What a failed attempt that took ``latency`` counts as, for an upstream currently
        estimated at ``current`` (see the class doc)."""
        return failure_latency(current, latency, self.initial_latency)


def failure_latency(current: float, latency: float, floor: float) -> float:
    """The latency a failed attempt counts as: never less than it took, than ``floor``, or than
    the upstream's ``current`` estimate, and twice that estimate while under
    ``FAILURE_CEILING x floor``, so that failing fast never makes an upstream look fast."""
    doubled = min(2.0 * current, FAILURE_CEILING * floor)
    return max(latency, floor, current, doubled)
