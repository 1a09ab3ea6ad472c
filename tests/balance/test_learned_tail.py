"""The learned policy and the client's tail, on a fake clock (issue 23): an upstream that is
usually fast and sometimes very slow loses its share within a few requests and keeps it low
while the network trains, and a healed one gets its share back."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from webtorch.balance.base import Outcome, Upstream
from webtorch.balance.learned import Learned
from webtorch.balance.settings import LearnedSettings
from webtorch.http.messages import Request

FAST = 0.010  # seconds: every upstream's usual answer
SLOW = 50 * FAST  # the intermittently slow upstream's bad answers
RATE = 200.0  # requests a second, Poisson


@dataclass
class Run:
    """What a simulated run did: per request, (send time, upstream index, seconds taken)."""

    requests: list[tuple[float, int, float]] = field(default_factory=list)

    def share(self, index: int, start: float, end: float) -> float:
        chosen = [i for t, i, _ in self.requests if start <= t < end]
        return chosen.count(index) / max(len(chosen), 1)

    def p99(self, start: float) -> float:
        took = sorted(s for t, _, s in self.requests if t >= start)
        return took[int(0.99 * len(took))]


def simulate(
    p: Learned,
    ups: list[Upstream],
    latency_of: Callable[[Upstream, float, random.Random], float],
    seconds: float,
    seed: int = 1,
) -> Run:
    """Open-loop Poisson arrivals through ``p``, answers after ``latency_of(upstream, now,
    rng)`` (no queueing: each upstream serves any number at once), outcomes reported in time
    order and ``maintain`` called four times a second, as the proxy does. All on a fake clock."""
    rng = random.Random(seed)
    run = Run()
    done: list[tuple[float, int, int, Request, float]] = []  # (when, seq, index, request, took)
    now, next_maintain, seq = 0.0, 0.25, 0
    while now < seconds:
        arrival = now + rng.expovariate(RATE)
        while done and done[0][0] <= arrival:
            when, _, index, request, took = heapq.heappop(done)
            ups[index].inflight -= 1
            p.observe(ups[index], Outcome.OK, took, when, request)
        while next_maintain <= arrival:
            p.maintain(next_maintain)
            next_maintain += 0.25
        now = arrival
        request = Request("GET", "/api/x", "", [], b"")
        upstream = p.pick(request, ups, now)
        upstream.inflight += 1
        took = latency_of(upstream, now, rng)
        run.requests.append((now, upstream.index, took))
        seq += 1
        heapq.heappush(done, (now + took, seq, upstream.index, request, took))
    return run


def learned(ups: list[Upstream], seed: int = 0) -> Learned:
    torch.manual_seed(seed)
    return Learned(ups, LearnedSettings(batch=32), rng=random.Random(7 + seed))


def group() -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(4)]


def test_an_intermittently_slow_upstream_loses_its_share_within_a_few_requests() -> None:
    """Upstream 3 answers 5% of its requests 50x slower than everyone's usual: its mean is 3.5x
    the others', its typical answer theirs. Every slow answer must cost it its share at once
    (within a few requests, not at the next training step), and the network, trained on the
    whole run, must not talk it back in: its share stays a small part of its fair 25%, and the
    client's p99 stays a fast answer."""
    ups = group()
    p = learned(ups)

    def latency_of(upstream: Upstream, now: float, rng: random.Random) -> float:
        slow = upstream.index == 3 and rng.random() < 0.05
        return (SLOW if slow else FAST) * rng.uniform(0.9, 1.1)

    run = simulate(p, ups, latency_of, 40.0)
    assert p.steps > 100  # the network trained on what it saw
    # Every slow request: while it is out (before its answer says anything), at most a few
    # more are sent to upstream 3 (a request out far longer than its estimate is evidence),
    # and once its answer is in, at most a probe's worth of the next 20.
    requests = run.requests
    slow = 0
    for n, (sent, index, took) in enumerate(requests):
        if index != 3 or took < SLOW / 2:
            continue
        slow += 1
        known = sent + took
        meanwhile = [i for t, i, _ in requests[n + 1 :] if t < known]
        assert meanwhile.count(3) <= 4, (sent, meanwhile.count(3), len(meanwhile))
        after = [i for t, i, _ in requests[n + 1 :] if t >= known][:20]
        assert after.count(3) <= 1, (sent, after)
    assert slow >= 5  # it was tried, and found slow, again and again (probes)
    # The last 20 s, trained: a small share, and the tail of a fast answer.
    assert run.share(3, 20.0, 40.0) < 0.08, run.share(3, 20.0, 40.0)
    assert run.p99(20.0) < 2 * FAST, run.p99(20.0)


@pytest.mark.parametrize("seed", range(8))
def test_a_healed_upstream_regains_its_share_within_seconds(seed: int) -> None:
    """Upstream 3 is slow (every answer 50x) for 10 s, then healed: it has its share back
    within a probe interval of healing (8 s at most; its last probe while slow may go out just
    before), the network's training notwithstanding, on every seed of the network's weights
    and of the policy's and the traffic's randomness. What the network learned of it by name
    during the spell goes when a probe refutes the estimate that kept it avoided (without that,
    on seeds 0-31 only 13 passed this test, the share in 22-30 s as low as 0.05)."""
    ups = group()
    p = learned(ups, seed)

    def latency_of(upstream: Upstream, now: float, rng: random.Random) -> float:
        sick = upstream.index == 3 and 2.0 <= now < 12.0
        return (SLOW if sick else FAST) * rng.uniform(0.9, 1.1)

    run = simulate(p, ups, latency_of, 30.0, seed=1 + seed)
    assert run.share(3, 6.0, 12.0) < 0.02  # avoided while slow
    # Back: some 4 s starting within 8 s of healing with over 0.15 (fair: 0.25), and after
    # that a share like a never-sick upstream's (theirs in 22-30 s: 0.11-0.4 over 32 seeds; the
    # least cost wins a pick, so alike upstreams' shares wander).
    back = [run.share(3, start, start + 4.0) for start in range(12, 21)]
    assert max(back) > 0.15, back
    assert run.share(3, 22.0, 30.0) > 0.12, (back, run.share(3, 22.0, 30.0))


def test_a_request_out_long_makes_its_upstream_costly_until_answered_or_gone() -> None:
    """The in-flight evidence: an unkeyed request out far longer than its upstream's estimate
    raises that upstream's predicted cost while it is out; its answer ends that, and so does an
    attempt that ends unobserved (the proxy's in-flight count drops: a client that left)."""
    ups = group()[:2]
    p = learned(ups)
    for u in ups:
        p.observe(u, Outcome.OK, FAST, 0.0)
    stuck = Request("GET", "/api/x", "", [], b"")
    chosen = p.pick(stuck, ups, 0.0)
    chosen.inflight += 1
    other = ups[1 - chosen.index]
    probe = Request("GET", "/api/x", "", [], b"")
    assert p.predict(probe, [chosen], 0.005)[0][0] < 3 * FAST
    costs = p.predict(probe, [chosen, other], 0.3)
    assert costs[0][0] >= 0.3 and costs[1][0] < 3 * FAST, costs
    assert p.pick(probe, ups, 0.3) is other  # the other, while it is out
    # Its attempt ends unobserved while a new one is out: the new one's age counts, not its.
    chosen.inflight -= 1
    fresh = Request("GET", "/api/x", "", [], b"")
    assert p.pick(fresh, [chosen], 0.29) is chosen
    chosen.inflight += 1
    assert p.predict(probe, [chosen], 0.3)[0][0] < 3 * FAST
