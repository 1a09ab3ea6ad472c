"""Scenario files: TOML that says which upstreams to simulate, what load to send, and which
balancers to compare. Validated with pydantic as ``config.py`` is; unknown keys are errors.

A minimal scenario::

    duration = 10.0

    [load]
    rate = 300.0

    [[upstreams]]
    count = 3
    service = { median = 0.01, p99 = 0.05 }

Times are seconds since the start of the measured period. ``--duration-scale F`` multiplies the
timeline (duration and fault times), never the service times.
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from webtorch.errors import ConfigError
from webtorch_lab import model

NGINX_VARIANTS = ("round_robin", "least_conn", "random2", "hash")
# What a scenario without a `balancers` list compares: WebTorch's policies, the adaptive ones
# included (a run skips, with a note, any that this WebTorch does not know), and nginx.
DEFAULT_BALANCERS = (
    "webtorch:round_robin",
    "webtorch:least_conn",
    "webtorch:random2",
    "webtorch:peak_ewma",
    "webtorch:prequal",
    "webtorch:learned",
    "nginx:round_robin",
    "nginx:least_conn",
    "nginx:random2",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceSpec(_Strict):
    dist: model.Distribution = "lognormal"
    median: Annotated[float, Field(gt=0)]
    p99: Annotated[float, Field(gt=0)] | None = None  # lognormal: None means 2 x median

    @model_validator(mode="after")
    def _check(self) -> ServiceSpec:
        if self.p99 is not None:
            if self.dist != "lognormal":
                raise ValueError("p99 is for dist = 'lognormal' only")
            if self.p99 <= self.median:
                raise ValueError("p99 must be above the median")
        return self

    def build(self) -> model.ServiceTime:
        return model.ServiceTime(self.dist, self.median, self.p99)


class FaultSpec(_Strict):
    kind: model.FaultKind
    start: Annotated[float, Field(ge=0)] = 0.0
    end: Annotated[float, Field(gt=0)] | None = None  # None: to the end of the run
    factor: Annotated[float, Field(gt=0)] = 1.0  # slow
    delay: Annotated[float, Field(ge=0)] = 0.0  # delay
    status: Annotated[int, Field(ge=100, le=599)] = 503  # error
    error_time: Annotated[float, Field(ge=0)] = 0.001  # error
    share: Annotated[float, Field(gt=0, le=1)] = 1.0  # slow / delay: share of requests hit

    @model_validator(mode="after")
    def _check(self) -> FaultSpec:
        if self.end is not None and self.end <= self.start:
            raise ValueError("a fault's end comes after its start")
        if self.kind == "slow" and self.factor == 1.0:
            raise ValueError('kind = "slow" needs a factor other than 1')
        if self.kind == "delay" and self.delay == 0.0:
            raise ValueError('kind = "delay" needs a delay in seconds')
        return self

    def build(self, scale: float = 1.0) -> model.Fault:
        return model.Fault(
            self.kind,
            self.start * scale,
            math.inf if self.end is None else self.end * scale,
            factor=self.factor,
            delay=self.delay,
            status=self.status,
            error_time=self.error_time,
            share=self.share,
        )


class UpstreamSpec(_Strict):
    """A group of ``count`` identical upstreams, named NAME-0, NAME-1... (NAME alone if one)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")] = "up"
    count: Annotated[int, Field(ge=1, le=200)] = 1
    slots: Annotated[int, Field(ge=1)] = 8
    service: ServiceSpec = Field(default_factory=lambda: ServiceSpec(median=0.01))
    cold_penalty: Annotated[float, Field(ge=0)] = 0.0
    warm_window: Annotated[float, Field(ge=0)] = 0.0
    max_warm: Annotated[int, Field(ge=0)] = 0
    cost_per_kib: Annotated[float, Field(ge=0)] = 0.0
    max_queue: Annotated[int, Field(ge=0)] = 0
    weight: Annotated[int, Field(ge=1, le=1000)] = 1  # told to the balancers
    faults: list[FaultSpec] = []

    def names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.count)]

    def build(self, scale: float = 1.0) -> list[model.UpstreamParams]:
        schedule = model.FaultSchedule(tuple(f.build(scale) for f in self.faults))
        return [
            model.UpstreamParams(
                name=name,
                slots=self.slots,
                service=self.service.build(),
                cold_penalty=self.cold_penalty,
                warm_window=self.warm_window,
                max_warm=self.max_warm,
                cost_per_kib=self.cost_per_kib,
                max_queue=self.max_queue,
                faults=schedule,
            )
            for name in self.names()
        ]


class SizeSpec(_Strict):
    bytes: Annotated[int, Field(ge=0, le=64 * 1024 * 1024)]
    weight: Annotated[float, Field(gt=0)] = 1.0


class LoadSpec(_Strict):
    rate: Annotated[float, Field(gt=0)]  # requests per second
    ramp_to: Annotated[float, Field(gt=0)] | None = None  # linear to this rate at the end
    timeout: Annotated[float, Field(gt=0)] = 1.0  # client side; slower counts as a failure
    path: str = "/work"
    keys: Annotated[int, Field(ge=0, le=100000)] = 0  # 0: no key header
    zipf: Annotated[float, Field(ge=0)] = 1.0  # key popularity exponent (0: uniform)
    key_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+$")] = "x-key"
    sizes: list[SizeSpec] = []  # request bodies; none: GETs

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/") or path.startswith("/health") or path.startswith("/v2"):
            raise ValueError("path starts with '/' and is not /health or /v2/... (the probes)")
        return path

    @property
    def method(self) -> str:
        return "POST" if any(s.bytes for s in self.sizes) else "GET"

    @property
    def peak_rate(self) -> float:
        return max(self.rate, self.ramp_to or 0.0)


class ProxySpec(_Strict):
    """Settings every balancer gets alike (WebTorch's names; nginx's equivalents are used)."""

    connect_timeout: Annotated[float, Field(gt=0)] = 0.25
    read_timeout: Annotated[float, Field(gt=0)] = 0.5
    tries: Annotated[int, Field(ge=1, le=10)] = 2
    max_fails: Annotated[int, Field(ge=0)] = 1
    fail_timeout: Annotated[float, Field(gt=0)] = 10.0
    keepalive: Annotated[int, Field(ge=1)] = 32


class BalancerSpec(_Strict):
    """``"webtorch:POLICY"`` or ``"nginx:VARIANT"`` in TOML, or a table with ``settings``."""

    kind: Literal["webtorch", "nginx"]
    policy: str
    label: str = ""
    # webtorch: more keys for the generated [upstreams.lab] table (e.g. health_check, outlier)
    settings: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_balancer(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> BalancerSpec:
        if self.kind == "nginx" and self.policy not in NGINX_VARIANTS:
            raise ValueError(
                f"nginx:{self.policy}: unknown; nginx variants are {', '.join(NGINX_VARIANTS)}"
            )
        if self.kind == "nginx" and self.settings:
            raise ValueError("settings are for webtorch balancers")
        return self

    @property
    def name(self) -> str:
        return self.label or f"{self.kind}:{self.policy}"


def parse_balancer(text: str) -> dict[str, str]:
    kind, sep, policy = text.strip().partition(":")
    if not sep or kind not in ("webtorch", "nginx") or not policy:
        raise ValueError(f"{text!r}: a balancer is webtorch:POLICY or nginx:VARIANT")
    return {"kind": kind, "policy": policy}


class Scenario(_Strict):
    name: str = ""
    description: str = ""
    duration: Annotated[float, Field(gt=0)]
    warmup: Annotated[float, Field(ge=0)] = 1.0
    seed: int = 1
    load: LoadSpec
    upstreams: Annotated[list[UpstreamSpec], Field(min_length=1)]
    proxy: ProxySpec = Field(default_factory=ProxySpec)
    balancers: list[BalancerSpec] = Field(
        default_factory=lambda: [BalancerSpec.model_validate(b) for b in DEFAULT_BALANCERS]
    )
    # Extra keys for every WebTorch balancer's [upstreams.lab] table (a balancer's own
    # `settings` come on top).
    webtorch: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        names = self.upstream_names()
        if len(set(names)) != len(names):
            raise ValueError("upstreams: two upstreams have the same name")
        labels = [b.name for b in self.balancers]
        if len(set(labels)) != len(labels):
            raise ValueError("balancers: a balancer is listed twice (give one a `label`)")
        return self

    def upstream_names(self) -> list[str]:
        return [name for group in self.upstreams for name in group.names()]

    def params(self, scale: float = 1.0) -> list[model.UpstreamParams]:
        return [p for group in self.upstreams for p in group.build(scale)]

    def fair_shares(self) -> dict[str, float]:
        """Each upstream's share of the total capacity: where a balancer that knew the service
        times would send its traffic, and what "its fair share" means in the report."""
        params = self.params()
        total = sum(p.capacity for p in params)
        return {p.name: p.capacity / total for p in params}

    def group_of(self) -> dict[str, str]:
        return {name: group.name for group in self.upstreams for name in group.names()}

    def fault_windows(self, scale: float = 1.0) -> list[tuple[str, model.Fault]]:
        """(upstream, fault) for every fault, scaled, in order of start."""
        found = [
            (name, fault.build(scale))
            for group in self.upstreams
            for name in group.names()
            for fault in group.faults
        ]
        return sorted(found, key=lambda pair: pair[1].start)


def from_dict(data: dict[str, Any], source: str, stem: str = "") -> Scenario:
    if not data.get("name") and stem:
        data = {**data, "name": stem}
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid scenario"]
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("\n".join(lines)) from None


def load(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, str(path), path.stem)


def shipped_dir() -> Path:
    return Path(str(resources.files("webtorch_lab") / "scenarios"))


def shipped() -> list[Path]:
    """The scenario files that come with WebTorch, by name."""
    return sorted(shipped_dir().glob("*.toml"))


def find(name_or_path: str) -> Path:
    """A scenario file: a path that exists, or the name of a shipped scenario."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = shipped_dir() / f"{name_or_path.removesuffix('.toml')}.toml"
    if candidate.is_file():
        return candidate
    names = ", ".join(p.stem for p in shipped()) or "none"
    raise ConfigError(f"{name_or_path}: no such file, nor a shipped scenario (shipped: {names})")
