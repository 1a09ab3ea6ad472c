"""The settings of an upstream group's health judges (``proxy/health.py``), typed, with the one
copy of their defaults and bounds.

The config's sections are these classes: ``[upstreams.X.outlier]`` is :class:`OutlierSettings`,
``[upstreams.X.health_check]`` is :class:`ActiveSettings`, and ``UpstreamConfig`` extends
:class:`PassiveSettings`, whose two keys sit flat in ``[upstreams.X]`` as nginx writes them. So
what a judge reads is what a config can set, checked in one place with errors that name the
key. Pydantic models, as the policies' settings are (``balance/settings.py``), and so not
compiled; a group reads them when its state changes, not per request. Here in balance/, below
the config, rather than in proxy/ beside the judges: the config imports them, and proxy/ imports
the config.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Settings(BaseModel):
    # As the config's own sections: an unknown key is an error (a typo is not a default).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PassiveSettings(_Settings):
    """nginx's ``max_fails``/``fail_timeout`` (``server ... max_fails=1 fail_timeout=10s``).

    ``max_fails`` failed attempts within any ``fail_timeout`` seconds make the upstream
    unavailable for ``fail_timeout`` seconds; 0 disables the judge.
    """

    max_fails: Annotated[int, Field(ge=0)] = 1
    fail_timeout: Annotated[float, Field(gt=0)] = 10.0


class OutlierSettings(_Settings):
    """Envoy's outlier detection (``consecutive_5xx``, ``consecutive_gateway_failure``, ...).

    A 0 counter threshold disables that detector. ``panic_threshold`` (percent of the group that
    must be available, else every upstream is offered: Envoy's panic mode) belongs to the whole
    health machinery but lives here because Envoy configures it next to outlier detection; 0
    disables panic.
    """

    consecutive_5xx: Annotated[int, Field(ge=0)] = 5
    consecutive_gateway_failure: Annotated[int, Field(ge=0)] = 5
    base_ejection_time: Annotated[float, Field(gt=0)] = 30.0
    max_ejection_time: Annotated[float, Field(gt=0)] = 300.0
    max_ejection_percent: Annotated[float, Field(ge=0, le=100)] = 50.0
    panic_threshold: Annotated[float, Field(ge=0, le=100)] = 50.0

    @property
    def enabled(self) -> bool:
        return self.consecutive_5xx > 0 or self.consecutive_gateway_failure > 0


class ActiveSettings(_Settings):
    """Active health checks: ``GET path`` every ``interval`` seconds (give or take ``jitter`` as a
    fraction of it); a check fails on a status outside ``expect_status`` (inclusive) or no answer
    within ``timeout``. ``fails`` failed checks in a row make the upstream unhealthy, ``passes``
    good ones in a row make it healthy again."""

    path: str = "/health"
    interval: Annotated[float, Field(gt=0)] = 5.0
    timeout: Annotated[float, Field(gt=0)] = 2.0
    fails: Annotated[int, Field(ge=1)] = 2
    passes: Annotated[int, Field(ge=1)] = 2
    # Below 1: a check is never due at once after the last one.
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1
    expect_status: tuple[int, int] = (200, 399)

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        # It goes into a request line as it is.
        if not path.startswith("/") or any(c <= " " or c == "\x7f" for c in path):
            raise ValueError("the health check path starts with '/' and has no spaces or controls")
        return path

    @field_validator("expect_status")
    @classmethod
    def _check_statuses(cls, statuses: tuple[int, int]) -> tuple[int, int]:
        low, high = statuses
        if not 100 <= low <= high <= 599:
            raise ValueError(f"a range of statuses within 100..599, got {low}..{high}")
        return statuses

    def status_ok(self, status: int) -> bool:
        """Whether a check that got ``status`` back passed."""
        return self.expect_status[0] <= status <= self.expect_status[1]
