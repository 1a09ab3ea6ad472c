"""The surge detector and the guard's surge defence, on a fake clock."""

from __future__ import annotations

from webtorch.config import GuardConfig
from webtorch.guard.core import ALLOW, THROTTLE, Guard
from webtorch.guard.features import RequestView
from webtorch.guard.surge import SurgeDetector


def steady(detector: SurgeDetector, rate: float, start: float, seconds: float) -> float:
    """``rate`` requests/s from ``start`` for ``seconds``; returns the time after the last."""
    n = int(rate * seconds)
    for i in range(n):
        detector.arrive(start + i / rate)
    return start + n / rate


def test_a_surge_is_caught_mid_window_and_ends_after_calm() -> None:
    detector = SurgeDetector(factor=4.0, min_rate=100.0, window=0.25, hold=2.0)
    t = steady(detector, 200.0, 0.0, 60.0)  # a minute of normal traffic
    assert not detector.active
    assert 180.0 < detector.baseline < 220.0
    assert detector.threshold == detector.baseline * 4.0
    # 10,000 requests/s: caught after about threshold x window requests, well inside a window.
    began = t
    for i in range(1000):
        if detector.arrive(t + i / 10_000):
            break
    assert detector.active and detector.began is not None
    assert detector.began - began < 0.05
    t = steady(detector, 10_000.0, t, 5.0)
    assert detector.active  # a long flood does not become the baseline
    assert detector.baseline < 220.0
    t = steady(detector, 200.0, t, 1.0)
    assert detector.active  # calm, but not yet for `hold` seconds
    steady(detector, 200.0, t, 2.0)
    assert not detector.active
    assert detector.surges == 1


def test_growth_within_the_factor_or_below_the_floor_is_no_surge() -> None:
    detector = SurgeDetector(factor=4.0, min_rate=1000.0)
    t = steady(detector, 100.0, 0.0, 30.0)
    t = steady(detector, 900.0, t, 5.0)  # 9x, but under the floor
    assert not detector.active
    t = steady(detector, 1500.0, t, 5.0)  # over the floor, and the baseline has moved up
    assert detector.surges == 1 or not detector.active
    detector = SurgeDetector(factor=4.0, min_rate=10.0)
    t = steady(detector, 100.0, 0.0, 120.0)
    steady(detector, 300.0, t, 10.0)  # 3x its baseline
    assert detector.surges == 0


def test_new_clients_are_held_to_the_surge_rate_and_old_ones_keep_their_bucket() -> None:
    settings = GuardConfig(
        mode="enforce", rate=20.0, burst=40.0, surge_rate=5.0, surge_min_rate=500.0
    )
    guard = Guard(settings)
    view = RequestView("GET", "/", "", [(b"host", b"x")])
    old = [f"10.0.0.{i}" for i in range(20)]
    t = 0.0
    for _ in range(300):  # 20 clients at 4 requests/s each for 15 s: 80 requests/s
        for client in old:
            assert guard.check(view, client, t).action == ALLOW
        t += 0.25
    flood = [f"10.1.{i // 250}.{i % 250}" for i in range(200)]
    start = t
    first_throttle = None
    served = refused = 0
    for step in range(100):  # 1 s: every flooding address at 50 requests/s
        now = start + step * 0.01
        for client in flood[:100] if step % 2 else flood[100:]:
            decision = guard.check(view, client, now)
            if decision.action == THROTTLE:
                assert decision.reason == "surge"
                first_throttle = now if first_throttle is None else first_throttle
                refused += 1
            else:
                served += 1
        if step % 25 == 0:  # the old clients go on at their own pace, never refused
            for client in old:
                assert guard.check(view, client, now).action == ALLOW
    assert guard.surge is not None and guard.surge.active
    assert (
        first_throttle is not None and first_throttle - start < 0.2
    )  # the burst: 5 requests at 50/s
    assert refused > 0.8 * (served + refused)
