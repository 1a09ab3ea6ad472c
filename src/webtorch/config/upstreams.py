"""``[upstreams.NAME]``: a group of servers that proxy routes forward to; its policy, pools,
health, retries and sticky sessions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from webtorch.balance.hashing import DEFAULT_BALANCE
from webtorch.balance.settings import (
    SETTINGS,
    LearnedSettings,
    PeakEwmaSettings,
    PolicySettings,
    PrequalSettings,
)
from webtorch.config.base import Strict, parse_listen
from webtorch.vocab import RETRY_CONDITIONS as CONDITIONS


class ServerEntry(Strict):
    """One server of an upstream group; a bare "host:port" string in TOML means weight 1."""

    address: str
    weight: Annotated[int, Field(ge=1, le=1000)] = 1

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        _, port = parse_listen(address)
        if port == 0:
            raise ValueError(f"upstream address needs a port, got {address!r}")
        return address


class OutlierConfig(Strict):
    """Envoy-style outlier ejection; a counter at 0 is off."""

    consecutive_5xx: Annotated[int, Field(ge=0)] = 5
    consecutive_gateway_failure: Annotated[int, Field(ge=0)] = 5
    base_ejection_time: Annotated[float, Field(gt=0)] = 30.0
    max_ejection_time: Annotated[float, Field(gt=0)] = 300.0
    max_ejection_percent: Annotated[float, Field(ge=0, le=100)] = 50.0
    # Below this percentage of available servers, balance over all of them (Envoy's panic mode).
    panic_threshold: Annotated[float, Field(ge=0, le=100)] = 50.0


class HealthCheckConfig(Strict):
    """Active health checks: a GET to ``path`` on every server each ``interval`` seconds."""

    path: str = "/health"
    interval: Annotated[float, Field(gt=0)] = 5.0
    timeout: Annotated[float, Field(gt=0)] = 2.0
    fails: Annotated[int, Field(ge=1)] = 2
    passes: Annotated[int, Field(ge=1)] = 2
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1  # a fraction of the interval

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("the health check path starts with '/'")
        return path


class RetryConfig(Strict):
    """nginx's proxy_next_upstream, plus a retry budget so retries cannot amplify an outage."""

    tries: Annotated[int, Field(ge=0)] = 3  # attempts in all, the first included; 0: no limit
    on: list[str] = Field(
        default_factory=lambda: ["error", "timeout", "http_502", "http_503", "http_504"]
    )
    timeout: Annotated[float, Field(ge=0)] = 0.0  # total time spent trying; 0: no limit
    budget_percent: Annotated[float, Field(ge=0)] = 20.0
    budget_min_per_second: Annotated[float, Field(ge=0)] = 5.0
    budget_window: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("on")
    @classmethod
    def _check_on(cls, on: list[str]) -> list[str]:
        unknown = sorted(set(on) - CONDITIONS)
        if unknown:
            raise ValueError(
                f"unknown retry condition(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(CONDITIONS))}"
            )
        return on


class StickyConfig(Strict):
    """Sticky sessions by cookie, as nginx's ``sticky cookie``."""

    cookie: str = "webtorch_route"
    expires: Annotated[float, Field(gt=0)] | None = None  # seconds; None: a session cookie
    domain: str | None = None
    path: str = "/"
    httponly: bool = True
    secure: bool = False
    samesite: Literal["Strict", "Lax", "None"] | None = None


class UpstreamConfig(Strict):
    """A group of servers that proxy routes forward to, and how to pick and pool them."""

    servers: Annotated[list[ServerEntry], Field(min_length=1)]
    policy: str = "round_robin"
    # For policy = "hash": header:NAME | cookie:NAME | path:N | query:NAME | client_ip
    hash_key: str | None = None
    # Bounded loads: cap = (1 + this) x avg.
    hash_balance: Annotated[float, Field(gt=0)] = DEFAULT_BALANCE
    sticky: StickyConfig | None = None
    # Settings of the adaptive policies (used when `policy` names them): the policies' own
    # classes (balance/settings.py), so there is one copy of each default and bound, and what a
    # policy reads is what a config can set.
    peak_ewma: PeakEwmaSettings = Field(default_factory=PeakEwmaSettings)
    prequal: PrequalSettings = Field(default_factory=PrequalSettings)
    learned: LearnedSettings = Field(default_factory=LearnedSettings)
    # Connection pool, per server.
    keepalive: Annotated[int, Field(ge=0)] = 32  # idle connections kept
    max_connections: Annotated[int, Field(ge=0)] = 0  # open at once; 0: no limit
    idle_timeout: Annotated[float, Field(gt=0)] = 60.0
    max_requests_per_connection: Annotated[int, Field(ge=0)] = 1000  # 0: no limit
    # Timeouts: connect; read (between two reads of the response, as nginx's
    # proxy_read_timeout); total (the whole attempt, 0: none).
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 60.0
    total_timeout: Annotated[float, Field(ge=0)] = 0.0
    # Bounds on a response's head (status line, headers and interim 1xx heads), nginx's
    # proxy_buffer_size: above either the client gets a 502 and the upstream is logged.
    max_response_header_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    max_response_headers: Annotated[int, Field(gt=0)] = 100
    # Passive health, nginx's max_fails / fail_timeout (max_fails = 0: off).
    max_fails: Annotated[int, Field(ge=0)] = 1
    fail_timeout: Annotated[float, Field(gt=0)] = 10.0
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    health_check: HealthCheckConfig | None = None
    slow_start: Annotated[float, Field(ge=0)] = 0.0  # seconds a recovered server ramps up
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("servers", mode="before")
    @classmethod
    def _bare_addresses(cls, servers: object) -> object:
        if isinstance(servers, list):
            return [{"address": s} if isinstance(s, str) else s for s in servers]
        return servers

    def policy_settings(self) -> PolicySettings | None:
        """The section of the policy this group uses (``[upstreams.X.<policy>]``), if it has
        settings of its own."""
        if self.policy not in SETTINGS:
            return None
        own: PolicySettings = getattr(self, self.policy)
        return own

    @model_validator(mode="after")
    def _check_policy(self) -> UpstreamConfig:
        from webtorch.balance.hashing import KeySpec
        from webtorch.balance.registry import POLICIES

        if self.policy not in POLICIES:
            raise ValueError(
                f"policy: unknown policy {self.policy!r}; known: {', '.join(sorted(POLICIES))}"
            )
        if self.policy == "hash" and self.hash_key is None:
            raise ValueError('hash_key: policy = "hash" needs a hash_key')
        if self.hash_key is not None:
            try:
                KeySpec.parse(self.hash_key)
            except ValueError as exc:
                raise ValueError(f"hash_key: {exc}") from None
        addresses = [s.address for s in self.servers]
        if len(set(addresses)) != len(addresses):
            raise ValueError("servers: an address is listed twice")
        return self
