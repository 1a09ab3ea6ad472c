"""``[upstreams.NAME]``: a group of servers that proxy routes forward to; its policy, pools,
health, retries and sticky sessions."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from webtorch.balance.hashing import DEFAULT_BALANCE
from webtorch.balance.health_settings import ActiveSettings, OutlierSettings, PassiveSettings
from webtorch.balance.settings import (
    SETTINGS,
    LearnedSettings,
    PeakEwmaSettings,
    PolicySettings,
    PrequalSettings,
    StickySettings,
)
from webtorch.config.base import Strict, parse_listen
from webtorch.http.client.settings import PoolSettings
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


# Sticky sessions by cookie: the cookie's own settings class (balance/settings.py), so there is
# one copy of each default, and its values are checked by building the cookie (_check_policy).
StickyConfig = StickySettings


class UpstreamConfig(Strict, PoolSettings, PassiveSettings):
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
    # The connection pool's keys (keepalive, timeouts, response head bounds) are PoolSettings',
    # and max_fails / fail_timeout (nginx's passive health) PassiveSettings': this class
    # extends both, so they sit flat in [upstreams.X] with their one copy of the defaults.
    outlier: OutlierSettings = Field(default_factory=OutlierSettings)
    health_check: ActiveSettings | None = None
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
        from webtorch.balance.sticky import StickyCookie

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
        if self.sticky is not None:
            try:
                StickyCookie(self.sticky)
            except ValueError as exc:
                raise ValueError(f"sticky: {exc}") from None
        addresses = [s.address for s in self.servers]
        if len(set(addresses)) != len(addresses):
            raise ValueError("servers: an address is listed twice")
        return self
