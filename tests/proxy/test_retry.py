"""should_retry (nginx proxy_next_upstream rules) and RetryBudget (Finagle), on a fake clock."""

from __future__ import annotations

import pytest

from webtorch.balance.base import Outcome
from webtorch.proxy.retry import RetryBudget, RetryDecision, RetrySettings, should_retry

DEFAULT = RetrySettings()


def decide(
    method: str,
    outcome: Outcome,
    status: int | None = None,
    *,
    sent: bool = True,
    started: bool = False,
    attempt: int = 1,
    elapsed: float = 0.0,
    settings: RetrySettings = DEFAULT,
    route: bool = False,
    group_size: int | None = None,
) -> RetryDecision:
    return should_retry(
        method,
        outcome,
        status,
        request_sent=sent,
        response_started=started,
        attempt=attempt,
        elapsed=elapsed,
        settings=settings,
        route_allows_non_idempotent=route,
        group_size=group_size,
    )


IDEMPOTENT = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]
NON_IDEMPOTENT = ["POST", "PATCH", "LOCK"]

# (outcome, status, sent, started, retry for idempotent, retry for non-idempotent, reason)
TABLE = [
    (Outcome.CONNECT_FAILED, None, False, False, True, True, "error"),
    (Outcome.RESET, None, True, False, True, False, "error"),
    (Outcome.RESET, None, False, False, True, True, "error"),
    (Outcome.TIMEOUT, None, True, False, True, False, "timeout"),
    (Outcome.TIMEOUT, None, False, False, True, True, "timeout"),
    (Outcome.SERVER_ERROR, 502, True, False, True, False, "http_502"),
    (Outcome.SERVER_ERROR, 503, True, False, True, False, "http_503"),
    (Outcome.SERVER_ERROR, 504, True, False, True, False, "http_504"),
    (Outcome.SERVER_ERROR, 500, True, False, False, False, "not_enabled"),
    (Outcome.SERVER_ERROR, None, True, False, False, False, "unknown_status"),
    (Outcome.OK, 200, True, False, False, False, "success"),
    (Outcome.OK, 404, True, False, False, False, "success"),
    (Outcome.OK, 429, True, False, False, False, "not_enabled"),
    (Outcome.CANCELLED, None, True, False, False, False, "cancelled"),
    # nginx's invalid_header: not among the default conditions.
    (Outcome.INVALID_RESPONSE, None, True, False, False, False, "not_enabled"),
    # Once a response byte reached the client nothing is retried, whatever happened.
    (Outcome.RESET, None, True, True, False, False, "response_started"),
    (Outcome.TIMEOUT, None, True, True, False, False, "response_started"),
    (Outcome.SERVER_ERROR, 502, True, True, False, False, "response_started"),
    (Outcome.CONNECT_FAILED, None, False, True, False, False, "response_started"),
]


@pytest.mark.parametrize("method", IDEMPOTENT + NON_IDEMPOTENT)
@pytest.mark.parametrize(("outcome", "status", "sent", "started", "idem", "non_idem", "why"), TABLE)
def test_rules_table(
    method: str,
    outcome: Outcome,
    status: int | None,
    sent: bool,
    started: bool,
    idem: bool,
    non_idem: bool,
    why: str,
) -> None:
    expected = idem if method in IDEMPOTENT else non_idem
    d = decide(method, outcome, status, sent=sent, started=started)
    assert d.retry is expected
    assert bool(d) is expected
    if expected:
        assert d.reason == why
    elif why in {"error", "timeout"} or why.startswith("http_"):
        assert d.reason == "non_idempotent"
    else:
        assert d.reason == why


def test_invalid_responses_are_retried_when_listed() -> None:
    settings = RetrySettings(on=frozenset({"invalid_header"}))
    d = decide("GET", Outcome.INVALID_RESPONSE, settings=settings)
    assert d.retry and d.reason == "invalid_header"
    assert not decide("POST", Outcome.INVALID_RESPONSE, settings=settings)


def test_method_case_does_not_matter() -> None:
    assert decide("get", Outcome.RESET)
    assert not decide("post", Outcome.RESET)


def test_unknown_methods_are_treated_as_non_idempotent() -> None:
    assert not decide("PURGE", Outcome.TIMEOUT)
    assert decide("PURGE", Outcome.CONNECT_FAILED, sent=False)


def test_conditions_must_be_listed() -> None:
    only_timeout = RetrySettings(on=frozenset({"timeout"}))
    assert decide("GET", Outcome.CONNECT_FAILED, sent=False, settings=only_timeout).reason == (
        "not_enabled"
    )
    assert not decide("GET", Outcome.RESET, settings=only_timeout)
    assert decide("GET", Outcome.TIMEOUT, settings=only_timeout)
    assert not decide("GET", Outcome.SERVER_ERROR, 503, settings=only_timeout)
    extra = RetrySettings(on=frozenset({"http_500", "http_429"}))
    assert decide("GET", Outcome.SERVER_ERROR, 500, settings=extra).reason == "http_500"
    assert decide("GET", Outcome.OK, 429, settings=extra).reason == "http_429"
    assert not decide("POST", Outcome.OK, 429, settings=extra)
    off = RetrySettings(on=frozenset({"off"}))
    assert off.on == frozenset()
    assert not decide("GET", Outcome.CONNECT_FAILED, sent=False, settings=off)


def test_non_idempotent_allowed_by_route_or_setting() -> None:
    assert not decide("POST", Outcome.RESET)
    assert decide("POST", Outcome.RESET, route=True).reason == "error"
    assert decide("PATCH", Outcome.SERVER_ERROR, 503, route=True)
    anyway = RetrySettings(on=DEFAULT.on | {"non_idempotent"})
    assert decide("POST", Outcome.TIMEOUT, settings=anyway).reason == "timeout"
    # The route's opt-in does not reach past a started response.
    assert not decide("POST", Outcome.RESET, started=True, route=True)


def test_tries_limit_counts_the_first_attempt() -> None:
    assert decide("GET", Outcome.RESET, attempt=1)
    assert decide("GET", Outcome.RESET, attempt=2)
    d = decide("GET", Outcome.RESET, attempt=3)
    assert not d and d.reason == "tries_exhausted"
    one = RetrySettings(tries=1)
    assert not decide("GET", Outcome.CONNECT_FAILED, sent=False, settings=one)


def test_tries_zero_means_one_per_upstream() -> None:
    unlimited = RetrySettings(tries=0)
    assert decide("GET", Outcome.RESET, attempt=3, settings=unlimited, group_size=4)
    assert not decide("GET", Outcome.RESET, attempt=4, settings=unlimited, group_size=4)
    # Without the group size the caller bounds it (it runs out of untried upstreams).
    assert decide("GET", Outcome.RESET, attempt=50, settings=unlimited)


def test_retry_timeout_bounds_total_time() -> None:
    timed = RetrySettings(timeout=2.0)
    assert decide("GET", Outcome.TIMEOUT, elapsed=1.9, settings=timed)
    d = decide("GET", Outcome.TIMEOUT, elapsed=2.0, settings=timed)
    assert not d and d.reason == "retry_timeout"
    assert decide("GET", Outcome.TIMEOUT, elapsed=1e6)  # 0: no limit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tries": -1},
        {"on": frozenset({"http_404"})},
        {"on": frozenset({"off", "error"})},
        {"timeout": -1.0},
        {"budget_percent": -1.0},
        {"budget_window": 0.0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetrySettings(**kwargs)  # type: ignore[arg-type]


# -- budget --------------------------------------------------------------------------------------


def run_steady(budget: RetryBudget, seconds: int, rate: int, start: float = 0.0) -> list[int]:
    """``rate`` requests per second, each of which fails and asks for a retry; the number of
    retries granted in each second."""
    granted = []
    for s in range(seconds):
        count = 0
        for i in range(rate):
            now = start + s + i / rate
            budget.record_request(now)
            count += budget.try_withdraw(now)
        granted.append(count)
    return granted


def test_budget_steady_load_grants_percent_plus_reserve() -> None:
    budget = RetryBudget(RetrySettings())  # 20 %, 5/s reserve, 10 s window
    granted = run_steady(budget, 60, 100)
    # The reserve (50 tokens) goes early; then each window grants 20 % of its 1000 requests
    # plus the 50 reserve tokens: 25 retries per second on average.
    steady = sum(granted[30:]) / 30
    assert 24.0 <= steady <= 26.0
    for first in range(10, 50):
        assert sum(granted[first : first + 10]) <= 0.2 * 1000 + 50 + 5  # one bucket of slack


def test_budget_without_reserve_is_exactly_the_percentage() -> None:
    budget = RetryBudget(RetrySettings(budget_min_per_second=0.0))
    granted = run_steady(budget, 40, 100)
    assert sum(granted[20:]) / 20 == pytest.approx(20.0, abs=0.5)


def test_budget_fractions_add_up() -> None:
    budget = RetryBudget(RetrySettings(budget_min_per_second=0.0))
    for _ in range(4):
        budget.record_request(0.0)
    assert not budget.try_withdraw(0.0)
    budget.record_request(0.0)  # 5 x 20 % = one token
    assert budget.try_withdraw(0.0)
    assert not budget.try_withdraw(0.0)


def test_budget_deposits_expire_after_the_window() -> None:
    budget = RetryBudget(RetrySettings(budget_min_per_second=0.0, budget_window=10.0))
    for _ in range(100):
        budget.record_request(0.0)
    assert budget.available(9.0) == pytest.approx(20.0)
    assert budget.try_withdraw(9.0)
    assert budget.available(10.0) == 0.0
    assert not budget.try_withdraw(10.0)


def test_budget_reserve_alone_with_no_traffic() -> None:
    budget = RetryBudget(RetrySettings(budget_min_per_second=5.0, budget_window=10.0))
    assert sum(budget.try_withdraw(0.0) for _ in range(100)) == 50
    assert not budget.try_withdraw(5.0)
    # The withdrawals expire with the window, and the reserve is whole again.
    assert sum(budget.try_withdraw(10.0) for _ in range(100)) == 50


def test_budget_survives_a_long_idle_gap_and_a_clock_step_back() -> None:
    budget = RetryBudget(RetrySettings(budget_min_per_second=0.0))
    for _ in range(10):
        budget.record_request(1000.0)
    assert budget.try_withdraw(999.0)  # counted in the newest bucket
    assert budget.try_withdraw(1000.0)
    assert not budget.try_withdraw(1000.0)
    assert budget.available(1e6) == 0.0
