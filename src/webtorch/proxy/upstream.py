"""Upstream groups as the proxy runs them: servers, policy, health, retries, pools, checks.

An :class:`UpstreamGroup` joins the sans-IO parts (a :class:`~webtorch.balance.base.Policy`,
:class:`~webtorch.proxy.health.GroupHealth`, the retry rules and budget) to the I/O ones (one
:class:`~webtorch.http.client.pool.ConnectionPool` per server, active health checks). A
:class:`ProxyRoute` is a route's handler: it turns each request into a
:class:`~webtorch.proxy.forward.Forward`. :class:`Proxies` owns every group of a config, their
clock, and the swap to a new set on reload.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webtorch.balance.base import Outcome, Upstream
from webtorch.balance.registry import make_policy
from webtorch.balance.settings import LearnedSettings, PrequalSettings
from webtorch.balance.sticky import StickyCookie
from webtorch.config import Config, RouteConfig, UpstreamConfig, parse_listen
from webtorch.http.client.fetch import FetchFailed, fetch
from webtorch.http.client.pool import ConnectionPool
from webtorch.http.messages import HandlerResult, Request
from webtorch.metrics import LATENCY_BUCKETS, Histogram
from webtorch.proxy.forward import Forward
from webtorch.proxy.headers import TrustedProxies
from webtorch.proxy.health import GroupHealth
from webtorch.proxy.probe import Prober
from webtorch.proxy.retry import RetryBudget, RetrySettings
from webtorch.shared.store import StateStore

# The plugins' pick phase: (request, candidates, the group's policy as the plugins may ask it)
# -> the candidates they left, and the upstream one of them chose (None: the policy chooses
# among those left).
Picker = Callable[
    [Request, Sequence[Upstream], Callable[[Sequence[Upstream]], Upstream]],
    tuple[Sequence[Upstream], Upstream | None],
]

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.monotonic

log: Final = logging.getLogger("webtorch.proxy")
# What an active health check sends besides its request line and Host.
_CHECK_HEADERS: Final = b"user-agent: webtorch-health-check\r\nconnection: close\r\n"


@dataclass(slots=True)
class UpstreamStats:
    """Counters per server, for metrics and the dashboard."""

    attempts: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by Outcome value
    # Seconds from sending a request to its response head (or its failure).
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    checks_failed: int = 0


class UpstreamGroup:
    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random | None = None,
        base_dir: Path | None = None,
        shared: StateStore | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.loop = loop
        rng = rng or random.Random()
        self.upstreams = []
        for i, server in enumerate(config.servers):
            host, port = parse_listen(server.address)
            self.upstreams.append(Upstream(server.address, host, port, server.weight, index=i))
        own = config.policy_settings()  # [upstreams.X.<policy>], if it has one
        if isinstance(own, LearnedSettings):
            # A learned policy's weights: relative to the config's directory; by default under
            # the working directory, as models' training state is.
            configured = own.state_dir
            if configured is None:
                state_dir = Path.cwd() / "webtorch-state" / f"balancer-{name}"
            elif not configured.is_absolute() and base_dir is not None:
                state_dir = base_dir / configured
            else:
                state_dir = configured
            own = own.model_copy(update={"state_dir": state_dir})
        self.policy = make_policy(
            config.policy,
            self.upstreams,
            hash_key=config.hash_key,
            balance=config.hash_balance,
            rng=rng,
            settings=own,
            group_name=name,
        )
        hc = config.health_check
        # The config's sections are the judges' settings (balance/health_settings.py); the group's
        # own table is its PassiveSettings.
        self.health = GroupHealth(
            self.upstreams, config, config.outlier, hc, config.slow_start, rng, shared, name
        )
        r = config.retry
        self.retry = RetrySettings(
            r.tries,
            frozenset(r.on),
            r.timeout,
            r.budget_percent,
            r.budget_min_per_second,
            r.budget_window,
        )
        self.budget = RetryBudget(self.retry)
        self.sticky = None if config.sticky is None else StickyCookie(config.sticky)
        # The group's table is its pools' PoolSettings (http/client/settings.py).
        self.pools = [ConnectionPool(u, config, loop) for u in self.upstreams]
        # Active checks have pools of their own that keep no connection: a fresh one each check.
        check_settings = config.model_copy(update={"keepalive": 0, "max_connections": 0})
        self._check_pools = (
            [ConnectionPool(u, check_settings, loop) for u in self.upstreams] if hc else []
        )
        self.stats = [UpstreamStats() for _ in self.upstreams]
        self.retries = 0
        self.reasons: dict[str, int] = {}  # picks by the policy's reason (the dashboard's)
        self._checks: set[asyncio.Task[None]] = set()
        self.closed = False
        # Load probes, for a policy that asks for them: [upstreams.X.prequal] names the path
        # and timeout.
        self.prober: Prober | None = None
        if self.policy.probing:
            probe = own if isinstance(own, PrequalSettings) else config.prequal
            self.prober = Prober(self.policy, probe.probe_path, probe.probe_timeout, loop)
        self.probing = self.prober is not None  # the one check Forward makes per pick
        # The plugins' pick phase (plugins/runner.py), set by the app when a plugin picks.
        self.picker: Picker | None = None

    # -- the request path ---------------------------------------------------------------------

    def choose(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        """The upstream for the request's next attempt; ``request.reason`` says why."""
        sticky = self.sticky
        upstream = sticky.route_of(request, candidates) if sticky is not None else None
        if upstream is not None:
            reason = "sticky_cookie"
        else:
            upstream = self.policy.pick(request, candidates, now)
            reason = self.policy.last_reason
        request.reason = reason
        reasons = self.reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        return upstream

    def send_probes(self, now: float) -> None:
        """Start the probes the policy asks for now (after a pick); returns at once."""
        prober = self.prober
        if prober is not None and not self.closed:
            targets = self.policy.probes(now)
            if targets:
                prober.send(targets)

    def cookie_for(self, request: Request, upstream: Upstream) -> tuple[bytes, bytes] | None:
        """The Set-Cookie a sticky session needs on this response, if any."""
        sticky = self.sticky
        if sticky is None or not sticky.needs_cookie(request, upstream):
            return None
        return sticky.set_cookie(upstream)

    def observe(
        self,
        upstream: Upstream,
        outcome: Outcome,
        latency: float,
        now: float,
        request: Request | None = None,
    ) -> None:
        stats = self.stats[upstream.index]
        stats.attempts += 1
        stats.latency.record(latency)
        if outcome is not Outcome.OK:
            stats.failures[outcome.value] = stats.failures.get(outcome.value, 0) + 1
        if self.health.record(upstream, outcome, now):
            log.warning(
                "upstream %s of %s taken out of rotation after %s (%s)",
                upstream.address,
                self.name,
                outcome.value,
                self.health.state_of(upstream, now),
            )
        if self.policy.learns:
            self.policy.observe(upstream, outcome, latency, now, request)

    # -- the clock ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire deadlines in the pools and start the active checks that are due."""
        loop_now = self.loop.time()
        for pool in self.pools:
            pool.sweep(loop_now)
        for stats in self.stats:
            stats.latency.compact()  # bounds the pending observations between scrapes
        if not self.closed:
            try:
                self.policy.maintain(now)
            except Exception:  # a policy's housekeeping failing must not stop the proxy
                log.exception("policy %s of %s failed in maintain()", self.policy.name, self.name)
        if self.health.active is not None and not self.closed:
            for upstream in self.health.due_checks(now):
                task = self.loop.create_task(self._check(upstream))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _check(self, upstream: Upstream) -> None:
        """One active health check: a GET on a fresh connection (a pooled one could hide a
        server that no longer accepts), passed on an expected status within the timeout. It goes
        through the upstream client, so a head over the group's limits, or one that is not
        HTTP/1.x, fails the check instead of being read without bound."""
        active = self.health.active
        assert active is not None
        ok = False
        try:
            status, _ = await fetch(
                self._check_pools[upstream.index],
                active.path,
                _CHECK_HEADERS,
                within=active.timeout,
                max_body=0,
                head_only=True,  # the status is the answer; the body is not read
            )
            ok = active.status_ok(status)
        except (FetchFailed, ValueError):
            ok = False
        if self.closed:
            return
        now = _clock()
        if not ok:
            self.stats[upstream.index].checks_failed += 1
        if self.health.record_check(upstream, ok, now):
            log.warning(
                "upstream %s of %s is %s after an active check",
                upstream.address,
                self.name,
                self.health.state_of(upstream, now),
            )

    def close(self) -> None:
        """Stop checks, close idle connections; requests in flight finish on theirs."""
        if not self.closed:
            try:
                self.policy.close()
            except Exception:  # a policy's persistence failing must not block a reload
                log.exception("policy %s of %s failed to close", self.policy.name, self.name)
        self.closed = True
        for task in list(self._checks):
            task.cancel()
        if self.prober is not None:
            self.prober.close()
        for pool in self.pools:
            pool.close()
        for pool in self._check_pools:
            pool.abort()

    def abort(self) -> None:
        self.close()
        for pool in self.pools:
            pool.abort()


class ProxyRoute:
    """A route's handler: forward each request to ``group``."""

    __slots__ = ("group", "retry_non_idempotent", "trusted")

    def __init__(
        self, group: UpstreamGroup, trusted: TrustedProxies, retry_non_idempotent: bool
    ) -> None:
        self.group = group
        self.trusted = trusted
        self.retry_non_idempotent = retry_non_idempotent

    def __call__(self, request: Request) -> HandlerResult:
        return Forward(self, request).run()


class Proxies:
    """Every upstream group of the running config, their clock, and reloads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, shared: StateStore | None = None) -> None:
        self.loop = loop
        self.shared = shared  # what the workers of a server share (None: one process)
        self.groups: dict[str, UpstreamGroup] = {}
        self.trusted = TrustedProxies([])
        self._retired: list[UpstreamGroup] = []
        self._tick: asyncio.TimerHandle | None = None
        self._interval = 0.25

    def configure(self, config: Config) -> Callable[[RouteConfig], ProxyRoute]:
        """Build the groups of ``config`` (replacing the current ones, which finish their
        requests in flight) and return what makes a route's handler."""
        groups = {
            name: UpstreamGroup(name, uc, self.loop, base_dir=config.base_dir, shared=self.shared)
            for name, uc in config.upstreams.items()
        }
        old = self.groups
        self.groups = groups
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        for group in old.values():
            group.close()
            self._retired.append(group)
        timeouts = [
            t
            for uc in config.upstreams.values()
            for t in (uc.connect_timeout, uc.read_timeout, uc.total_timeout)
            if t > 0
        ]
        # Deadlines are swept, not armed per request: sweep often enough that a timeout fires
        # within a tenth of itself (and at least four times a second).
        self._interval = min([0.25, *(t / 10 for t in timeouts)])
        self._interval = max(self._interval, 0.01)
        if groups and self._tick is None:
            self._schedule()
        trusted = self.trusted

        def route(rc: RouteConfig) -> ProxyRoute:
            assert rc.upstream is not None
            return ProxyRoute(groups[rc.upstream], trusted, rc.retry_non_idempotent)

        return route

    def _schedule(self) -> None:
        self._tick = self.loop.call_later(self._interval, self._on_tick)

    def _on_tick(self) -> None:
        now = _clock()
        for group in self.groups.values():
            group.tick(now)
        if self._retired:
            for group in self._retired:
                group.tick(now)  # their requests in flight still time out
            self._retired = [
                g for g in self._retired if any(p.busy or p.connecting for p in g.pools)
            ]
        self._schedule()

    def metric_families(self) -> Iterator[Metric]:
        """The upstream groups' metrics, for /metrics (see the metrics reference)."""
        labels = ["group", "upstream"]
        attempts = CounterMetricFamily(
            "webtorch_upstream_attempts", "Attempts sent to an upstream server", labels=labels
        )
        failures = CounterMetricFamily(
            "webtorch_upstream_failures",
            "Failed attempts by outcome (server_error, connect_failed, reset, timeout)",
            labels=[*labels, "outcome"],
        )
        inflight = GaugeMetricFamily(
            "webtorch_upstream_inflight", "Requests in flight to an upstream server", labels=labels
        )
        state = GaugeMetricFamily(
            "webtorch_upstream_state",
            "1 for the server's current health state (healthy, unavailable, ejected, "
            "unhealthy, slow_start)",
            labels=[*labels, "state"],
        )
        ejections = CounterMetricFamily(
            "webtorch_upstream_ejections", "Outlier ejections of a server", labels=labels
        )
        checks = CounterMetricFamily(
            "webtorch_upstream_health_checks_failed", "Failed active health checks", labels=labels
        )
        latency = HistogramMetricFamily(
            "webtorch_upstream_response_seconds",
            "Seconds from sending a request upstream to its response head",
            labels=labels,
        )
        connections = GaugeMetricFamily(
            "webtorch_upstream_connections",
            "Pooled connections to a server, by state (idle, busy)",
            labels=[*labels, "state"],
        )
        retries = CounterMetricFamily(
            "webtorch_upstream_retries", "Attempts retried on another server", labels=["group"]
        )
        prediction = GaugeMetricFamily(
            "webtorch_balancer_prediction_error",
            "The learned policy's mean absolute error in predicting log-latency (EWMA)",
            labels=["group"],
        )
        train_steps = CounterMetricFamily(
            "webtorch_balancer_train_steps", "The learned policy's training steps", labels=["group"]
        )
        guard = CounterMetricFamily(
            "webtorch_balancer_guard_backoffs",
            "Times the learned policy's guard rail fell back to its prior (peak-EWMA)",
            labels=["group"],
        )
        now = _clock()
        for name, group in sorted(self.groups.items()):
            retries.add_metric([name], group.retries)
            error = getattr(group.policy, "prediction_error", None)
            if isinstance(error, float):
                prediction.add_metric([name], error)
                train_steps.add_metric([name], getattr(group.policy, "steps", 0))
                guard.add_metric([name], getattr(group.policy, "guard_backoffs", 0))
            for upstream, stats, pool in zip(
                group.upstreams, group.stats, group.pools, strict=True
            ):
                key = [name, upstream.address]
                attempts.add_metric(key, stats.attempts)
                for outcome, count in sorted(stats.failures.items()):
                    failures.add_metric([*key, outcome], count)
                inflight.add_metric(key, upstream.inflight)
                state.add_metric([*key, group.health.state_of(upstream, now)], 1)
                ejections.add_metric(key, group.health.ejections_total(upstream))
                checks.add_metric(key, stats.checks_failed)
                hist = stats.latency
                latency.add_metric(key, hist.buckets(), hist.total)
                connections.add_metric([*key, "idle"], len(pool.idle))
                connections.add_metric([*key, "busy"], len(pool.busy))
        yield from (attempts, failures, inflight, state, ejections, checks, latency)
        yield from (connections, retries, prediction, train_steps, guard)

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for group in [*self.groups.values(), *self._retired]:
            group.abort()
