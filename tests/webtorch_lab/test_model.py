"""The queueing model and fault schedule, with time passed in by hand."""

from __future__ import annotations

import math
import random

import pytest

from webtorch_lab.model import (
    Fault,
    FaultSchedule,
    Hold,
    Queued,
    Respond,
    ServiceTime,
    UpstreamModel,
    UpstreamParams,
)

FIXED = ServiceTime("fixed", 0.1)


def upstream(**kwargs: object) -> UpstreamModel:
    params = UpstreamParams(name="u", **{"slots": 2, "service": FIXED, **kwargs})  # type: ignore[arg-type]
    return UpstreamModel(params, random.Random(1))


def test_lognormal_median_and_p99() -> None:
    service = ServiceTime("lognormal", 0.01, 0.05)
    rng = random.Random(7)
    samples = sorted(service.sample(rng) for _ in range(20000))
    assert samples[10000] == pytest.approx(0.01, rel=0.05)
    assert samples[19800] == pytest.approx(0.05, rel=0.1)
    assert service.mean > service.median


def test_exponential_median() -> None:
    service = ServiceTime("exponential", 0.02)
    rng = random.Random(3)
    samples = sorted(service.sample(rng) for _ in range(20000))
    assert samples[10000] == pytest.approx(0.02, rel=0.05)
    assert service.mean == pytest.approx(0.02 / math.log(2))


def test_slots_then_fifo_queue() -> None:
    m = upstream()
    assert m.arrive(1, 0.0) == Respond(1, 0.1)
    assert m.arrive(2, 0.01) == Respond(2, pytest.approx(0.11))
    assert m.arrive(3, 0.02) == Queued(3)
    assert m.arrive(4, 0.03) == Queued(4)
    assert m.load()[0] == 4
    started = m.complete(1, 0.1)
    assert started == [Respond(3, pytest.approx(0.2))]
    assert m.complete(2, 0.11) == [Respond(4, pytest.approx(0.21))]
    assert m.stats.max_queue == 2
    assert m.stats.requests == 4


def test_cancel_drops_queued_work_but_not_work_in_service() -> None:
    m = upstream(slots=1)
    m.arrive(1, 0.0)
    assert m.arrive(2, 0.0) == Queued(2)
    m.cancel(2)
    m.cancel(1)  # in service: runs to its end
    assert m.complete(1, 0.1) == []
    assert m.load()[0] == 0
    assert m.stats.cancelled == 1


def test_max_queue_answers_503() -> None:
    m = upstream(slots=1, max_queue=1)
    m.arrive(1, 0.0)
    assert m.arrive(2, 0.0) == Queued(2)
    assert m.arrive(3, 0.0) == Respond(3, 0.0, 503)


def test_warm_up_requests_are_not_counted() -> None:
    m = upstream()
    m.arrive(1, -0.5)
    m.arrive(2, 0.25)
    assert m.stats.requests == 1
    assert m.stats.arrivals == {2: 1}


def test_fault_schedule() -> None:
    schedule = FaultSchedule(
        (
            Fault("slow", 1.0, 3.0, factor=4.0),
            Fault("delay", 2.0, 4.0, delay=0.5),
            Fault("error", 5.0, 6.0, status=503),
            Fault("blackhole", 7.0, 8.0),
            Fault("down", 9.0, 10.0),
            Fault("down", 9.5, 11.0),
        )
    )
    assert schedule.at(0.5).factor == 1.0
    assert schedule.at(1.0).factor == 4.0
    effect = schedule.at(2.5)
    assert (effect.factor, effect.delay) == (4.0, 0.5)
    assert schedule.at(3.0).factor == 1.0  # end is exclusive
    error = schedule.at(5.5).error
    assert error is not None and error.status == 503
    assert schedule.at(7.5).blackhole
    assert schedule.at(9.2).down and not schedule.at(11.0).down
    assert schedule.down_windows() == [(9.0, 11.0)]


def test_slow_and_delay_faults_stretch_service() -> None:
    faults = FaultSchedule((Fault("slow", 1.0, 2.0, factor=3.0), Fault("delay", 3.0, 4.0, delay=2)))
    m = upstream(slots=4, faults=faults)
    assert m.arrive(1, 0.5) == Respond(1, pytest.approx(0.6))
    assert m.arrive(2, 1.5) == Respond(2, pytest.approx(1.8))
    assert m.arrive(3, 3.5) == Respond(3, pytest.approx(5.6))


def test_error_fault_answers_fast_without_a_slot() -> None:
    m = upstream(slots=1, faults=FaultSchedule((Fault("error", 0.0, 1.0, error_time=0.001),)))
    assert m.arrive(1, 0.2) == Respond(1, pytest.approx(0.201), 503)
    assert m.arrive(2, 0.2) == Respond(2, pytest.approx(0.201), 503)
    assert m.busy == 0
    assert m.stats.statuses == {503: 2}
    assert m.healthy(0.5)  # a fast-failing node still passes health checks


def test_blackhole_holds_and_fails_health_checks() -> None:
    m = upstream(faults=FaultSchedule((Fault("blackhole", 1.0, 2.0),)))
    assert m.arrive(1, 1.5) == Hold(1)
    assert not m.healthy(1.5)
    assert m.healthy(2.0)
    m.cancel(1)
    assert m.stats.held == 1 and m.stats.cancelled == 1
    assert m.load()[0] == 0


def test_cold_penalty_once_per_key_within_the_warm_window() -> None:
    m = upstream(slots=8, cold_penalty=0.2, warm_window=5.0)
    first = m.arrive(1, 0.0, key="a")
    assert isinstance(first, Respond) and first.cold and first.at == pytest.approx(0.3)
    warm = m.arrive(2, 1.0, key="a")
    assert isinstance(warm, Respond) and not warm.cold and warm.at == pytest.approx(1.1)
    cold_again = m.arrive(3, 6.5, key="a")  # unused for more than 5 s
    assert isinstance(cold_again, Respond) and cold_again.cold
    assert m.stats.cold_loads == 2


def test_max_warm_evicts_the_least_recently_used_key() -> None:
    m = upstream(slots=8, cold_penalty=0.2, max_warm=2)
    for rid, key in enumerate(["a", "b", "a", "c", "a", "b"]):
        m.arrive(rid, float(rid), key=key)
    # a cold, b cold, a warm, c cold (evicts b), a warm, b cold (evicts c)
    assert m.stats.cold_loads == 4


def test_cost_per_kib() -> None:
    m = upstream(cost_per_kib=0.01)
    action = m.arrive(1, 0.0, size=64 * 1024)
    assert isinstance(action, Respond) and action.at == pytest.approx(0.1 + 0.64)


def test_probe_latency_is_the_recent_median() -> None:
    m = upstream(slots=1)
    assert m.load() == (0, 0.0)
    m.arrive(1, 0.0)
    m.arrive(2, 0.0)
    m.complete(1, 0.1)
    m.complete(2, 0.2)
    assert m.load() == (0, pytest.approx(0.2))
    assert UpstreamParams("x", slots=4, service=FIXED).capacity == pytest.approx(40.0)
