"""From records and counters to the report's numbers."""

from __future__ import annotations

import math

import pytest

from webtorch_lab.analysis import analyse, fault_timing, percentile, share_series
from webtorch_lab.model import Fault
from webtorch_lab.records import Record, Records


def stats(arrivals: dict[int, int], cold: int = 0) -> dict[str, object]:
    return {
        "bucket": 0.1,
        "arrivals": {str(k): v for k, v in arrivals.items()},
        "requests": sum(arrivals.values()),
        "cold_loads": cold,
    }


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert math.isnan(percentile([], 50))


def test_failures_are_infinitely_slow() -> None:
    rows = [Record(i * 0.01, 0.01, 200, "ok", "a", "", 0, 0.0) for i in range(98)]
    rows += [
        Record(0.98, 0.001, 503, "http", "a", "", 0, 0.0),
        Record(0.99, 1.0, 0, "timeout", "", "", 0, 0.0),
    ]
    s = {"a": stats({i: 10 for i in range(10)})}
    m = analyse(
        "b", Records(rows), s, duration=1.0, timeout=1.0, fair={"a": 1.0}, faults=[], cold=False
    )
    assert m.success == pytest.approx(0.98)
    assert m.percentiles[50.0] == 0.01
    assert math.isinf(m.percentiles[99.0])
    assert m.amplification == pytest.approx(1.0)
    assert m.shares == {"a": 1.0}
    assert m.outcomes == {"ok": 98, "http": 1, "timeout": 1}
    assert m.cold_rate is None


def test_share_series_and_divert_recover() -> None:
    # 10 s in 0.1 s buckets; "b" gets nothing from 3 s to 6 s.
    a = {i: 10 for i in range(100)}
    b = {i: 10 for i in range(100) if not 30 <= i < 60}
    times, series = share_series({"a": stats(a), "b": stats(b)}, 10.0)
    assert len(times) == 100
    assert series["b"][10] == pytest.approx(0.5)
    assert series["b"][45] == 0.0
    assert series["a"][45] + series["b"][45] == pytest.approx(1.0)
    timing = fault_timing("b", Fault("delay", 3.0, 6.0, delay=1.0), 0.5, times, series["b"])
    assert timing.divert == pytest.approx(0.15, abs=0.11)
    assert timing.recover == pytest.approx(0.15, abs=0.21)
    never = fault_timing("a", Fault("delay", 3.0, 6.0, delay=1.0), 0.5, times, series["a"])
    assert never.divert is None and never.recover is None


def test_cold_rate() -> None:
    rows = [Record(0.0, 0.01, 200, "ok", "a", "k", 0, 0.0)]
    s = {"a": stats({0: 4}, cold=1)}
    m = analyse(
        "b", Records(rows), s, duration=1.0, timeout=1.0, fair={"a": 1.0}, faults=[], cold=True
    )
    assert m.cold_rate == pytest.approx(0.25)
    assert m.amplification == pytest.approx(4.0)


def test_results_file_keeps_text_outside_the_markers() -> None:
    from webtorch_lab.report import MARK_END, MARK_START, replace_generated

    first = replace_generated(None, "# Results\nv1\n")
    assert first == f"{MARK_START}\n# Results\nv1\n{MARK_END}\n"
    edited = "Intro by hand.\n" + first + "## Reading\nnotes\n"
    again = replace_generated(edited, "# Results\nv2\n")
    assert again == f"Intro by hand.\n{MARK_START}\n# Results\nv2\n{MARK_END}\n## Reading\nnotes\n"
