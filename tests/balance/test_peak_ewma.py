"""Peak-EWMA with a fake clock (a float) and a seeded rng: peaks, decay, failures, start-up."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import pytest

from webtorch.balance.base import Outcome, Upstream
from webtorch.balance.peak_ewma import (
    FAILURE_CEILING,
    LatencyEstimate,
    PeakEwma,
    failure_latency,
)
from webtorch.balance.registry import make_policy
from webtorch.balance.settings import PeakEwmaSettings
from webtorch.http.messages import Request

REQUEST = Request("GET", "/", "", [], b"")
STEP = 0.01  # seconds between two requests in the simulations


def group(count: int) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(count)]


def simulate(
    policy: PeakEwma,
    ups: list[Upstream],
    start: float,
    steps: int,
    latency: Callable[[Upstream, float], float],
    outcome: Callable[[Upstream, float], Outcome] = lambda u, t: Outcome.OK,
) -> list[int]:
    """One request every STEP seconds, each answered before the next (no overlap): the index
    picked each time."""
    picks = []
    for i in range(steps):
        now = start + i * STEP
        up = policy.pick(REQUEST, ups, now)
        took = latency(up, now)
        policy.observe(up, outcome(up, now), took, now + took, REQUEST)
        picks.append(up.index)
    return picks


# --- the estimate ------------------------------------------------------------------------------


def test_first_observation_replaces_the_guess_then_peaks_count_at_once() -> None:
    est = LatencyEstimate(1.0, decay_time=10.0)
    assert est.get(0.0) == 1.0  # pessimistic until measured
    est.observe(0.010, 0.0)
    assert est.get(0.0) == 0.010
    est.observe(0.200, 0.001)
    assert est.get(0.001) == 0.200  # the peak, in full, at once


def test_estimate_decays_toward_zero_and_faster_answers_pull_it_down() -> None:
    est = LatencyEstimate(1.0, decay_time=10.0)
    est.observe(0.2, 0.0)
    assert est.get(10.0) == pytest.approx(0.2 / math.e)
    assert est.get(20.0) == pytest.approx(0.2 / math.e**2)
    # Below the current estimate: moves toward the observation, stays between the two.
    est.observe(0.01, 10.0)
    after = est.get(10.0)
    assert 0.01 < after < 0.2 / math.e
    # A long silence: the new observation is nearly all that counts.
    est.observe(0.005, 1000.0)
    assert est.get(1000.0) == pytest.approx(0.005, rel=1e-6)


def test_failure_latency_is_a_penalty_never_a_reward() -> None:
    # A fast failure of an upstream estimated at 10 ms counts as at least initial_latency.
    assert failure_latency(0.010, 0.001, 1.0) == 1.0
    # Repeated failures double the estimate, up to the ceiling...
    assert failure_latency(3.0, 0.001, 1.0) == 6.0
    assert failure_latency(20.0, 0.001, 1.0) == FAILURE_CEILING * 1.0
    # ...and never lower it, nor count less than the failure took.
    assert failure_latency(100.0, 0.001, 1.0) == 100.0
    assert failure_latency(0.0, 60.0, 1.0) == 60.0


# --- picks ---------------------------------------------------------------------------------------


def test_cost_multiplies_latency_by_inflight_and_divides_by_weight() -> None:
    ups = group(2)
    policy = PeakEwma(ups, rng=random.Random(1))
    policy.observe(ups[0], Outcome.OK, 0.1, 0.0)
    ups[0].inflight = 3
    assert policy.cost(ups[0], 0.0) == pytest.approx(0.4)
    ups[0].weight_factor = 0.5  # in slow start: counts as costlier
    assert policy.cost(ups[0], 0.0) == pytest.approx(0.8)


def test_two_distinct_choices_and_the_cheaper_wins() -> None:
    ups = group(2)
    policy = PeakEwma(ups, rng=random.Random(2))
    policy.observe(ups[0], Outcome.OK, 0.05, 0.0)
    policy.observe(ups[1], Outcome.OK, 0.01, 0.0)
    # Two candidates: both are always drawn (distinct), so the cheaper one always wins.
    assert {policy.pick(REQUEST, ups, 0.0).index for _ in range(200)} == {1}
    # One candidate: it, whatever its cost.
    assert policy.pick(REQUEST, [ups[0]], 0.0) is ups[0]


def test_only_candidates_are_picked() -> None:
    ups = group(5)
    policy = PeakEwma(ups, rng=random.Random(3))
    policy.observe(ups[4], Outcome.OK, 0.0001, 0.0)  # the cheapest, but never a candidate
    rng = random.Random(4)
    for _ in range(500):
        candidates = sorted(rng.sample(ups[:4], rng.randint(1, 4)), key=lambda u: u.index)
        assert policy.pick(REQUEST, candidates, 0.0) in candidates


def test_equal_costs_spread_evenly() -> None:
    ups = group(3)
    policy = PeakEwma(ups, rng=random.Random(5))
    counts = Counter(policy.pick(REQUEST, ups, 0.0).index for _ in range(3000))
    assert all(900 < counts[i] < 1100 for i in range(3))


def test_traffic_leaves_an_upstream_that_slows_down_after_one_slow_answer() -> None:
    ups = group(3)
    policy = PeakEwma(ups, PeakEwmaSettings(decay_time=10.0), rng=random.Random(6))
    slow_from = 2.0

    def latency(up: Upstream, now: float) -> float:
        return 0.200 if up.index == 1 and now >= slow_from else 0.010

    before = simulate(policy, ups, 0.0, 200, latency)
    assert Counter(before)[1] > 40  # a fair share while it was fast
    after = simulate(policy, ups, slow_from, 500, latency)
    # N = 1: after the first slow answer it gets only probes in the next 5 seconds, 1, 2 and
    # 4 s apart (each answered slow, doubling the interval).
    assert Counter(after)[1] <= 3


def test_an_upstream_recovers_within_seconds() -> None:
    ups = group(3)
    policy = PeakEwma(ups, PeakEwmaSettings(decay_time=10.0), rng=random.Random(7))
    simulate(policy, ups, 0.0, 200, lambda u, t: 0.010)
    # One slow answer (200 ms, 20x the others), then it is fast again.
    policy.observe(ups[1], Outcome.OK, 0.200, 2.0)
    first = simulate(policy, ups, 2.0, 90, lambda u, t: 0.010)
    assert Counter(first)[1] == 0  # avoided: the peak counts in full
    # Its fading peak alone would take ln(20) x decay_time = 30 s; a probe after a second
    # finds it fast and it has its share back at once.
    soon = simulate(policy, ups, 3.0, 300, lambda u, t: 0.010)
    assert Counter(soon)[1] > 70, Counter(soon)  # about a third of 300
    assert policy.estimate(ups[1]).get(3.5) < 0.02


def test_a_probe_goes_out_only_to_an_idle_upstream_and_backs_off() -> None:
    ups = group(2)
    policy = PeakEwma(ups, PeakEwmaSettings(decay_time=10.0), rng=random.Random(3))
    policy.observe(ups[0], Outcome.OK, 0.010, 0.0)
    policy.observe(ups[1], Outcome.OK, 2.0, 0.0)
    policy.observe(ups[0], Outcome.OK, 0.010, 1.0)
    assert policy.pick(REQUEST, ups, 0.9) is ups[0]  # not due yet
    assert policy.pick(REQUEST, ups, 1.0) is ups[1]
    assert policy.last_reason == "peak_ewma_probe"
    ups[1].inflight = 1  # the probe is out: no second one meanwhile
    assert {policy.pick(REQUEST, ups, 1.5).index for _ in range(50)} == {0}
    ups[1].inflight = 0
    policy.observe(ups[1], Outcome.TIMEOUT, 1.0, 2.0)  # still broken: the next waits 2 s
    policy.observe(ups[0], Outcome.OK, 0.010, 3.9)
    assert {policy.pick(REQUEST, ups, 3.9).index for _ in range(50)} == {0}
    assert policy.pick(REQUEST, ups, 4.0) is ups[1]


def test_a_fast_failing_upstream_does_not_attract_traffic() -> None:
    ups = group(3)
    policy = PeakEwma(
        ups, PeakEwmaSettings(decay_time=10.0, initial_latency=1.0), rng=random.Random(8)
    )

    def latency(up: Upstream, now: float) -> float:
        return 0.001 if up.index == 2 else 0.020  # it fails 20x faster than the others answer

    def outcome(up: Upstream, now: float) -> Outcome:
        return Outcome.CONNECT_FAILED if up.index == 2 else Outcome.OK

    picks = simulate(policy, ups, 0.0, 6000, latency, outcome)  # 60 s
    # Tried again only by probes, 1, 2, 4 then 8 s apart: about a dozen requests of 6000.
    assert Counter(picks)[2] <= 12


def test_cancelled_attempts_are_ignored() -> None:
    ups = group(2)
    policy = PeakEwma(ups, rng=random.Random(9))
    policy.observe(ups[0], Outcome.OK, 0.01, 0.0)
    policy.observe(ups[0], Outcome.CANCELLED, 5.0, 0.0)
    assert policy.estimate(ups[0]).get(0.0) == 0.01


def test_new_upstreams_start_pessimistic() -> None:
    ups = group(2)
    policy = PeakEwma(ups, PeakEwmaSettings(initial_latency=1.0), rng=random.Random(10))
    policy.observe(ups[0], Outcome.OK, 0.010, 0.0)
    # Never measured and idle: free, so it gets a first request to be measured by...
    assert policy.cost(ups[1], 0.1) == 0.0
    assert policy.pick(REQUEST, ups, 0.1) is ups[1]
    ups[1].inflight = 1
    # ...and from then on each request in flight to it costs initial_latency: it is not
    # flooded before it has answered once (10 ms x 1 < 1 s x 2).
    assert policy.cost(ups[1], 0.1) == 1.0
    assert {policy.pick(REQUEST, ups, 0.1).index for _ in range(100)} == {0}
    # Only a queue 100 deep makes the measured one costlier than an unknown with one request.
    ups[0].inflight = 150
    assert policy.pick(REQUEST, ups, 0.1) is ups[1]
    ups[0].inflight = 0
    # The guess does not decay: a first request that hangs keeps it pessimistic.
    assert policy.cost(ups[1], 1000.0) == 1.0
    # Its first answer replaces the guess outright.
    policy.observe(ups[1], Outcome.OK, 0.005, 1000.0)
    ups[1].inflight = 0
    assert policy.estimate(ups[1]).get(1000.0) == 0.005


def test_a_new_upstream_that_fails_gets_one_request_then_a_penalty() -> None:
    ups = group(2)
    policy = PeakEwma(ups, PeakEwmaSettings(initial_latency=1.0), rng=random.Random(12))
    policy.observe(ups[0], Outcome.OK, 0.010, 0.0)
    assert policy.pick(REQUEST, ups, 0.0) is ups[1]
    policy.observe(ups[1], Outcome.CONNECT_FAILED, 0.0001, 0.0)
    assert policy.estimate(ups[1]).get(0.0) == 2.0  # twice the guess, not 0.1 ms
    assert {policy.pick(REQUEST, ups, 0.5).index for _ in range(100)} == {0}


def test_registry_builds_it_from_its_settings() -> None:
    ups = group(2)
    policy = make_policy(
        "peak_ewma",
        ups,
        rng=random.Random(11),
        settings=PeakEwmaSettings(decay_time=2.5, initial_latency=0.25),
    )
    assert isinstance(policy, PeakEwma)
    assert policy.learns and not policy.probing
    assert (policy.decay_time, policy.initial_latency) == (2.5, 0.25)
    default = make_policy("peak_ewma", ups)
    assert isinstance(default, PeakEwma)
    assert (default.decay_time, default.initial_latency) == (10.0, 1.0)
    with pytest.raises(ValueError, match="decay_time"):
        PeakEwmaSettings(decay_time=0.0)
