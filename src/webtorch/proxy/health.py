"""Which upstreams of a group may take traffic: passive, outlier and active health, sans-IO.

Three independent judges, as in the proxies operators already know, each able to take an
upstream out of rotation:

* passive (nginx ``max_fails``/``fail_timeout``): a few failed attempts within a short window
  take the upstream out for that window;
* outlier detection (Envoy): a run of consecutive errors ejects it for a time that grows with
  every ejection, never more than a share of the group at once;
* active checks (nginx Plus ``health_check``, Envoy health checking): the proxy probes a path on
  its own schedule and an upstream that fails a few probes in a row is out until it passes a few.

An upstream is *available* when no judge holds it out. When it comes back it can be eased in
with slow start. When too few are available the group panics and every upstream is offered, as
Envoy does: spreading load over all of them beats piling it on the one or two survivors.

With several workers each judges what it sees, and what takes an upstream out (a passive mark
or an ejection) is also written to the shared store (``webtorch.shared``) with its end: the
other workers avoid it at once, till then. Active checks stay each worker's own (every worker
checks), and so do the counts that lead to a judgement.

Nothing here does I/O or reads a clock: the proxy feeds attempt outcomes and probe results with
``now`` (monotonic seconds) and asks for the eligible list. Timers are evaluated lazily against
``now``, so there is no background task to run.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from typing import Final

from webtorch.balance.base import Outcome, Upstream
from webtorch.balance.health_settings import ActiveSettings, OutlierSettings, PassiveSettings
from webtorch.shared.store import StateStore

# Slow start begins at this fraction of the weight rather than 0: weight_factor must stay in
# (0, 1] for the weighted policies (a zero weight is never picked, so a recovering upstream would
# get no traffic and no evidence that it recovered), and a tenth still lets caches and JITs warm.
SLOW_START_FLOOR: Final = 0.1

_NEVER: Final = -math.inf  # a timer that has always expired

HEALTHY: Final = "healthy"
UNAVAILABLE: Final = "unavailable"  # passive: max_fails within fail_timeout
EJECTED: Final = "ejected"  # outlier detection
UNHEALTHY: Final = "unhealthy"  # active checks
SLOW_START: Final = "slow_start"


class ActiveCheck:
    """One upstream's active-check state: its schedule and its run of good or bad checks.

    It starts healthy, so a freshly started proxy serves at once instead of refusing traffic
    until every upstream has passed ``passes`` checks (nginx Plus does the same unless a server
    is marked ``mandatory``); a dead upstream is found by passive health on the first request
    or by the first ``fails`` checks.
    """

    __slots__ = ("_rng", "fails", "healthy", "healthy_since", "next_check_at", "passes", "settings")

    def __init__(self, settings: ActiveSettings, rng: random.Random) -> None:
        self.settings = settings
        self._rng = rng
        self.healthy = True
        self.healthy_since = _NEVER
        self.fails = 0  # consecutive failed checks
        self.passes = 0  # consecutive good checks
        # None until the first schedule() call, which knows the proxy's start time.
        self.next_check_at: float | None = None

    def schedule_first(self, now: float) -> float:
        """Place the first check within the first ``jitter x interval`` seconds, so that checks
        of a large group do not all fire (and all time out together) on the same tick."""
        if self.next_check_at is None:
            spread = self.settings.jitter * self.settings.interval
            self.next_check_at = now + self._rng.uniform(0.0, spread)
        return self.next_check_at

    def start(self, now: float) -> None:
        """A check starts now: schedule the next one. The jitter is symmetric so that the mean
        interval is the configured one, and it keeps re-spreading checks that drifted together.
        """
        jitter = self.settings.jitter
        factor = 1.0 + self._rng.uniform(-jitter, jitter) if jitter else 1.0
        self.next_check_at = now + self.settings.interval * factor

    def record_check(self, ok: bool, now: float) -> bool:
        """Count one check's result; True when it flipped ``healthy``."""
        if ok:
            self.fails = 0
            self.passes += 1
            if not self.healthy and self.passes >= self.settings.passes:
                self.healthy = True
                self.healthy_since = now
                return True
        else:
            self.passes = 0
            self.fails += 1
            if self.healthy and self.fails >= self.settings.fails:
                self.healthy = False
                return True
        return False


class _State:
    """Everything GroupHealth knows about one upstream. Timers hold the instant they expire."""

    __slots__ = (
        "active",
        "c5xx",
        "cgw",
        "down_until",
        "ejected_until",
        "ejection_level",
        "ejections_total",
        "fail_times",
        "key",
        "needs_ramp",
        "probation",
        "ramp_from",
        "ramp_until",
        "shared_until",
        "upstream",
    )

    def __init__(
        self, upstream: Upstream, max_fails: int, active: ActiveCheck | None, key: str
    ) -> None:
        self.upstream = upstream
        self.key = key  # its name in the shared store: group/address
        self.shared_until = _NEVER  # out by another worker's judgement till then
        # Passive: the times of the last max_fails failures, enough to tell whether max_fails of
        # them fell within fail_timeout (an exact sliding window in bounded memory).
        self.fail_times: deque[float] = deque(maxlen=max(max_fails, 1))
        self.down_until = _NEVER
        self.probation = False
        # Outlier detection.
        self.c5xx = 0
        self.cgw = 0
        self.ejected_until = _NEVER
        self.ejection_level = 0  # Envoy's ejection multiplier, decayed lazily (see _eject)
        self.ejections_total = 0
        self.active = active
        # Slow start: set when a judge takes the upstream out; the ramp starts when it is back.
        self.needs_ramp = False
        self.ramp_from = _NEVER
        self.ramp_until = _NEVER

    def available(self, now: float) -> bool:
        return (
            now >= self.down_until
            and now >= self.ejected_until
            and now >= self.shared_until
            and (self.active is None or self.active.healthy)
        )


class GroupHealth:
    """Health of one upstream group: feed it outcomes and checks, ask it who may take traffic.

    Every upstream starts available (active checks start healthy), so a fresh proxy serves at
    once. Hot path: ``record`` after each attempt (O(1), O(n) only on the rare attempt that ejects)
    and ``eligible`` before each pick (returns a cached tuple; O(number of upstreams in slow
    start) while some ramp, O(n) only after a state change or when a timer expired).
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        passive: PassiveSettings,
        outlier: OutlierSettings,
        active: ActiveSettings | None,
        slow_start: float,
        rng: random.Random,
        shared: StateStore | None = None,
        name: str = "",
    ) -> None:
        """``shared``: the store the workers of one server share (None: one process); ``name``
        the group's, which with each address names its upstreams there."""
        if slow_start < 0:
            raise ValueError(f"slow_start must be >= 0, got {slow_start}")
        ordered = sorted(upstreams, key=lambda u: u.index)
        if len({id(u) for u in ordered}) != len(ordered):
            raise ValueError("an upstream appears twice in the group")
        self.passive = passive
        self.outlier = outlier
        # Read on every failed attempt: native attributes (the settings are pydantic models,
        # whose attributes compiled code looks up by name).
        self._max_fails: int = passive.max_fails
        self._outlier_on: bool = outlier.enabled
        self.active = active
        self.slow_start = slow_start
        self._rng = rng
        self._upstreams = tuple(ordered)
        self._states = [
            _State(
                u,
                passive.max_fails,
                ActiveCheck(active, rng) if active else None,
                f"{name}/{u.address}",
            )
            for u in ordered
        ]
        self._shared = shared
        self._marks = -1  # the shared marks' change count last read (-1: read on first ask)
        self._by_upstream = {u: s for u, s in zip(ordered, self._states, strict=True)}
        # The multiplier stops growing once the cap is reached, so that after a long outage
        # it decays back in cap/base steps rather than in as many steps as there were ejections.
        cap = max(outlier.base_ejection_time, outlier.max_ejection_time)
        self._max_level = max(1, math.ceil(cap / outlier.base_ejection_time))
        # The eligible() cache.
        self._eligible: tuple[Upstream, ...] = self._upstreams
        self._ramping: list[_State] = []
        self._valid_until = _NEVER  # recompute once this timer has passed
        self._dirty = True  # recompute on the next call: some state changed
        self._panic = False

    # -- feeding ------------------------------------------------------------------------------

    def record(self, upstream: Upstream, outcome: Outcome, now: float) -> bool:
        """Account for one attempt's outcome; True when it took the upstream out of rotation.

        CANCELLED says nothing about the upstream and is ignored.
        """
        st = self._by_upstream[upstream]
        if outcome is Outcome.OK:
            if not (st.fail_times or st.probation or st.c5xx or st.cgw):
                return False  # the hot path: a success with nothing to reset
        elif outcome is Outcome.CANCELLED:
            return False
        out = False
        if self._max_fails:
            out = self._record_passive(st, outcome, now)
        if self._outlier_on and self._record_outlier(st, outcome, now):
            out = True
        return out

    def _record_passive(self, st: _State, outcome: Outcome, now: float) -> bool:
        fail_timeout = self.passive.fail_timeout
        if now < st.down_until:
            # Attempts that started before the upstream was marked down still end during the
            # down time. Like nginx, a failure extends the down time (it is fresh evidence) and
            # a success does not lift it early.
            if outcome.is_failure:
                st.down_until = max(st.down_until, now + fail_timeout)
            return False
        if not outcome.is_failure:
            # A success resets the count, also ending the probation after a down time.
            st.fail_times.clear()
            st.probation = False
            return False
        # nginx keeps the failure count at max_fails when it lets traffic back after
        # fail_timeout, so a single further failure marks the upstream down again.
        st.fail_times.append(now)
        if st.probation or (
            len(st.fail_times) >= self._max_fails and now - st.fail_times[0] <= fail_timeout
        ):
            st.down_until = now + fail_timeout
            st.probation = True
            st.fail_times.clear()
            st.needs_ramp = True
            self._dirty = True
            if self._shared is not None:
                self._shared.mark_down(st.key, st.down_until)
            return True
        return False

    def _record_outlier(self, st: _State, outcome: Outcome, now: float) -> bool:
        if now < st.ejected_until:
            # Envoy resets the counters when it unejects; not counting while ejected is the same
            # thing and keeps late results of attempts started before the ejection out of it.
            return False
        if outcome is Outcome.OK:
            st.c5xx = 0
            st.cgw = 0
            return False
        st.c5xx += 1
        if outcome.is_gateway_failure:
            st.cgw += 1
        else:
            # An HTTP error response means the upstream could be talked to: it breaks a run of
            # gateway failures (as a 500 does in Envoy).
            st.cgw = 0
        o = self.outlier
        tripped = (o.consecutive_5xx and st.c5xx >= o.consecutive_5xx) or (
            o.consecutive_gateway_failure and st.cgw >= o.consecutive_gateway_failure
        )
        # ">=" rather than Envoy's "==": an upstream refused ejection by max_ejection_percent is
        # ejected on its next error once there is room, instead of only after a success.
        if tripped and self._may_eject(now):
            self._eject(st, now)
            return True
        return False

    def _may_eject(self, now: float) -> bool:
        ejected = sum(1 for s in self._states if now < s.ejected_until)
        # Envoy's rule: eject while the share stays within the limit, and at least one host
        # whatever the limit (otherwise small groups with a low percentage never eject).
        if ejected == 0:
            return True
        return 100.0 * (ejected + 1) / len(self._states) <= self.outlier.max_ejection_percent

    def _eject(self, st: _State, now: float) -> None:
        base = self.outlier.base_ejection_time
        if st.ejection_level:
            # Envoy decrements the multiplier by one every base_ejection_time the host stays
            # un-ejected. Computed here in one go from the time it was last unejected
            # (ejected_until), which gives the same multiplier without a periodic sweep.
            healthy_for = now - st.ejected_until
            st.ejection_level = max(0, st.ejection_level - int(healthy_for // base))
        st.ejection_level = min(st.ejection_level + 1, self._max_level)
        cap = max(base, self.outlier.max_ejection_time)
        st.ejected_until = now + min(base * st.ejection_level, cap)
        st.ejections_total += 1
        st.c5xx = 0
        st.cgw = 0
        st.needs_ramp = True
        self._dirty = True
        if self._shared is not None:
            self._shared.mark_down(st.key, st.ejected_until)

    def record_check(self, upstream: Upstream, ok: bool, now: float) -> bool:
        """Account for one active check's result; True when it flipped the upstream's health."""
        st = self._by_upstream[upstream]
        if st.active is None:
            raise ValueError("record_check on a group without active health checks")
        changed = st.active.record_check(ok, now)
        if changed:
            if not st.active.healthy:
                st.needs_ramp = True
            self._dirty = True
        if (
            ok
            and st.active.healthy
            and (now < st.down_until or now < st.ejected_until or now < st.shared_until)
        ):
            # A good check is fresher evidence than the failures that took the upstream out
            # (Envoy's successful_active_health_check_uneject_host, on by default there too):
            # a restarted server is back within one check interval, not after fail_timeout or
            # a whole ejection. It comes back through slow start, when configured.
            st.down_until = min(st.down_until, now)
            st.ejected_until = min(st.ejected_until, now)
            st.shared_until = min(st.shared_until, now)
            if self._shared is not None:  # whoever took it out: back for every worker
                self._shared.mark_up(st.key, now)
            st.fail_times.clear()
            st.probation = False
            st.c5xx = st.cgw = 0
            st.needs_ramp = True
            self._dirty = True
            return True
        return changed

    def due_checks(self, now: float) -> list[Upstream]:
        """The upstreams whose active check is due now, in index order; each is rescheduled as it
        is returned, so it is not returned again before its next interval. The first call
        schedules the first checks (spread by jitter) and so usually returns few or none."""
        due: list[Upstream] = []
        for st in self._states:
            check = st.active
            if check is not None and check.schedule_first(now) <= now:
                check.start(now)
                due.append(st.upstream)
        return due

    def next_check_due(self, now: float) -> float | None:
        """When ``due_checks`` next has something to return (None without active checks): the
        shell sleeps until then. Schedules first checks like ``due_checks``."""
        times = [st.active.schedule_first(now) for st in self._states if st.active is not None]
        return min(times) if times else None

    # -- asking -------------------------------------------------------------------------------

    def eligible(self, now: float) -> Sequence[Upstream]:
        """The upstreams that may take this attempt, in index order, weight_factor refreshed.

        In panic (fewer than ``panic_threshold`` percent available) that is every upstream of
        the group; with slow start on, the held-out ones then carry the floor weight factor, so
        weighted policies still favour the available ones. May be empty only when nothing is
        available and panic is disabled. The returned tuple is shared until the next state
        change: do not keep it across requests.
        """
        shared = self._shared
        if shared is not None and shared.marks() != self._marks:
            self._pull(shared, now)
        if self._dirty or now >= self._valid_until:
            self._recompute(now)
        elif self._ramping:
            self._update_ramps(now)
        return self._eligible

    @property
    def panic(self) -> bool:
        """Whether the group was in panic at the last ``eligible`` call."""
        return self._panic

    def is_available(self, upstream: Upstream, now: float) -> bool:
        """Whether no judge holds ``upstream`` out (ignores panic)."""
        return self._by_upstream[upstream].available(now)

    def state_of(self, upstream: Upstream, now: float) -> str:
        """One word for metrics and the dashboard. When several judges hold the upstream out the
        one that lets it back last in the usual case wins: unhealthy, ejected, unavailable."""
        st = self._by_upstream[upstream]
        if st.active is not None and not st.active.healthy:
            return UNHEALTHY
        if now < st.ejected_until:
            return EJECTED
        if now < st.down_until or now < st.shared_until:
            return UNAVAILABLE  # shared: another worker's judgement, passive or outlier
        self._start_ramp(st, now)
        return SLOW_START if now < st.ramp_until else HEALTHY

    def ejections_total(self, upstream: Upstream) -> int:
        """How many times outlier detection ejected ``upstream`` since the group was built."""
        return self._by_upstream[upstream].ejections_total

    def ejections_active(self, now: float) -> int:
        """How many upstreams are ejected right now."""
        return sum(1 for s in self._states if now < s.ejected_until)

    # -- internals ----------------------------------------------------------------------------

    def _pull(self, shared: StateStore, now: float) -> None:
        """The shared marks moved: read this group's (rare: an upstream went out or back)."""
        self._marks = shared.marks()
        for st in self._states:
            until = shared.down_until(st.key)
            if until != st.shared_until:
                if until > now and not now < st.shared_until:
                    st.needs_ramp = True
                st.shared_until = until
                self._dirty = True

    def _start_ramp(self, st: _State, now: float) -> None:
        """Begin slow start for an upstream that is back, from the instant it came back.

        That instant is the latest of the timers that held it out and the check that made it
        healthy again, so it does not depend on when the group happens to be asked.
        """
        if not st.needs_ramp or not st.available(now):
            return
        st.needs_ramp = False
        if self.slow_start > 0:
            back = max(st.down_until, st.ejected_until, st.shared_until)
            if st.active is not None:
                back = max(back, st.active.healthy_since)
            st.ramp_from = back
            st.ramp_until = back + self.slow_start

    def _ramp_factor(self, st: _State, now: float) -> float:
        if now >= st.ramp_until:
            return 1.0
        progress = max(0.0, now - st.ramp_from) / self.slow_start
        return SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * progress

    def _recompute(self, now: float) -> None:
        available: list[Upstream] = []
        ramping: list[_State] = []
        next_timer = math.inf
        out_factor = SLOW_START_FLOOR if self.slow_start > 0 else 1.0
        for st in self._states:
            if now < st.down_until:
                next_timer = min(next_timer, st.down_until)
            if now < st.ejected_until:
                next_timer = min(next_timer, st.ejected_until)
            if now < st.shared_until:
                next_timer = min(next_timer, st.shared_until)
            if not st.available(now):
                st.upstream.weight_factor = out_factor
                continue
            self._start_ramp(st, now)
            available.append(st.upstream)
            if now < st.ramp_until:
                ramping.append(st)
                st.upstream.weight_factor = self._ramp_factor(st, now)
            else:
                st.upstream.weight_factor = 1.0
        total = len(self._states)
        self._panic = 100.0 * len(available) < self.outlier.panic_threshold * total
        self._eligible = self._upstreams if self._panic else tuple(available)
        self._ramping = ramping
        self._valid_until = next_timer
        self._dirty = False

    def _update_ramps(self, now: float) -> None:
        still: list[_State] = []
        for st in self._ramping:
            st.upstream.weight_factor = self._ramp_factor(st, now)
            if now < st.ramp_until:
                still.append(st)
        self._ramping = still
