"""GroupHealth: passive (nginx), outlier (Envoy), active checks, slow start, panic; fake clock."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from webtorch.balance.base import Outcome, Upstream
from webtorch.balance.health_settings import ActiveSettings, OutlierSettings, PassiveSettings
from webtorch.proxy.health import SLOW_START_FLOOR, GroupHealth

NO_PASSIVE = PassiveSettings(max_fails=0)
NO_OUTLIER = OutlierSettings(consecutive_5xx=0, consecutive_gateway_failure=0, panic_threshold=0)
NO_PANIC_OUTLIER = OutlierSettings(panic_threshold=0)


def ups(n: int) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(n)]


def group(
    n: int = 3,
    *,
    passive: PassiveSettings = NO_PASSIVE,
    outlier: OutlierSettings = NO_OUTLIER,
    active: ActiveSettings | None = None,
    slow_start: float = 0.0,
) -> tuple[GroupHealth, list[Upstream]]:
    members = ups(n)
    return GroupHealth(members, passive, outlier, active, slow_start, random.Random(7)), members


def fail(g: GroupHealth, u: Upstream, times: int, now: float, outcome: Outcome) -> None:
    for _ in range(times):
        g.record(u, outcome, now)


# -- passive: nginx max_fails / fail_timeout ---------------------------------------------------


def test_passive_down_at_nth_failure_within_window_and_back_after_fail_timeout() -> None:
    g, (a, b, c) = group(passive=PassiveSettings(max_fails=3, fail_timeout=10.0))
    assert g.record(a, Outcome.TIMEOUT, 0.0) is False
    assert g.record(a, Outcome.RESET, 1.0) is False
    assert g.is_available(a, 1.0)
    assert g.record(a, Outcome.SERVER_ERROR, 2.0) is True
    assert not g.is_available(a, 2.0)
    assert g.state_of(a, 2.0) == "unavailable"
    assert list(g.eligible(2.0)) == [b, c]
    assert a not in g.eligible(11.9)
    assert g.is_available(a, 12.0)
    assert a in g.eligible(12.0)
    assert g.state_of(a, 12.0) == "healthy"


def test_passive_failures_spread_beyond_window_do_not_count() -> None:
    g, (a, *_) = group(passive=PassiveSettings(max_fails=3, fail_timeout=10.0))
    for t in (0.0, 6.0, 12.0):
        assert g.record(a, Outcome.CONNECT_FAILED, t) is False
    assert g.is_available(a, 12.0)
    # The window slides: 6, 12 and 13 are three failures within 10 s.
    assert g.record(a, Outcome.CONNECT_FAILED, 13.0) is True
    assert not g.is_available(a, 13.0)


def test_passive_success_resets_count_and_cancelled_is_ignored() -> None:
    g, (a, *_) = group(passive=PassiveSettings(max_fails=3, fail_timeout=10.0))
    fail(g, a, 2, 0.0, Outcome.TIMEOUT)
    g.record(a, Outcome.OK, 0.5)
    fail(g, a, 2, 1.0, Outcome.TIMEOUT)
    assert g.is_available(a, 1.0)
    fail(g, a, 5, 1.5, Outcome.CANCELLED)
    assert g.is_available(a, 1.5)
    assert g.record(a, Outcome.TIMEOUT, 2.0) is True


def test_passive_one_more_failure_after_coming_back_re_marks_until_a_success() -> None:
    g, (a, *_) = group(passive=PassiveSettings(max_fails=3, fail_timeout=10.0))
    fail(g, a, 3, 0.0, Outcome.RESET)
    assert g.is_available(a, 10.0)
    assert g.record(a, Outcome.RESET, 10.0) is True  # nginx: the count is still at max_fails
    assert not g.is_available(a, 19.9)
    assert g.is_available(a, 20.0)
    g.record(a, Outcome.OK, 20.0)
    assert g.record(a, Outcome.RESET, 21.0) is False


def test_passive_failure_while_down_extends_success_does_not_lift() -> None:
    g, (a, *_) = group(passive=PassiveSettings(max_fails=1, fail_timeout=10.0))
    g.record(a, Outcome.RESET, 0.0)
    g.record(a, Outcome.OK, 1.0)  # a late success of an attempt started earlier
    assert not g.is_available(a, 5.0)
    g.record(a, Outcome.TIMEOUT, 5.0)
    assert not g.is_available(a, 14.9)
    assert g.is_available(a, 15.0)


def test_passive_max_fails_zero_never_marks_down() -> None:
    g, (a, *_) = group(passive=PassiveSettings(max_fails=0))
    fail(g, a, 100, 0.0, Outcome.CONNECT_FAILED)
    assert g.is_available(a, 0.0)
    assert g.state_of(a, 0.0) == "healthy"


# -- outlier detection: Envoy --------------------------------------------------------------------


def test_outlier_ejects_after_consecutive_5xx() -> None:
    g, (a, *_) = group(outlier=NO_PANIC_OUTLIER)
    for _ in range(4):
        assert g.record(a, Outcome.SERVER_ERROR, 0.0) is False
    assert g.record(a, Outcome.SERVER_ERROR, 0.0) is True
    assert g.state_of(a, 0.0) == "ejected"
    assert a not in g.eligible(29.9)
    assert a in g.eligible(30.0)
    assert g.ejections_total(a) == 1


def test_outlier_ejects_after_consecutive_gateway_failures() -> None:
    settings = OutlierSettings(consecutive_5xx=0, consecutive_gateway_failure=3, panic_threshold=0)
    g, (a, b, _) = group(outlier=settings)
    fail(g, a, 2, 0.0, Outcome.CONNECT_FAILED)
    assert g.record(a, Outcome.TIMEOUT, 0.0) is True
    assert g.state_of(a, 0.0) == "ejected"
    # An HTTP error breaks a run of gateway failures: the upstream answered.
    fail(g, b, 2, 0.0, Outcome.RESET)
    g.record(b, Outcome.SERVER_ERROR, 0.0)
    fail(g, b, 2, 0.0, Outcome.RESET)
    assert g.state_of(b, 0.0) == "healthy"


def test_outlier_gateway_failures_count_towards_5xx() -> None:
    g, (a, *_) = group(outlier=NO_PANIC_OUTLIER)
    fail(g, a, 3, 0.0, Outcome.RESET)
    fail(g, a, 2, 0.0, Outcome.SERVER_ERROR)
    assert g.state_of(a, 0.0) == "ejected"


def test_outlier_ok_resets_counters() -> None:
    g, (a, b, _) = group(outlier=OutlierSettings(consecutive_gateway_failure=3, panic_threshold=0))
    for t in range(10):
        fail(g, a, 4, float(t), Outcome.SERVER_ERROR)
        g.record(a, Outcome.OK, float(t))
        fail(g, b, 2, float(t), Outcome.TIMEOUT)
        g.record(b, Outcome.OK, float(t))
    assert g.state_of(a, 10.0) == "healthy"
    assert g.state_of(b, 10.0) == "healthy"
    assert g.ejections_total(a) == g.ejections_total(b) == 0


def test_outlier_backoff_grows_with_each_ejection_and_is_capped() -> None:
    settings = OutlierSettings(base_ejection_time=30.0, max_ejection_time=75.0, panic_threshold=0)
    g, (a, *_) = group(outlier=settings)
    fail(g, a, 5, 0.0, Outcome.SERVER_ERROR)
    assert g.is_available(a, 30.0) and not g.is_available(a, 29.9)
    fail(g, a, 5, 30.0, Outcome.SERVER_ERROR)  # 2nd ejection: 2 x 30 s
    assert not g.is_available(a, 89.9) and g.is_available(a, 90.0)
    fail(g, a, 5, 90.0, Outcome.SERVER_ERROR)  # 3rd: 90 s, capped at 75 s
    assert not g.is_available(a, 164.9) and g.is_available(a, 165.0)
    fail(g, a, 5, 165.0, Outcome.SERVER_ERROR)
    assert g.is_available(a, 240.0)
    assert g.ejections_total(a) == 4


def test_outlier_ejection_multiplier_decays_while_healthy() -> None:
    g, (a, *_) = group(outlier=NO_PANIC_OUTLIER)
    fail(g, a, 5, 0.0, Outcome.SERVER_ERROR)  # level 1, until 30
    fail(g, a, 5, 30.0, Outcome.SERVER_ERROR)  # level 2, until 90
    # 30 s healthy: one step down (to 1), so this ejection is level 2 again: 60 s.
    fail(g, a, 5, 120.0, Outcome.SERVER_ERROR)
    assert not g.is_available(a, 179.9) and g.is_available(a, 180.0)
    # 60 s healthy: two steps down (to 0), so this one is back to the base time.
    fail(g, a, 5, 240.0, Outcome.SERVER_ERROR)
    assert not g.is_available(a, 269.9) and g.is_available(a, 270.0)


def test_outlier_errors_while_ejected_do_not_count() -> None:
    g, (a, *_) = group(outlier=NO_PANIC_OUTLIER)
    fail(g, a, 5, 0.0, Outcome.SERVER_ERROR)
    fail(g, a, 4, 10.0, Outcome.SERVER_ERROR)  # late results of attempts started earlier
    assert g.record(a, Outcome.SERVER_ERROR, 30.0) is False
    assert g.is_available(a, 30.0)


def test_max_ejection_percent_limits_ejections_then_lets_the_next_in() -> None:
    g, (a, b, c) = group(outlier=NO_PANIC_OUTLIER)  # 3 hosts at 50 %
    fail(g, a, 5, 0.0, Outcome.SERVER_ERROR)
    fail(g, b, 5, 0.0, Outcome.SERVER_ERROR)
    assert g.state_of(a, 0.0) == "ejected"
    assert g.state_of(b, 0.0) == "healthy"  # 2 of 3 would be 67 %
    assert g.ejections_active(0.0) == 1
    assert list(g.eligible(0.0)) == [b, c]
    # Once a is back there is room, and b's run is still at the threshold.
    assert g.record(b, Outcome.SERVER_ERROR, 30.0) is True
    assert g.state_of(b, 30.0) == "ejected"


def test_at_least_one_host_is_ejected_whatever_the_percent() -> None:
    settings = OutlierSettings(max_ejection_percent=10.0, panic_threshold=0)
    g, (a, b, _) = group(outlier=settings)
    fail(g, a, 5, 0.0, Outcome.SERVER_ERROR)
    fail(g, b, 5, 0.0, Outcome.SERVER_ERROR)
    assert g.state_of(a, 0.0) == "ejected"
    assert g.state_of(b, 0.0) == "healthy"


# -- panic ---------------------------------------------------------------------------------------


def test_panic_returns_all_when_too_few_are_available() -> None:
    g, (a, b, c) = group(passive=PassiveSettings(max_fails=1), outlier=OutlierSettings())
    g.record(a, Outcome.RESET, 0.0)
    assert list(g.eligible(0.0)) == [b, c]
    assert not g.panic
    g.record(b, Outcome.RESET, 1.0)  # 1 of 3 available: 33 % < 50 %
    assert list(g.eligible(1.0)) == [a, b, c]
    assert g.panic
    assert g.state_of(a, 1.0) == "unavailable"  # panic does not change what the judges say
    assert list(g.eligible(10.0)) == [a, c]  # a is back: 67 %
    assert not g.panic


def test_without_panic_nothing_available_is_empty() -> None:
    g, (a, b, c) = group(passive=PassiveSettings(max_fails=1), outlier=NO_OUTLIER)
    for u in (a, b, c):
        g.record(u, Outcome.CONNECT_FAILED, 0.0)
    assert list(g.eligible(0.0)) == []
    assert not g.panic


def test_eligible_is_in_index_order() -> None:
    members = ups(4)
    g = GroupHealth(members[::-1], NO_PASSIVE, NO_OUTLIER, None, 0.0, random.Random(1))
    assert list(g.eligible(0.0)) == members


def test_duplicate_upstream_is_refused() -> None:
    (a,) = ups(1)
    with pytest.raises(ValueError, match="twice"):
        GroupHealth([a, a], NO_PASSIVE, NO_OUTLIER, None, 0.0, random.Random(1))


# -- eligible cache ------------------------------------------------------------------------------


def test_eligible_is_cached_and_invalidated_by_state_changes_and_timers() -> None:
    g, (a, b, c) = group(passive=PassiveSettings(max_fails=1, fail_timeout=10.0))
    first = g.eligible(0.0)
    assert g.eligible(0.5) is first  # nothing changed: no recomputation
    g.record(a, Outcome.OK, 0.5)
    assert g.eligible(0.5) is first  # a success changes nothing either
    g.record(a, Outcome.RESET, 1.0)
    down = g.eligible(1.0)
    assert list(down) == [b, c]  # a state change shows at once
    assert g.eligible(10.9) is down
    assert list(g.eligible(11.0)) == [a, b, c]  # the timer passed


def test_eligible_cache_follows_the_earliest_of_several_timers() -> None:
    g, (a, b, c) = group(passive=PassiveSettings(max_fails=1, fail_timeout=10.0))
    g.record(a, Outcome.RESET, 0.0)
    g.record(b, Outcome.RESET, 4.0)
    assert list(g.eligible(5.0)) == [c]
    assert list(g.eligible(10.0)) == [a, c]
    assert list(g.eligible(13.9)) == [a, c]
    assert list(g.eligible(14.0)) == [a, b, c]


# -- active checks -------------------------------------------------------------------------------


def test_active_first_checks_are_spread_by_jitter_and_not_returned_twice() -> None:
    g, members = group(10, active=ActiveSettings(interval=5.0, jitter=0.1))
    start = 100.0
    first = g.next_check_due(start)
    assert first is not None and start <= first <= start + 0.5
    # Step the clock through the first jitter window: each upstream comes up exactly once, and
    # not all on the same tick.
    returned: dict[str, list[float]] = {}
    for step in range(51):
        now = start + step * 0.01
        for u in g.due_checks(now):
            returned.setdefault(u.address, []).append(now)
    assert sorted(returned) == sorted(u.address for u in members)
    assert all(len(times) == 1 for times in returned.values())
    assert len({times[0] for times in returned.values()}) >= 5
    assert g.due_checks(start + 0.5) == []
    # The next round comes one interval later, give or take 10 %.
    nxt = g.next_check_due(start + 0.5)
    assert nxt is not None and start + 4.5 <= nxt <= start + 0.5 + 5.5
    for u in members:
        g.record_check(u, True, start + 1.0)
    assert g.due_checks(start + 4.4) == []
    assert g.due_checks(start + 0.5 + 5.5) == members


def test_active_without_jitter_first_check_is_immediate() -> None:
    g, members = group(2, active=ActiveSettings(jitter=0.0))
    assert g.due_checks(50.0) == members
    assert g.next_check_due(50.0) == 55.0


def test_active_fails_and_passes_thresholds() -> None:
    g, (a, b, c) = group(active=ActiveSettings(fails=2, passes=2))
    assert g.state_of(a, 0.0) == "healthy"  # upstreams start healthy
    assert g.record_check(a, False, 1.0) is False
    g.record_check(a, True, 2.0)  # a good check breaks the run of failures
    assert g.record_check(a, False, 3.0) is False
    assert g.record_check(a, False, 4.0) is True
    assert g.state_of(a, 4.0) == "unhealthy"
    assert list(g.eligible(4.0)) == [b, c]
    assert g.record_check(a, True, 5.0) is False
    assert list(g.eligible(5.0)) == [b, c]
    assert g.record_check(a, True, 6.0) is True
    assert list(g.eligible(6.0)) == [a, b, c]
    assert g.state_of(a, 6.0) == "healthy"


def test_a_good_active_check_lifts_passive_down_and_ejection() -> None:
    # A killed server is taken out by failures; once restarted, the next good check brings it
    # back, without waiting out fail_timeout or the ejection.
    g, (a, b, c) = group(
        passive=PassiveSettings(max_fails=1, fail_timeout=10.0),
        outlier=OutlierSettings(consecutive_gateway_failure=1, base_ejection_time=30.0),
        active=ActiveSettings(fails=1, passes=1),
    )
    g.record(a, Outcome.CONNECT_FAILED, 1.0)
    assert g.state_of(a, 1.0) in ("unavailable", "ejected")
    assert g.record_check(a, False, 2.0) is True
    assert list(g.eligible(3.0)) == [b, c]
    assert g.record_check(a, True, 4.0) is True
    assert g.state_of(a, 4.0) == "healthy"
    assert list(g.eligible(4.0)) == [a, b, c]


def test_record_check_without_active_settings_is_an_error() -> None:
    g, (a, *_) = group()
    with pytest.raises(ValueError):
        g.record_check(a, True, 0.0)
    assert g.due_checks(0.0) == []
    assert g.next_check_due(0.0) is None


def test_status_ok_uses_the_inclusive_range() -> None:
    settings = ActiveSettings(expect_status=(200, 299))
    assert settings.status_ok(200) and settings.status_ok(299)
    assert not settings.status_ok(301) and not settings.status_ok(503)


def test_state_of_names_the_judge_that_holds_longest() -> None:
    g, (a, *_) = group(
        passive=PassiveSettings(max_fails=1, fail_timeout=10.0),
        outlier=OutlierSettings(consecutive_5xx=1, panic_threshold=0),
        active=ActiveSettings(fails=1, passes=1),
    )
    g.record(a, Outcome.SERVER_ERROR, 0.0)
    assert g.state_of(a, 0.0) == "ejected"
    g.record_check(a, False, 1.0)
    assert g.state_of(a, 1.0) == "unhealthy"
    # A good check lifts the other judges too (see the test above).
    g.record_check(a, True, 2.0)
    assert g.state_of(a, 2.0) == "healthy"


# -- slow start ----------------------------------------------------------------------------------


def test_slow_start_ramps_weight_factor_from_the_moment_it_is_back() -> None:
    g, (a, b, _) = group(passive=PassiveSettings(max_fails=1, fail_timeout=10.0), slow_start=10.0)
    g.record(a, Outcome.RESET, 0.0)
    g.eligible(5.0)
    assert a.weight_factor == SLOW_START_FLOOR
    assert b.weight_factor == 1.0
    # First asked at 15: the ramp started when a came back (10), not when it was asked.
    assert a in g.eligible(15.0)
    assert a.weight_factor == pytest.approx(0.55)
    assert g.state_of(a, 15.0) == "slow_start"
    g.eligible(17.5)
    assert a.weight_factor == pytest.approx(0.775)
    g.eligible(20.0)
    assert a.weight_factor == 1.0
    assert g.state_of(a, 20.0) == "healthy"
    g.eligible(30.0)
    assert a.weight_factor == 1.0


def test_slow_start_begins_at_the_floor_and_after_an_active_recovery() -> None:
    g, (a, *_) = group(active=ActiveSettings(fails=1, passes=1), slow_start=4.0)
    g.record_check(a, False, 0.0)
    g.eligible(0.0)
    g.record_check(a, True, 3.0)
    g.eligible(3.0)
    assert a.weight_factor == pytest.approx(SLOW_START_FLOOR)
    g.eligible(5.0)
    assert a.weight_factor == pytest.approx(0.55)
    g.eligible(7.0)
    assert a.weight_factor == 1.0


def test_slow_start_after_ejection() -> None:
    g, (a, *_) = group(outlier=NO_PANIC_OUTLIER, slow_start=10.0)
    fail(g, a, 5, 0.0, Outcome.TIMEOUT)
    g.eligible(29.0)
    assert g.state_of(a, 30.0) == "slow_start"
    g.eligible(35.0)
    assert a.weight_factor == pytest.approx(0.55)


def test_no_slow_start_keeps_weight_factor_at_one() -> None:
    g, (a, *_) = group(passive=PassiveSettings(max_fails=1, fail_timeout=10.0))
    g.record(a, Outcome.RESET, 0.0)
    g.eligible(1.0)
    assert a.weight_factor == 1.0
    g.eligible(10.0)
    assert a.weight_factor == 1.0
    assert g.state_of(a, 10.0) == "healthy"


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: PassiveSettings(max_fails=-1),
        lambda: PassiveSettings(fail_timeout=0),
        lambda: OutlierSettings(base_ejection_time=0),
        lambda: OutlierSettings(max_ejection_percent=101),
        lambda: OutlierSettings(consecutive_5xx=-1),
        lambda: ActiveSettings(path="health"),
        lambda: ActiveSettings(fails=0),
        lambda: ActiveSettings(jitter=1.0),
        lambda: ActiveSettings(expect_status=(300, 200)),
    ],
)
def test_invalid_settings_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()
