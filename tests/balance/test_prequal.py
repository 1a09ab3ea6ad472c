"""Prequal with a fake clock (a float) and a seeded rng: the hot-cold rule on crafted pools, the
pool's age and reuse limits, the fallback without probes, and the probe rate."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from webtorch.balance.base import Outcome, ProbeResult, Upstream
from webtorch.balance.prequal import PROBE_BACKOFF_MAX, Prequal, hot_threshold
from webtorch.balance.registry import make_policy
from webtorch.balance.settings import PrequalSettings
from webtorch.http.messages import Request

REQUEST = Request("GET", "/", "", [], b"")


def group(count: int) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(count)]


def prequal(ups: list[Upstream], seed: int = 0, **settings: float) -> Prequal:
    # No probes asked for unless a test wants them: picks then leave the rng to the pick.
    settings.setdefault("probes_per_request", 0.0)
    return Prequal(ups, PrequalSettings(**settings), rng=random.Random(seed))  # type: ignore[arg-type]


def fill(policy: Prequal, ups: list[Upstream], loads: list[tuple[int, float]], now: float) -> None:
    """One probe result per upstream: (inflight, latency)."""
    for up, (inflight, latency) in zip(ups, loads, strict=True):
        policy.on_probe(up, ProbeResult(inflight, latency), now)


# --- the hot-cold lexicographic rule -------------------------------------------------------------


def test_hot_threshold_interpolates_between_order_statistics() -> None:
    assert hot_threshold([1, 50], 0.84) == pytest.approx(42.16)
    assert hot_threshold([5], 0.84) == 5  # alone, nothing is above itself
    assert hot_threshold([4, 1, 3, 2, 40], 0.5) == 3
    assert hot_threshold([1, 2, 3, 40], 0.84) == pytest.approx(3 + 0.52 * 37)


def test_cold_upstreams_compete_on_latency_and_hot_ones_are_avoided() -> None:
    ups = group(4)
    policy = prequal(ups)
    # Threshold over (2, 3, 40, 1) at 0.84: 22.24. Upstream 2 is the fastest but hot.
    fill(policy, ups, [(2, 0.050), (3, 0.020), (40, 0.001), (1, 0.090)], 0.0)
    assert policy.pick(REQUEST, ups, 0.0) is ups[1]  # the fastest cold one


def test_equal_latencies_fall_to_the_fewest_in_flight() -> None:
    ups = group(3)
    policy = prequal(ups)
    fill(policy, ups, [(7, 0.010), (2, 0.010), (5, 0.010)], 0.0)
    assert policy.pick(REQUEST, ups, 0.0) is ups[1]


def test_when_every_candidate_is_hot_the_fewest_in_flight_wins() -> None:
    ups = group(12)
    policy = prequal(ups)
    # Ten idle servers and two busy ones: the threshold (30.8) makes both busy ones hot.
    fill(policy, ups, [(0, 0.5)] * 10 + [(50, 0.0001), (40, 0.001)], 0.0)
    busy = [ups[10], ups[11]]
    assert policy.pick(REQUEST, busy, 0.0) is ups[11]  # 40 in flight, despite being slower


def test_each_pick_from_a_probe_counts_one_more_in_flight() -> None:
    ups = group(2)
    policy = prequal(ups, max_reuse=10)
    fill(policy, ups, [(0, 0.010), (3, 0.010)], 0.0)
    picks = [policy.pick(REQUEST, ups, 0.0).index for _ in range(6)]
    # 0 takes requests until its count (grown by this proxy's picks) passes the other's.
    assert picks[:4] == [0, 0, 0, 0]
    assert 1 in picks


# --- the pool: age, reuse, size ----------------------------------------------------------------


def test_a_probe_serves_at_most_max_reuse_picks() -> None:
    ups = group(5)
    policy = prequal(ups, max_reuse=3)
    fill(policy, ups, [(0, 0.001)] + [(10, 0.050)] * 4, 0.0)
    assert [policy.pick(REQUEST, ups, 0.0).index for _ in range(3)] == [0, 0, 0]
    assert all(p.upstream is not ups[0] for p in policy.pool)  # used up: gone
    assert policy.pick(REQUEST, ups, 0.0) is not ups[0]


def test_probes_older_than_max_age_are_not_used() -> None:
    ups = group(2)
    policy = prequal(ups, max_age=1.0)
    fill(policy, ups, [(0, 0.001), (30, 0.5)], 0.0)
    for up in ups:
        policy.observe(up, Outcome.OK, 0.010, 0.0)
    ups[0].inflight = 10  # what this proxy sees now: 0 is busy
    assert policy.pick(REQUEST, ups, 1.0) is ups[0]  # still fresh: the probe says idle
    assert policy.pick(REQUEST, ups, 1.5) is ups[1]  # aged out: the proxy's own view decides
    assert policy.pool == []
    # maintain() clears aged results without a pick.
    fill(policy, ups, [(0, 0.001), (0, 0.001)], 2.0)
    policy.maintain(3.5)
    assert policy.pool == []


def test_the_pool_keeps_the_newest_pool_size_results() -> None:
    ups = group(6)
    policy = prequal(ups, pool_size=4)
    for i, up in enumerate(ups):
        policy.on_probe(up, ProbeResult(i, 0.01), float(i) * 0.01)
    assert [p.upstream.index for p in policy.pool] == [2, 3, 4, 5]


def test_an_upstream_probed_twice_has_two_results() -> None:
    ups = group(2)
    policy = prequal(ups, max_reuse=1)
    policy.on_probe(ups[0], ProbeResult(0, 0.01), 0.0)
    policy.on_probe(ups[0], ProbeResult(1, 0.01), 0.1)
    policy.on_probe(ups[1], ProbeResult(5, 0.01), 0.1)
    assert [policy.pick(REQUEST, ups, 0.2).index for _ in range(3)] == [0, 0, 1]


def test_a_failed_probe_or_attempt_drops_the_upstreams_results() -> None:
    ups = group(3)
    policy = prequal(ups)
    fill(policy, ups, [(0, 0.001), (5, 0.01), (5, 0.01)], 0.0)
    policy.on_probe(ups[0], None, 0.1)
    assert all(p.upstream is not ups[0] for p in policy.pool)
    fill(policy, ups, [(0, 0.001), (5, 0.01), (5, 0.01)], 0.2)
    # It reports itself idle and fast, but fails requests: its report is not trusted.
    policy.observe(ups[0], Outcome.SERVER_ERROR, 0.001, 0.3)
    assert all(p.upstream is not ups[0] for p in policy.pool)
    assert policy.pick(REQUEST, ups, 0.3) is not ups[0]


# --- only candidates, and the fallback without probes ------------------------------------------


def test_only_candidates_are_ever_picked() -> None:
    ups = group(8)
    policy = prequal(ups, seed=1, probes_per_request=1.0)
    rng = random.Random(2)
    now = 0.0
    for _ in range(2000):
        now += 0.01
        if rng.random() < 0.5:
            up = rng.choice(ups)
            policy.on_probe(up, ProbeResult(rng.randrange(20), rng.random() / 10), now)
        candidates = sorted(rng.sample(ups, rng.randint(1, 8)), key=lambda u: u.index)
        picked = policy.pick(REQUEST, candidates, now)
        assert picked in candidates
        assert set(policy.probes(now)) <= set(candidates)


def test_without_probes_the_proxys_own_view_decides() -> None:
    ups = group(3)
    policy = prequal(ups)
    # Never observed: all count as fast and idle, so each gets tried (ties spread).
    first = Counter(policy.pick(REQUEST, ups, 0.0).index for _ in range(300))
    assert all(count > 60 for count in first.values())
    for up, took in zip(ups, (0.050, 0.010, 0.030), strict=True):
        policy.observe(up, Outcome.OK, took, 0.0)
    assert policy.pick(REQUEST, ups, 0.0) is ups[1]  # all idle: the fastest
    ups[1].inflight = 8  # hot among (0, 8, 0): threshold 5.44
    assert policy.pick(REQUEST, ups, 0.0) is ups[2]
    ups[0].inflight = ups[2].inflight = 8
    ups[1].inflight = 9  # (8, 9, 8): threshold 8.68, 1 is hot; 2 is the fastest cold one
    assert policy.pick(REQUEST, ups, 0.0) is ups[2]


def test_fallback_penalises_fast_failures() -> None:
    ups = group(2)
    policy = prequal(ups)
    policy.observe(ups[0], Outcome.OK, 0.050, 0.0)
    policy.observe(ups[1], Outcome.CONNECT_FAILED, 0.0001, 0.0)
    assert {policy.pick(REQUEST, ups, 0.1).index for _ in range(50)} == {0}


def test_a_probe_for_a_non_candidate_does_not_stop_the_fallback() -> None:
    ups = group(3)
    policy = prequal(ups)
    policy.on_probe(ups[2], ProbeResult(0, 0.0001), 0.0)
    policy.observe(ups[0], Outcome.OK, 0.050, 0.0)
    policy.observe(ups[1], Outcome.OK, 0.010, 0.0)
    assert policy.pick(REQUEST, ups[:2], 0.0) is ups[1]


# --- probes asked for --------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "expected"), [(0.0, 0), (0.25, 50), (1.0, 200), (3.0, 600)])
def test_probes_are_asked_at_the_configured_rate(rate: float, expected: int) -> None:
    ups = group(5)
    policy = prequal(ups, seed=3, probes_per_request=rate)
    asked: Counter[int] = Counter()
    for i in range(200):
        policy.pick(REQUEST, ups, i * 0.001)
        due = policy.probes(i * 0.001)
        assert len(set(due)) == len(due)  # distinct within a pick
        asked.update(u.index for u in due)
    assert sum(asked.values()) == expected
    if expected:
        # Spread at random over the candidates.
        assert all(asked[i] > expected / 5 * 0.5 for i in range(5))
    assert policy.probes(1.0) == ()


def test_probes_go_to_candidates_and_at_most_one_per_candidate_per_pick() -> None:
    ups = group(4)
    policy = prequal(ups, probes_per_request=3.0)
    policy.pick(REQUEST, ups[:2], 0.0)
    assert sorted(u.index for u in policy.probes(0.0)) == [0, 1]


def test_an_upstream_whose_probes_fail_is_probed_with_a_back_off() -> None:
    ups = group(2)
    policy = prequal(ups, probes_per_request=2.0, max_age=1.0)

    def asked(now: float) -> set[int]:
        policy.pick(REQUEST, ups, now)
        return {u.index for u in policy.probes(now)}

    assert asked(0.0) == {0, 1}
    policy.on_probe(ups[1], None, 0.0)  # 1 s back-off
    assert asked(0.5) == {0}
    assert asked(1.0) == {0, 1}
    policy.on_probe(ups[1], None, 1.0)  # 2 s
    assert asked(2.5) == {0}
    assert asked(3.0) == {0, 1}
    for _ in range(10):
        policy.on_probe(ups[1], None, 3.0)
    assert asked(3.0 + PROBE_BACKOFF_MAX - 0.1) == {0}
    assert asked(3.0 + PROBE_BACKOFF_MAX) == {0, 1}
    policy.on_probe(ups[1], ProbeResult(0, 0.01), 40.0)  # it answers: back to normal
    policy.on_probe(ups[1], None, 40.0)
    assert asked(41.0) == {0, 1}


def test_registry_builds_it_from_its_settings() -> None:
    ups = group(2)
    policy = make_policy(
        "prequal",
        ups,
        rng=random.Random(4),
        settings=PrequalSettings(
            probe_path="/load",
            probes_per_request=2.0,
            pool_size=8,
            max_age=0.5,
            max_reuse=2,
            hot_quantile=0.9,
            probe_timeout=0.1,
        ),
    )
    assert isinstance(policy, Prequal)
    assert policy.probing and policy.learns
    assert (policy.probes_per_request, policy.pool_size, policy.max_age) == (2.0, 8, 0.5)
    assert (policy.max_reuse, policy.hot_quantile) == (2, 0.9)
    assert isinstance(make_policy("prequal", ups), Prequal)
    with pytest.raises(ValueError, match="hot_quantile"):
        PrequalSettings(hot_quantile=1.0)
