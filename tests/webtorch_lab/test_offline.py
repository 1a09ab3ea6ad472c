"""Policies against the lab's upstream model on a fake clock (offline.py): what they decide,
deterministically and in well under a second per simulated run."""

from __future__ import annotations

import random

import pytest
import torch

from webtorch.balance.base import Policy, Upstream
from webtorch.balance.classic import LeastConn
from webtorch.balance.learned import Learned
from webtorch.balance.prequal import Prequal
from webtorch_lab.model import ServiceTime, UpstreamModel, UpstreamParams
from webtorch_lab.offline import OfflineResult, run_offline
from webtorch_lab.schedule import KeyChooser, LoadShape, plan


def model_affinity(policy_name: str, seed: int) -> OfflineResult:
    """The shipped model-affinity scenario: 20 models, Zipf popularity, 4 upstreams of 4 slots
    that keep 8 models loaded each; a model not loaded costs 200 ms first."""
    ups = [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(4)]
    params = UpstreamParams(
        "gpu",
        slots=4,
        service=ServiceTime("lognormal", 0.010, 0.030),
        cold_penalty=0.2,
        max_warm=8,
    )
    models = [UpstreamModel(params, random.Random(f"{seed}:{i}")) for i in range(4)]
    load = plan(LoadShape(150.0, 8.0, warmup=1.0), seed, keys=KeyChooser(20, 1.0))
    rng = random.Random(seed)
    torch.manual_seed(seed)  # the learned policy's hidden layer: the same run every time
    policy = (
        Learned(ups, hash_key="header:x-key", rng=rng)
        if policy_name == "learned"
        else LeastConn(ups)
    )
    return run_offline(policy, ups, models, load)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_keeps_models_where_they_are_loaded_within_balanced_loads(seed: int) -> None:
    result = model_affinity("learned", seed)
    assert result.requests > 1000
    # Load-only balancing pays a cold load on about a third of the requests (below); the
    # learned policy settles every model somewhere within the first second or two.
    assert result.cold_rate < 0.02, result.cold_rate
    # ...while no upstream takes more than (1 + key_balance) x its fair share.
    assert max(result.shares) <= 1.2 * 0.25 + 0.01, result.shares


def test_load_only_balancing_scatters_the_models() -> None:
    result = model_affinity("least_conn", 0)
    assert result.cold_rate > 0.2, result.cold_rate
    assert result.percentile(0.99) > 0.2  # a model load in the tail


def capacity_1_2_4(policy: Policy) -> OfflineResult:
    """Three upstreams alike but for their slots (4, 8, 16) at 70% of their total capacity."""
    params = [
        UpstreamParams(f"x{k}", slots=4 * k, service=ServiceTime("lognormal", 0.020, 0.060))
        for k in (1, 2, 4)
    ]
    ups = [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(3)]
    models = [UpstreamModel(p, random.Random(f"0:{i}")) for i, p in enumerate(params)]
    load = plan(LoadShape(0.7 * sum(p.capacity for p in params), 8.0, warmup=0.5), 0)
    return run_offline(policy, ups, models, load)


def test_prequal_counts_every_request_sent_since_a_probe() -> None:
    # Several pooled results of the same fast upstream used to be priced at their own reported
    # in-flight count each: a herd onto the biggest upstream (p99 ~5.7x least_conn's here).
    ups = [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(3)]
    prequal = capacity_1_2_4(Prequal(ups, rng=random.Random(0)))
    least = capacity_1_2_4(LeastConn(ups))
    assert prequal.percentile(0.99) < 3 * least.percentile(0.99), (
        prequal.percentile(0.99),
        least.percentile(0.99),
    )
