"""The scenario families (families.py) and the offline simulator's client timeout."""

from __future__ import annotations

import random

import pytest

from webtorch.balance.base import Upstream
from webtorch.balance.classic import RoundRobin
from webtorch_lab.families import (
    FAMILIES,
    HELD_OUT_FAMILIES,
    HELD_OUT_SEED,
    TUNING,
    make_case,
    split,
)
from webtorch_lab.model import (
    Fault,
    FaultSchedule,
    Respond,
    ServiceTime,
    UpstreamModel,
    UpstreamParams,
)
from webtorch_lab.offline import run_offline
from webtorch_lab.schedule import LoadShape, plan


def test_a_family_and_seed_name_one_case_and_seeds_differ() -> None:
    for family in FAMILIES:
        a, b = make_case(family, 3), make_case(family, 3)
        assert a.note == b.note and a.load == b.load and a.upstreams == b.upstreams
        assert make_case(family, 4).note != a.note
        assert len(a.upstreams) == 4 and len(a.load) > 1000


def test_the_held_out_split_shares_no_case_and_two_families_with_tuning() -> None:
    tuning, held = set(split(5, held_out=False)), set(split(5, held_out=True))
    assert not tuning & held
    assert len(HELD_OUT_FAMILIES) >= 2 and not set(HELD_OUT_FAMILIES) & set(TUNING)
    assert {f for f, _ in tuning} == set(TUNING)
    assert all(s >= HELD_OUT_SEED for _, s in held)
    assert {f for f, _ in held} == set(FAMILIES)


def test_a_partial_fault_hits_its_share_of_requests() -> None:
    params = UpstreamParams(
        "u",
        slots=10000,
        service=ServiceTime("fixed", 0.01),
        faults=FaultSchedule((Fault("delay", 0.0, delay=1.0, share=0.1),)),
    )
    upstream = UpstreamModel(params, random.Random(0))
    answers = [upstream.arrive(i, 1.0) for i in range(5000)]
    slow = sum(isinstance(a, Respond) and a.at > 1.5 for a in answers)
    assert 400 < slow < 600, slow


def test_the_offline_client_gives_up_at_its_timeout() -> None:
    ups = [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(2)]
    hole = FaultSchedule((Fault("blackhole", 0.0),))
    models = [
        UpstreamModel(UpstreamParams("a", service=ServiceTime("fixed", 0.01)), random.Random(0)),
        UpstreamModel(UpstreamParams("b", faults=hole), random.Random(1)),
    ]
    load = plan(LoadShape(100.0, 2.0), 0)
    result = run_offline(RoundRobin(ups), ups, models, load, timeout=0.5)
    assert abs(result.success - 0.5) < 0.05
    assert result.client_percentile(0.99) == pytest.approx(0.5)
    assert not models[1].held  # forgotten when given up
