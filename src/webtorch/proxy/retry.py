"""Whether a failed attempt is tried again on another upstream, and how many retries the group
can afford. Sans-IO: the proxy passes what it knows about the attempt and ``now``.

The rules follow nginx's ``proxy_next_upstream`` (same condition names, same caution with
non-idempotent requests); the budget follows Finagle's ``RetryBudget``, so that when a whole
group is failing retries add a bounded fraction of load instead of multiplying it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from webtorch.config import RetryConfig
from webtorch.vocab import RETRY_CONDITIONS, Outcome

# nginx's proxy_next_upstream vocabulary, the part that applies here (in vocab.py: config
# validates the names too).
CONDITIONS: Final = RETRY_CONDITIONS
_SERVER_ERROR_CONDITIONS: Final = {
    500: "http_500",
    502: "http_502",
    503: "http_503",
    504: "http_504",
}

# RFC 9110 section 9.2.2 (nginx treats POST, LOCK and PATCH as the non-idempotent ones; listing
# the safe side instead keeps unknown or extension methods on the cautious side).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Reasons not to retry, as the access log records them. A retry's reason is its condition name.
NO_RETRY_SUCCESS: Final = "success"
NO_RETRY_CANCELLED: Final = "cancelled"
NO_RETRY_RESPONSE_STARTED: Final = "response_started"
NO_RETRY_TRIES: Final = "tries_exhausted"
NO_RETRY_TIMEOUT: Final = "retry_timeout"
NO_RETRY_NOT_ENABLED: Final = "not_enabled"
NO_RETRY_NON_IDEMPOTENT: Final = "non_idempotent"
NO_RETRY_UNKNOWN_STATUS: Final = "unknown_status"

# The defaults are the config's ([upstreams.X.retry], where they are validated): one copy.
_CONFIG: Final = RetryConfig()
_DEFAULT_ON: Final = frozenset(_CONFIG.on)


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """``tries``: attempts in all, the first included (nginx ``proxy_next_upstream_tries``); 0
    means one per upstream of the group. ``on``: the conditions worth another upstream (nginx
    ``proxy_next_upstream``; empty or ``{"off"}`` for none). ``timeout``: no retry once this many
    seconds passed since the first attempt began (``proxy_next_upstream_timeout``; 0 = no limit).
    ``budget_*``: see :class:`RetryBudget`."""

    tries: int = _CONFIG.tries
    on: frozenset[str] = _DEFAULT_ON
    timeout: float = _CONFIG.timeout
    budget_percent: float = _CONFIG.budget_percent
    budget_min_per_second: float = _CONFIG.budget_min_per_second
    budget_window: float = _CONFIG.budget_window

    def __post_init__(self) -> None:
        if self.on == frozenset({"off"}):
            object.__setattr__(self, "on", frozenset())
        # The bounds are the config's, one copy: these values as a RetryConfig, or its
        # ValidationError (a ValueError) naming the one out of bounds.
        RetryConfig(
            tries=self.tries,
            on=sorted(self.on),
            timeout=self.timeout,
            budget_percent=self.budget_percent,
            budget_min_per_second=self.budget_min_per_second,
            budget_window=self.budget_window,
        )


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """``retry`` and why: the condition that matched, or what ruled a retry out. Truthy when the
    attempt should be retried."""

    retry: bool
    reason: str

    def __bool__(self) -> bool:
        return self.retry


def should_retry(
    method: str,
    outcome: Outcome,
    status: int | None,
    *,
    request_sent: bool,
    response_started: bool,
    attempt: int,
    elapsed: float,
    settings: RetrySettings,
    route_allows_non_idempotent: bool,
    group_size: int | None = None,
) -> RetryDecision:
    """Whether the attempt that just ended should be followed by one on another upstream.

    ``attempt``: attempts made so far, this one included (1 after the first). ``elapsed``:
    seconds since the first attempt began. ``request_sent``: whether any byte of the request
    reached this upstream. ``response_started``: whether any byte of a response reached the
    client (then the response is committed and nothing can be retried). ``group_size`` bounds
    ``tries = 0``; without it that bound is left to the caller (stop when no upstream is left
    untried). The retry budget is not consulted here: withdraw from it after a True.
    """
    if response_started:
        return RetryDecision(False, NO_RETRY_RESPONSE_STARTED)
    if outcome is Outcome.CANCELLED:
        return RetryDecision(False, NO_RETRY_CANCELLED)
    condition = _condition(outcome, status)
    if condition is None:
        reason = NO_RETRY_UNKNOWN_STATUS if outcome is Outcome.SERVER_ERROR else NO_RETRY_SUCCESS
        return RetryDecision(False, reason)
    if condition not in settings.on:
        return RetryDecision(False, NO_RETRY_NOT_ENABLED)
    tries = settings.tries or group_size
    if tries is not None and attempt >= tries:
        return RetryDecision(False, NO_RETRY_TRIES)
    if settings.timeout and elapsed >= settings.timeout:
        return RetryDecision(False, NO_RETRY_TIMEOUT)
    if outcome is Outcome.CONNECT_FAILED:
        # Nothing reached the upstream, so nothing can have been done twice.
        return RetryDecision(True, condition)
    if (
        request_sent
        and method.upper() not in IDEMPOTENT_METHODS
        and not route_allows_non_idempotent
        and "non_idempotent" not in settings.on
    ):
        # The upstream may have acted on it (charged a card, appended a row) before failing.
        return RetryDecision(False, NO_RETRY_NON_IDEMPOTENT)
    return RetryDecision(True, condition)


def _condition(outcome: Outcome, status: int | None) -> str | None:
    """The ``proxy_next_upstream`` condition an attempt's end matches, None for none."""
    if outcome is Outcome.CONNECT_FAILED or outcome is Outcome.RESET:
        return "error"
    if outcome is Outcome.TIMEOUT:
        return "timeout"
    if outcome is Outcome.INVALID_RESPONSE:
        # Not in the default conditions (as nginx): an upstream that answers garbage or an
        # oversized head will likely do it again, and the request did reach it.
        return "invalid_header"
    if outcome is Outcome.SERVER_ERROR:
        return _SERVER_ERROR_CONDITIONS.get(status) if status is not None else None
    # OK: an answer the upstream meant. Only a 429 is worth another upstream, and only to an
    # operator who listed http_429 (another upstream may have capacity left).
    return "http_429" if status == 429 else None


class RetryBudget:
    """How many retries the group can afford right now (Finagle's ``RetryBudget``).

    Every first attempt deposits ``budget_percent / 100`` of a token; every retry withdraws one
    token; a retry with no token left is refused. Deposits and withdrawals count for
    ``budget_window`` seconds, and on top of them a reserve of ``budget_min_per_second x
    budget_window`` tokens lets a quiet group still retry.

    What that guarantees: over any ``budget_window`` seconds,
    ``retries <= budget_percent / 100 x first_attempts + budget_min_per_second x budget_window``.
    So with 100 requests/s, 20 % and a reserve of 5/s, at most 25 retries/s on average over the
    window (20 % extra plus 5/s), whatever fraction of attempts fails: an outage adds at most
    that to the load on the upstreams instead of multiplying it by ``tries``. The reserve can be
    spent in a burst within one window. Each retry of a request withdraws, so a request tried 3
    times costs 2 tokens.

    Time is kept in ``_BUCKETS`` buckets per window in a ring, so memory is bounded and each call
    costs O(1) amortized. The price is granularity: a deposit or withdrawal stops counting
    between ``budget_window x (1 - 1/_BUCKETS)`` and ``budget_window`` seconds after it happened.
    """

    _BUCKETS: Final = 20

    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings
        self._width = settings.budget_window / self._BUCKETS
        self._ratio = settings.budget_percent / 100.0
        self._reserve = settings.budget_min_per_second * settings.budget_window
        self._deposits = [0] * self._BUCKETS
        self._withdrawals = [0] * self._BUCKETS
        self._deposited = 0  # sums over the ring
        self._withdrawn = 0
        self._head: int | None = None  # absolute bucket number of the newest bucket

    def record_request(self, now: float) -> None:
        """A first attempt began (retries do not deposit)."""
        slot = self._advance(now)
        self._deposits[slot] += 1
        self._deposited += 1

    def try_withdraw(self, now: float) -> bool:
        """Take a token for a retry; False (and nothing taken) when the budget is spent."""
        slot = self._advance(now)
        # A small tolerance so that e.g. 5 deposits at 20 % buy exactly one retry despite floats.
        if self._withdrawn + 1 > self._deposited * self._ratio + self._reserve + 1e-9:
            return False
        self._withdrawals[slot] += 1
        self._withdrawn += 1
        return True

    def available(self, now: float) -> float:
        """Tokens left right now (for metrics)."""
        self._advance(now)
        return max(0.0, self._deposited * self._ratio + self._reserve - self._withdrawn)

    def _advance(self, now: float) -> int:
        """Expire the buckets that fell out of the window; the ring slot for ``now``."""
        bucket = math.floor(now / self._width)
        if self._head is None:
            self._head = bucket
        elif bucket > self._head:
            steps = bucket - self._head
            if steps >= self._BUCKETS:
                self._deposits = [0] * self._BUCKETS
                self._withdrawals = [0] * self._BUCKETS
                self._deposited = 0
                self._withdrawn = 0
            else:
                for b in range(self._head + 1, bucket + 1):
                    slot = b % self._BUCKETS
                    self._deposited -= self._deposits[slot]
                    self._withdrawn -= self._withdrawals[slot]
                    self._deposits[slot] = 0
                    self._withdrawals[slot] = 0
            self._head = bucket
        # A clock that stepped back (it should not: monotonic) counts in the newest bucket.
        return self._head % self._BUCKETS
