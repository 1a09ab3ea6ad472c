"""The classic, stateless-about-latency policies: round robin, least connections, two choices.

They read only ``Upstream.inflight`` and ``Upstream.effective_weight`` and learn nothing from
``observe``, so they are the baselines the adaptive policies are measured against.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from webtorch.balance.base import Policy, Upstream
from webtorch.http.messages import Request


class SmoothWeights:
    """nginx's smooth weighted round robin state (``ngx_http_upstream_get_peer``).

    Every pick adds each taking-part upstream's effective weight to its current weight, takes the
    upstream with the largest current weight (the first in order on ties) and subtracts the total
    of the weights from the winner. Upstreams that do not take part in a pick keep their current
    weight untouched, as nginx skips down or already-tried peers, so a candidate set that changes
    between picks still converges on the weights. State is keyed by the Upstream object and owned
    by one policy: two policies sharing upstreams must not disturb each other's rotation.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[Upstream, float] = {}

    def choose(self, upstreams: Sequence[Upstream]) -> Upstream:
        current = self._current
        total = 0.0
        best: Upstream | None = None
        best_current = 0.0
        for upstream in upstreams:
            # A zero weight would never win and never move; count it as a tiny weight so an
            # all-zero set still rotates instead of pinning the first upstream.
            weight = upstream.effective_weight
            if weight <= 0.0:
                weight = 1e-9
            value = current.get(upstream, 0.0) + weight
            current[upstream] = value
            total += weight
            if best is None or value > best_current:
                best = upstream
                best_current = value
        if best is None:
            raise ValueError("no upstream to choose from")
        current[best] = best_current - total
        return best

    def current_weight(self, upstream: Upstream) -> float:
        """The upstream's current weight (for tests and the dashboard)."""
        return self._current.get(upstream, 0.0)


class RoundRobin(Policy):
    """Smooth weighted round robin over the candidates, exactly as nginx's default balancer.

    Weights 5, 1, 1 give the sequence a a b a c a a: the heavy upstream's turns are spread out
    instead of coming in a burst of five.
    """

    name = "round_robin"

    def __init__(self, group: Sequence[Upstream]) -> None:
        super().__init__(group)
        self._weights = SmoothWeights()

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        if len(candidates) == 1:
            # A full pass would add and then subtract the same weight: same state, less work.
            self.last_reason = "only_candidate"
            return candidates[0]
        self.last_reason = "round_robin"
        return self._weights.choose(candidates)


class LeastConn(Policy):
    """Fewest in-flight requests per unit of effective weight, as nginx ``least_conn``.

    The loads are compared by cross-multiplying (``a.inflight * b.weight`` against
    ``b.inflight * a.weight``) so that no division rounds two equal ratios apart. Ties among the
    least loaded are broken by smooth weighted round robin, so an idle group is spread by weight
    rather than always sending to the first upstream.
    """

    name = "least_conn"

    def __init__(self, group: Sequence[Upstream]) -> None:
        super().__init__(group)
        self._weights = SmoothWeights()

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        if len(candidates) == 1:
            self.last_reason = "only_candidate"
            return candidates[0]
        best = candidates[0]
        tied: list[Upstream] = [best]
        for upstream in candidates[1:]:
            left = upstream.inflight * best.effective_weight
            right = best.inflight * upstream.effective_weight
            if left < right:
                best = upstream
                tied = [upstream]
            elif left == right:
                tied.append(upstream)
        if len(tied) == 1:
            self.last_reason = "least_conn"
            return best
        self.last_reason = "least_conn_tie"  # the least loaded, by weighted round robin
        return self._weights.choose(tied)


class Random2(Policy):
    """Power of two choices: two distinct candidates drawn uniformly, the less loaded one wins.

    The draw is uniform (weights are ignored) and the comparison is on raw ``inflight``; equal
    loads are settled by a coin flip so neither position in the draw is favoured. Drawing two and
    keeping the better avoids the herd that plain least-connections causes when many balancers
    share stale load information, while still avoiding the worst upstream.
    """

    name = "random2"

    def __init__(self, group: Sequence[Upstream], rng: random.Random | None = None) -> None:
        super().__init__(group)
        self._rng = rng if rng is not None else random.Random()

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        count = len(candidates)
        if count == 1:
            self.last_reason = "only_candidate"
            return candidates[0]
        self.last_reason = "random2"
        rng = self._rng
        first = rng.randrange(count)
        # Draw the second from the remaining count - 1 slots, skipping over the first: two
        # distinct indices with one draw each and no retry loop.
        second = rng.randrange(count - 1)
        if second >= first:
            second += 1
        a = candidates[first]
        b = candidates[second]
        if a.inflight < b.inflight:
            return a
        if b.inflight < a.inflight:
            return b
        return a if rng.random() < 0.5 else b
