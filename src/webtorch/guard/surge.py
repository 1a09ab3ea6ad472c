"""Surge detection: the server's whole request rate against its own recent baseline. Sans-IO.

Why a server-wide signal: a flood spread over many addresses keeps each one under a per-address
bucket for as long as the bucket's burst lasts (nginx's ``limit_req`` with ``burst = 40`` lets
each of 200 flooding addresses send 40 requests before the first 429, and 20/s each after),
and nothing about one address's first second tells it from a browser loading a page. What does
give it away at once is the sum: thousands of requests a second where there were hundreds, most
of them from addresses that were not here a moment ago.

So the guard keeps the rate of all requests in short windows, and a baseline of it (a plain
mean over a warm-up of the first seconds, then a slow exponential one). A surge begins the
moment the current window's count passes ``max(factor x baseline, min_rate)`` (per second),
mid-window if need be, so a flood is caught after a fraction of a window, not at its end; it
ends once the rate has stayed under half that for ``hold`` seconds.
While it lasts the guard holds clients first seen shortly before or during it to a much lower
rate (``core.Guard``); clients that were here before it keep their usual bucket. The baseline
does not learn from a surge, or a long flood would become the new normal.
"""

from __future__ import annotations

import math


class SurgeDetector:
    def __init__(
        self,
        factor: float,
        min_rate: float,
        window: float = 0.25,
        baseline_time: float = 30.0,
        hold: float = 2.0,
        warmup: float = 2.0,
    ) -> None:
        self.factor = factor
        self.min_rate = min_rate
        self.window = window
        self.hold = hold
        self.baseline = 0.0  # requests/s, an EWMA over calm windows
        self._baseline_time = baseline_time
        self._alpha = 1.0 - math.exp(-window / baseline_time)
        self.began: float | None = None  # when the surge now under way began; None: calm
        self.surges = 0  # surges seen since start
        # No surge is declared in the first `warmup` seconds: a server started under its usual
        # load must learn that load first, not take it for a flood of new clients.
        self._warm = math.inf  # when the warm-up ends (set by the first request)
        self._warmup = warmup
        self._calm_windows = 0
        self._start: float | None = None  # the current window's start
        self._count = 0
        self._calm_since: float | None = None

    @property
    def threshold(self) -> float:
        """Requests/s above which the traffic is a surge."""
        return max(self.factor * self.baseline, self.min_rate)

    @property
    def active(self) -> bool:
        return self.began is not None

    def arrive(self, now: float) -> bool:
        """Count a request arriving at ``now``; whether a surge is under way."""
        start = self._start
        if start is None:
            start = self._start = now
            self._warm = now + self._warmup
        elif now - start >= self.window:
            self._close(now - start, now)
            start = self._start = now
        self._count += 1
        if self.began is None and self._count > self.threshold * self.window and now >= self._warm:
            # Already more requests in this window than a whole calm one may hold.
            self.began = now
            self.surges += 1
            self._calm_since = None
        return self.began is not None

    def _close(self, elapsed: float, now: float) -> None:
        rate = self._count / elapsed
        self._count = 0
        if self.began is None:
            if elapsed > 4 * self.window:  # an idle spell: the windows it had no requests in
                self.baseline *= math.exp(-elapsed / self._baseline_time)
            # A plain mean over the first windows (so the baseline is right after the warm-up),
            # an exponential one after.
            self._calm_windows += 1
            self.baseline += max(self._alpha, 1.0 / self._calm_windows) * (rate - self.baseline)
            return
        if rate < self.threshold / 2:
            if self._calm_since is None:
                self._calm_since = now - elapsed
            if now - self._calm_since >= self.hold:
                self.began = None
                self._calm_since = None
        else:
            self._calm_since = None
