"""Round robin, least connections and two random choices, with a fake clock (a float)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from webtorch.balance.base import Policy, Upstream
from webtorch.balance.classic import LeastConn, Random2, RoundRobin
from webtorch.balance.hashing import BoundedLoadHash
from webtorch.balance.registry import POLICIES, make_policy
from webtorch.balance.settings import LearnedSettings, PrequalSettings
from webtorch.http.messages import Request

NOW = 1000.0
REQUEST = Request("GET", "/", "", [], b"")


def group(*weights: int) -> list[Upstream]:
    return [
        Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, weight=w, index=i)
        for i, w in enumerate(weights)
    ]


def names(policy: Policy, candidates: Sequence[Upstream], count: int) -> str:
    """The picks as letters: upstream 0 is "a", 1 is "b"..."""
    return "".join(
        chr(ord("a") + policy.pick(REQUEST, candidates, NOW).index) for _ in range(count)
    )


# --- round robin -------------------------------------------------------------------------------


def test_swrr_matches_nginx_sequence() -> None:
    # The sequence documented in ngx_http_upstream_round_robin.c for weights 5, 1, 1.
    ups = group(5, 1, 1)
    policy = RoundRobin(ups)
    assert names(policy, ups, 7) == "aabacaa"
    assert names(policy, ups, 7) == "aabacaa"  # and it repeats, the state back at zero


def test_swrr_respects_weights_in_every_cycle() -> None:
    ups = group(3, 2, 1)
    policy = RoundRobin(ups)
    for _ in range(100):
        cycle = Counter(names(policy, ups, 6))
        assert cycle == {"a": 3, "b": 2, "c": 1}


def test_swrr_uses_slow_start_factor() -> None:
    ups = group(2, 1)
    ups[0].weight_factor = 0.5  # ramping up: counts as weight 1 for now
    policy = RoundRobin(ups)
    assert Counter(names(policy, ups, 100)) == {"a": 50, "b": 50}
    ups[0].weight_factor = 1.0
    assert Counter(names(policy, ups, 300)) == {"a": 200, "b": 100}


def test_swrr_candidate_set_changes() -> None:
    ups = group(1, 1, 1)
    a, _, c = ups
    policy = RoundRobin(ups)
    assert names(policy, ups, 3) == "abc"
    # b is out (ejected, or already tried by this request): the others share, b's state is kept.
    picks = names(policy, [a, c], 10)
    assert set(picks) == {"a", "c"}
    assert Counter(picks) == {"a": 5, "c": 5}
    # Back in, b is not flooded to "catch up": the rotation goes on evenly from here.
    assert Counter(names(policy, ups, 300)) == {"a": 100, "b": 100, "c": 100}


def test_swrr_random_subsets_never_pick_outside_and_stay_fair() -> None:
    ups = group(2, 1, 1, 1)
    policy = RoundRobin(ups)
    rng = random.Random(7)
    for _ in range(500):
        subset = [u for u in ups if rng.random() < 0.7] or [ups[1]]
        assert policy.pick(REQUEST, subset, NOW) in subset
    # After any history the full set settles on the weights within a few cycles.
    names(policy, ups, 50)
    assert Counter(names(policy, ups, 500)) == {"a": 200, "b": 100, "c": 100, "d": 100}


def test_round_robin_single_candidate() -> None:
    ups = group(1, 1)
    policy = RoundRobin(ups)
    assert policy.pick(REQUEST, [ups[1]], NOW) is ups[1]


# --- least connections -------------------------------------------------------------------------


def test_least_conn_prefers_fewer_inflight() -> None:
    ups = group(1, 1, 1)
    for u, n in zip(ups, (3, 1, 2), strict=True):
        u.inflight = n
    assert LeastConn(ups).pick(REQUEST, ups, NOW) is ups[1]


def test_least_conn_divides_by_weight() -> None:
    ups = group(3, 1)
    ups[0].inflight = 2  # 2/3 per unit of weight
    ups[1].inflight = 1  # 1/1
    assert LeastConn(ups).pick(REQUEST, ups, NOW) is ups[0]
    ups[0].weight_factor = 0.5  # slow start: 2/1.5 > 1/1
    assert LeastConn(ups).pick(REQUEST, ups, NOW) is ups[1]


def test_least_conn_ties_go_by_smooth_weighted_round_robin() -> None:
    ups = group(5, 1, 1)
    policy = LeastConn(ups)
    assert names(policy, ups, 7) == "aabacaa"  # all idle: exactly round robin
    ups[2].inflight = 1
    assert set(names(policy, ups, 12)) == {"a", "b"}  # only the tied least loaded take turns


def test_least_conn_load_follows_weights() -> None:
    ups = group(3, 1)
    policy = LeastConn(ups)
    for _ in range(400):  # requests that never finish: the load must split 3:1
        policy.pick(REQUEST, ups, NOW).inflight += 1
    assert [u.inflight for u in ups] == [300, 100]


# --- two random choices ------------------------------------------------------------------------


def test_random2_never_picks_more_loaded_of_two() -> None:
    ups = group(1, 1)
    ups[0].inflight = 5
    ups[1].inflight = 4
    policy = Random2(ups, rng=random.Random(1))
    assert all(policy.pick(REQUEST, ups, NOW) is ups[1] for _ in range(200))


def test_random2_never_picks_the_most_loaded() -> None:
    ups = group(1, 1, 1, 1, 1)
    for i, u in enumerate(ups):
        u.inflight = i
    policy = Random2(ups, rng=random.Random(2))
    counts = Counter(policy.pick(REQUEST, ups, NOW).index for _ in range(2000))
    assert 4 not in counts
    # The least loaded wins every pair it is in (4 of the 10 pairs), the next 3 of 10...
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0


def test_random2_ties_are_random_and_draws_distinct() -> None:
    ups = group(1, 1, 1)
    policy = Random2(ups, rng=random.Random(3))
    counts = Counter(policy.pick(REQUEST, ups, NOW).index for _ in range(3000))
    assert all(900 < counts[i] < 1100 for i in range(3))
    # Two candidates, equal load: both win about half of the coin flips.
    counts = Counter(policy.pick(REQUEST, ups[:2], NOW).index for _ in range(1000))
    assert 400 < counts[0] < 600


def test_random2_is_deterministic_with_injected_rng() -> None:
    ups = group(1, 1, 1, 1)
    first = names(Random2(ups, rng=random.Random(9)), ups, 50)
    assert names(Random2(ups, rng=random.Random(9)), ups, 50) == first


def test_random2_single_candidate() -> None:
    ups = group(1, 1)
    assert Random2(ups, rng=random.Random(0)).pick(REQUEST, [ups[0]], NOW) is ups[0]


# --- registry ----------------------------------------------------------------------------------


def test_registry_builds_each_policy() -> None:
    ups = group(1, 1)
    assert set(POLICIES) >= {"round_robin", "least_conn", "random2", "hash"}
    assert isinstance(make_policy("round_robin", ups), RoundRobin)
    assert isinstance(make_policy("least_conn", ups), LeastConn)
    assert isinstance(make_policy("random2", ups, rng=random.Random(0)), Random2)
    policy = make_policy("hash", ups, hash_key="header:x-model", balance=0.5)
    assert isinstance(policy, BoundedLoadHash)
    assert policy.balance == 0.5
    for name in POLICIES:
        built = make_policy(name, ups, hash_key="client_ip")
        assert built.name == name
        assert built.pick(REQUEST, ups, NOW) in ups


def test_registry_errors_name_the_problem() -> None:
    ups = group(1)
    with pytest.raises(ValueError, match="unknown balancing policy 'fastest'"):
        make_policy("fastest", ups)
    with pytest.raises(ValueError, match="hash_key"):
        make_policy("hash", ups)
    with pytest.raises(ValueError, match="unknown kind"):
        make_policy("hash", ups, hash_key="body:x")
    with pytest.raises(ValueError, match="balance"):
        make_policy("hash", ups, hash_key="client_ip", balance=-1.0)
    # A policy takes its own settings class, typed: another policy's is a mistake, not ignored.
    with pytest.raises(TypeError, match="'peak_ewma' takes PeakEwmaSettings, not PrequalSettings"):
        make_policy("peak_ewma", ups, settings=PrequalSettings())
    with pytest.raises(TypeError, match="'peak_ewma' takes PeakEwmaSettings, not LearnedSettings"):
        make_policy("peak_ewma", ups, settings=LearnedSettings())
