"""The generator's plan: Poisson arrivals (with a ramp), Zipf keys, sizes; seeded."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from webtorch_lab.schedule import KeyChooser, LoadShape, SizeChooser, arrival_times, plan


def test_poisson_rate_and_gaps() -> None:
    times = list(arrival_times(LoadShape(rate=500.0, duration=20.0), random.Random(1)))
    assert len(times) == pytest.approx(10000, rel=0.03)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 20.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 500, rel=0.03)
    # exponential gaps: standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(mean, rel=0.05)


def test_warmup_comes_before_zero() -> None:
    times = list(arrival_times(LoadShape(rate=100.0, duration=1.0, warmup=2.0), random.Random(2)))
    assert times[0] >= -2.0
    assert sum(1 for t in times if t < 0) == pytest.approx(200, rel=0.2)


def test_ramp() -> None:
    shape = LoadShape(rate=100.0, duration=10.0, ramp_to=300.0)
    assert shape.rate_at(0.0) == 100.0 and shape.rate_at(5.0) == 200.0
    times = list(arrival_times(shape, random.Random(3)))
    first = sum(1 for t in times if t < 2.0)
    last = sum(1 for t in times if t >= 8.0)
    assert first == pytest.approx(2 * 120, rel=0.2)  # mean rate over [0, 2): 120
    assert last == pytest.approx(2 * 280, rel=0.15)
    assert len(times) == pytest.approx(2000, rel=0.05)


def test_zipf_keys() -> None:
    keys = KeyChooser(20, 1.0)
    rng = random.Random(4)
    drawn = [keys.choose(rng) for _ in range(50000)]
    top = drawn.count("key-00") / len(drawn)
    assert top == pytest.approx(keys.probability(0), rel=0.05)
    assert drawn.count("key-00") > 5 * drawn.count("key-09")
    assert set(drawn) == {f"key-{i:02d}" for i in range(20)}
    assert sum(keys.probability(i) for i in range(20)) == pytest.approx(1.0)


def test_sizes() -> None:
    sizes = SizeChooser([(100, 9.0), (65536, 1.0)])
    rng = random.Random(5)
    drawn = [sizes.choose(rng) for _ in range(20000)]
    assert drawn.count(65536) / len(drawn) == pytest.approx(0.1, rel=0.1)


def test_plan_is_seeded_and_keys_do_not_move_arrivals() -> None:
    shape = LoadShape(rate=200.0, duration=2.0)
    a = plan(shape, 7)
    b = plan(shape, 7, KeyChooser(5, 1.0), SizeChooser([(10, 1.0)]))
    assert [p.t for p in a] == [p.t for p in b]
    assert plan(shape, 7) == a
    assert plan(shape, 8) != a
    assert all(p.key is None and p.size == 0 for p in a)
    assert all(p.key is not None and p.size == 10 for p in b)
