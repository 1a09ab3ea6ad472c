"""TOML -> typed, validated config. Errors name the file and the key.

The same models are the Python API: ``Config(models={"xor": ModelConfig(path=...)})`` is what a TOML
file becomes. Validation is pydantic's (a library, not hand-written checks); unknown keys are errors
so a typo never silently does nothing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from webtorch.balance.hashing import DEFAULT_BALANCE
from webtorch.balance.settings import (
    SETTINGS,
    LearnedSettings,
    PeakEwmaSettings,
    PolicySettings,
    PrequalSettings,
)
from webtorch.errors import ConfigError
from webtorch.vocab import RETRY_CONDITIONS as CONDITIONS


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# What app.py routes itself; a [[routes]] entry with the same path or prefix would collide.
BUILTIN_ROUTES = frozenset(
    {
        ("path", "/v2"),
        ("path", "/v2/health/load"),  # load reports for balancers (proxy/probe.py)
        ("path", "/metrics"),
        ("path", "/admin/reload"),
        ("path", "/dashboard"),  # the live dashboard page (observe/dashboard.py)
        ("path", "/guard/feedback"),  # labels for the guard's online adaptation
        ("prefix", "/dashboard/"),  # its stats endpoint and static files
        ("prefix", "/v2/"),
        ("prefix", "/v2/repository/"),
        ("prefix", "/models/"),
    }
)


def model_paths(name: str) -> tuple[str, str]:
    """The exact paths a model is served at: its short form and its OIP infer endpoint."""
    return f"/models/{name}/predict", f"/v2/models/{name}/infer"


def train_paths(name: str) -> tuple[str, str]:
    """The exact paths a trainable model learns at: the short form and the OIP extension."""
    return f"/models/{name}/train", f"/v2/models/{name}/train"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# A web origin as browsers send it in `Origin` (no path, no trailing slash, no userinfo).
_ORIGIN = re.compile(
    r"https?://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?", re.IGNORECASE
)

# Model names become URL path segments and file names in the model directory.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TLSConfig(_Strict):
    cert: Path
    key: Path


class LimitsConfig(_Strict):
    max_url: Annotated[int, Field(gt=0)] = 8 * 1024
    max_header_bytes: Annotated[int, Field(gt=0)] = 32 * 1024
    max_headers: Annotated[int, Field(gt=0)] = 100
    max_body: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    header_timeout: Annotated[float, Field(gt=0)] = 10.0
    body_timeout: Annotated[float, Field(gt=0)] = 60.0
    keepalive_timeout: Annotated[float, Field(gt=0)] = 75.0
    max_pipeline: Annotated[int, Field(gt=0)] = 64
    drain_timeout: Annotated[float, Field(gt=0)] = 30.0
    # Client connections open at once (nginx's worker_connections), lowered at start to what
    # the file descriptor limit (ulimit -n) leaves room for.
    max_connections: Annotated[int, Field(gt=0)] = 4096


class AccessLogConfig(_Strict):
    """One JSON line per request, written by a background thread (observe/access_log.py)."""

    # A file (relative to the config's directory; reopened on SIGUSR1, for logrotate) or "-"
    # for standard output.
    path: Annotated[str, Field(min_length=1)]
    # The share of requests logged (5xx answers always are).
    sample: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Lines queued for the writer at most; beyond, lines are dropped and counted, never waited
    # for (a slow disk must not slow serving).
    buffer: Annotated[int, Field(ge=1)] = 10000


class MasterConfig(_Strict):
    """How the master process of ``server.workers > 1`` watches its workers (webtorch/workers/)."""

    # A worker whose event loop has not ticked for this long is stuck: SIGKILLed and replaced.
    heartbeat_timeout: Annotated[float, Field(gt=0)] = 10.0
    # A worker may take this long to load its models and listen (torch's import alone can take
    # most of a minute on a busy machine); past it, it is killed and counts as a failed start.
    start_timeout: Annotated[float, Field(gt=0)] = 300.0
    # A worker that dies is started again after restart_delay, doubled per failure in a row up to
    # restart_delay_max; one that ran stable_after seconds ends the row.
    restart_delay: Annotated[float, Field(ge=0)] = 0.1
    restart_delay_max: Annotated[float, Field(ge=0)] = 10.0
    stable_after: Annotated[float, Field(gt=0)] = 30.0
    # On SIGTERM, workers get limits.drain_timeout plus this to exit before they are SIGKILLed.
    stop_timeout: Annotated[float, Field(gt=0)] = 10.0
    # How workers share the port: "shared", one listening socket the master opens and every
    # worker accepts from, or "reuseport", a socket per worker with SO_REUSEPORT (the kernel
    # spreads connections by a hash). BENCHMARKS.md ("Workers") has the numbers behind the
    # default.
    listen_socket: Literal["shared", "reuseport"] = "reuseport"


def _networks(networks: list[str]) -> list[str]:
    """``networks`` if each is an address or CIDR block; else the error names the bad one."""
    for cidr in networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not an IP address or CIDR block") from None
    return networks


class ServerConfig(_Strict):
    listen: str = "127.0.0.1:8080"
    tls: TLSConfig | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Bearer token for training and management endpoints; `token_env` names an environment
    # variable holding it, so the secret need not sit in a file that is checked in.
    token: str | None = Field(default=None, min_length=16, repr=False)
    token_env: str | None = None
    # The model repository endpoints (/v2/repository/...: list, load, reload, unload models) and
    # POST /admin/reload (re-read the config's upstreams and routes); off unless enabled,
    # token-protected when a token is set.
    management: bool = False
    # Web origins (scheme://host[:port]) whose pages may train and manage, like the server's own
    # pages. From any other origin a state-changing request is refused (403): CSRF protection,
    # token or not. Needed only for a browser app served from elsewhere.
    allowed_origins: list[str] = []
    # Proxies whose X-Forwarded-For / -Proto / -Host are believed (addresses or CIDR blocks);
    # from anyone else those headers are replaced, never extended.
    trusted_proxies: list[str] = []
    # The only directory `POST /v2/repository/models/{m}/load` loads model files ({m}.py) from.
    model_dir: Path | None = None
    # The live dashboard at /dashboard and its JSON stats at /dashboard/stats; token-protected
    # when a token is set. It shows traffic, not data, so it is on by default, as /metrics is.
    dashboard: bool = True
    # The access log; absent: none.
    access_log: AccessLogConfig | None = None
    # Give every request an id (the client's X-Request-Id when sane, else a new one), send it to
    # upstreams and answer it as X-Request-Id.
    request_id: bool = True
    # Processes that serve: 1 serves in this process; N > 1 (or "auto": the usable cores) starts
    # a master that runs N workers on the one port (ARCHITECTURE.md, "Processes").
    workers: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    master: MasterConfig = Field(default_factory=MasterConfig)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str) -> str:
        parse_listen(listen)  # a field validator, so the error names server.listen
        return listen

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        normalized = []
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not a web origin: scheme://host[:port], no path "
                    "(e.g. https://app.example.com)"
                )
            normalized.append(origin.lower())
        return normalized

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, proxies: list[str]) -> list[str]:
        return _networks(proxies)

    @model_validator(mode="after")
    def _check_token(self) -> ServerConfig:
        if self.token is not None and self.token_env is not None:
            raise ValueError("set one of `token` or `token_env`, not both")
        if self.token_env is not None and len(os.environ.get(self.token_env, "")) < 16:
            raise ValueError(
                f"token_env: environment variable {self.token_env} is unset or shorter than "
                "16 characters"
            )
        return self

    @property
    def worker_count(self) -> int:
        """``workers``, with "auto" as the CPUs this process may run on."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers

    @property
    def bearer_token(self) -> str | None:
        if self.token_env is not None:
            return os.environ.get(self.token_env)
        return self.token


class TrainConfig(_Strict):
    """Online training of one model over HTTP; off unless ``enabled``."""

    enabled: bool = False
    max_batch: Annotated[int, Field(ge=1)] = 64  # rows merged into one optimizer step
    max_queue: Annotated[int, Field(ge=1)] = 65536  # rows queued before 503
    # wal: every micro-batch is fsynced before its step and its answers; checkpoint: periodic
    # checkpoints only; none: nothing persisted.
    durability: Literal["wal", "checkpoint", "none"] = "wal"
    # Relative to the config file's directory; default: webtorch-state/<model> in the working
    # directory (the embedded default's directory may be read-only site-packages).
    state_dir: Path | None = None
    # Bound the replay after a crash: it reruns every step since the last checkpoint.
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 10000  # 0: not by steps
    checkpoint_every_seconds: Annotated[float, Field(ge=0)] = 60.0  # 0: not by time
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2  # the WAL is kept from the oldest on
    # Train requests with an Idempotency-Key header answered (and applied) once: a retry gets
    # the first answer. The newest this many keys are remembered (in checkpoints and the WAL).
    idempotency_keys: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    # inference: a queued inference batch runs before a ready training step (which then waits for
    # at most one inference batch, so training slows under load but never stops); fifo: the
    # older of the two goes first.
    priority: Literal["inference", "fifo"] = "inference"


class ModelConfig(_Strict):
    path: Path
    device: str = "cpu"
    # A safetensors file; None: the file beside the model with the .safetensors suffix if it
    # exists; false: start from the network's own initialisation.
    weights: Path | Literal[False] | None = None
    max_batch: Annotated[int, Field(ge=1)] = 256
    max_delay: Annotated[float, Field(ge=0)] = 0.0  # seconds an idle model waits to fill a batch
    max_queue: Annotated[int, Field(ge=1)] = 65536  # rows queued before 503
    compute: Literal["loop", "thread"] = "loop"
    train: TrainConfig = Field(default_factory=TrainConfig)


class ServerEntry(_Strict):
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


class OutlierConfig(_Strict):
    """Envoy-style outlier ejection; a counter at 0 is off."""

    consecutive_5xx: Annotated[int, Field(ge=0)] = 5
    consecutive_gateway_failure: Annotated[int, Field(ge=0)] = 5
    base_ejection_time: Annotated[float, Field(gt=0)] = 30.0
    max_ejection_time: Annotated[float, Field(gt=0)] = 300.0
    max_ejection_percent: Annotated[float, Field(ge=0, le=100)] = 50.0
    # Below this percentage of available servers, balance over all of them (Envoy's panic mode).
    panic_threshold: Annotated[float, Field(ge=0, le=100)] = 50.0


class HealthCheckConfig(_Strict):
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


class RetryConfig(_Strict):
    """nginx's proxy_next_upstream, plus a retry budget so retries cannot amplify an outage."""

    tries: Annotated[int, Field(ge=0)] = 3  # attempts in all, the first included; 0: no limit
    on: list[str] = ["error", "timeout", "http_502", "http_503", "http_504"]
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


class StickyConfig(_Strict):
    """Sticky sessions by cookie, as nginx's ``sticky cookie``."""

    cookie: str = "webtorch_route"
    expires: Annotated[float, Field(gt=0)] | None = None  # seconds; None: a session cookie
    domain: str | None = None
    path: str = "/"
    httponly: bool = True
    secure: bool = False
    samesite: Literal["Strict", "Lax", "None"] | None = None


class UpstreamConfig(_Strict):
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


class RouteConfig(_Strict):
    """An exact ``path`` or a ``prefix``, answered by a model's short form, a fixed response or
    an upstream group (proxied)."""

    path: str | None = None
    prefix: str | None = None
    model: str | None = None
    return_: int | None = Field(default=None, alias="return", ge=100, le=599)
    upstream: str | None = None
    body: str = ""
    content_type: str = "text/plain"
    # Proxied routes stream request bodies, so their size limit is their own (nginx's
    # client_max_body_size); None: server.limits.max_body.
    max_body: Annotated[int, Field(ge=0)] | None = None
    # Retry POST, PATCH... after they were sent (nginx: proxy_next_upstream non_idempotent).
    retry_non_idempotent: bool = False

    @model_validator(mode="after")
    def _check(self) -> RouteConfig:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("a route needs exactly one of `path` or `prefix`")
        where = self.path if self.path is not None else self.prefix
        assert where is not None
        if not where.startswith("/"):
            raise ValueError("`path` and `prefix` start with '/'")
        targets = [t for t in (self.model, self.return_, self.upstream) if t is not None]
        if len(targets) != 1:
            raise ValueError("a route needs exactly one of `model`, `return` or `upstream`")
        if self.upstream is None and (self.max_body is not None or self.retry_non_idempotent):
            raise ValueError("`max_body` and `retry_non_idempotent` are for `upstream` routes")
        return self


class GuardConfig(_Strict):
    """[guard]: every request scored for abuse and injection before its handler (guard/)."""

    # "monitor" scores, counts and logs what the guard would do and lets everything through (the
    # way to roll it out, as ModSecurity's DetectionOnly); "enforce" throttles and blocks.
    mode: Literal["monitor", "enforce"] = "monitor"
    # The detector's weights (safetensors, from `webtorch guard train`); default: the model
    # shipped with WebTorch. "none": no detector, only the lists, bans and limits below.
    model: str | None = None
    # Who a client is: its address ("ip"), or a request header such as "header:x-api-key".
    client_key: str = "ip"
    # Scores in [0, 1]: an abuse score at `throttle` answers 429; an injection or abuse score at
    # `block` answers 403. The default block threshold is the shipped detector's calibrated one:
    # `webtorch guard train` holds a fifth of the training corpus's benign clients out of
    # training and sets it where at most 0.1 % of their requests would be blocked (0.9986,
    # printed and kept in the weights' metadata). Never tuned on the test
    # split: GUARD_RESULTS.md reports what it does there.
    throttle: Annotated[float, Field(ge=0, le=1)] = 0.5
    block: Annotated[float, Field(ge=0, le=1)] = 0.9986
    # A block bans the client for this many seconds (0: no bans).
    ban_seconds: Annotated[float, Field(ge=0)] = 0.0
    # Per-client token bucket (nginx limit_req with nodelay): requests/s, and the bucket's size
    # (0: rate). 0 turns it off.
    rate: Annotated[float, Field(ge=0)] = 0.0
    burst: Annotated[float, Field(ge=0)] = 0.0
    # Open connections per client address (0: no cap).
    max_connections: Annotated[int, Field(ge=0)] = 0
    # Surge defence (guard/surge.py): while the server's whole request rate is above
    # `surge_factor` x its recent baseline and above `surge_min_rate` requests/s, clients first
    # seen just before or during the surge get `surge_rate` requests/s each (0 turns it off);
    # clients that were here before keep `rate`.
    surge_rate: Annotated[float, Field(ge=0)] = 0.0
    surge_factor: Annotated[float, Field(gt=1)] = 4.0
    surge_min_rate: Annotated[float, Field(gt=0)] = 1000.0
    # Clients whose recent history is kept (least recently seen forgotten first); also the
    # most bans held at once.
    max_clients: Annotated[int, Field(gt=0)] = 100_000
    # With client_key = "header:...": client keys new to the guard per second from one address,
    # and their burst (a token bucket of the address). Past it, requests bearing new keys get
    # 429: rotating keys cannot dodge `rate` nor grow the client table.
    new_keys_rate: Annotated[float, Field(gt=0)] = 10.0
    new_keys_burst: Annotated[float, Field(ge=1)] = 100.0
    # Request bodies that carry parameters (forms, JSON, multipart fields, text and XML), proxied
    # ones included as they stream, are scanned value by value up to this many bytes each
    # (0: only the first KiB the detector reads); past it the rest is let through unread
    # ("stop") or the request is refused with 403 ("refuse").
    body_scan_bytes: Annotated[int, Field(ge=0, le=1 << 30)] = 65536
    body_scan_over: Literal["stop", "refuse"] = "stop"
    # Addresses or CIDR blocks never checked, and always refused.
    allow: list[str] = []
    deny: list[str] = []
    # Online adaptation: POST /guard/feedback (a management endpoint) labels recent requests by
    # request id; every `feedback_batch` labels the detector is fine-tuned off the event loop,
    # and the adapted weights are kept in `state_dir` (default webtorch-state/guard in the
    # working directory), which a restart loads.
    feedback: bool = False
    feedback_batch: Annotated[int, Field(ge=1)] = 8
    state_dir: str | None = None

    @field_validator("allow", "deny")
    @classmethod
    def _check_networks(cls, networks: list[str]) -> list[str]:
        return _networks(networks)

    @field_validator("client_key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        if key != "ip" and not (key.startswith("header:") and len(key) > len("header:")):
            raise ValueError(f'{key!r}: use "ip" or "header:NAME"')
        return key

    @model_validator(mode="after")
    def _check_thresholds(self) -> GuardConfig:
        if self.throttle > self.block:
            raise ValueError("throttle must not be above block")
        return self


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: dict[str, ModelConfig] = {}
    upstreams: dict[str, UpstreamConfig] = {}
    routes: list[RouteConfig] = []
    # The request guard; absent: off.
    guard: GuardConfig | None = None
    # Directory that relative paths in the file are resolved against.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _check_refs(self) -> Config:
        seen: dict[tuple[str, str | None], int] = {}
        served = {path for name in self.models for path in (*model_paths(name), *train_paths(name))}
        for i, route in enumerate(self.routes):
            if route.path in served:
                raise ValueError(f"routes[{i}].path: {route.path!r} is a model's built-in route")
            if route.model is not None and route.model not in self.models:
                raise ValueError(f"routes[{i}].model: no model named {route.model!r}")
            if route.upstream is not None and route.upstream not in self.upstreams:
                raise ValueError(f"routes[{i}].upstream: no upstream named {route.upstream!r}")
            key = ("path", route.path) if route.path is not None else ("prefix", route.prefix)
            if key in BUILTIN_ROUTES:
                raise ValueError(f"routes[{i}].{key[0]}: {key[1]!r} is a built-in route")
            if key in seen:
                raise ValueError(f"routes[{i}].{key[0]}: {key[1]!r} repeats routes[{seen[key]}]")
            seen[key] = i
        for name in self.models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(f"models.{name}: invalid model name (letters, digits, _ . -)")
        problem = self.exposure_problem(parse_listen(self.server.listen)[0])
        if problem is not None:
            raise ValueError(problem)
        problem = self.workers_problem()
        if problem is not None:
            raise ValueError(problem)
        return self

    def workers_problem(self) -> str | None:
        """What several workers cannot serve yet, if the config asks for it (issue 22): the
        repository API and /admin/reload would change the one worker a request reaches.
        (Training is served: one worker trains each model, the others forward to it.)"""
        count = self.server.worker_count
        if count <= 1:
            return None
        if self.server.management:
            return (
                f"server.workers: the management endpoints would load, unload and reload in the "
                f"one worker of {count} that a request reaches (issue 22); serve with "
                "workers = 1, or set management = false (SIGHUP reloads every worker)"
            )
        return None

    def exposure_problem(self, host: str) -> str | None:
        """Why serving on ``host`` would let anyone on the network train the models, if it does.
        Checked at validation and again at start, where ``--listen`` may have changed the host."""
        if self.server.bearer_token is not None or is_loopback(host):
            return None
        training = [name for name, mc in self.models.items() if mc.train.enabled]
        if training:
            return (
                f"server.token: training is enabled for {', '.join(training)} and the server "
                f"listens on {host}, beyond this machine: set server.token (or token_env) so "
                "that only holders of the token can change the model"
            )
        if self.server.management:
            return (
                f"server.token: the management endpoints are enabled and the server listens on "
                f"{host}, beyond this machine: set server.token (or token_env) so that only "
                "holders of the token can load and unload models"
            )
        return None

    def weights(self, model: ModelConfig) -> Path | Literal[False] | None:
        """A model's ``weights`` setting with a path resolved against the config's directory."""
        if isinstance(model.weights, Path):
            return self.resolve(model.weights)
        return model.weights

    def state_dir(self, name: str, model: ModelConfig) -> Path:
        """Where a model's WAL and checkpoints live."""
        configured = model.train.state_dir
        if configured is None:
            return Path.cwd() / "webtorch-state" / name
        return self.resolve(configured)

    def access_log_path(self) -> Path | None:
        """The access log's file, resolved; None for standard output or no access log."""
        access_log = self.server.access_log
        if access_log is None or access_log.path == "-":
            return None
        return self.resolve(Path(access_log.path))

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir / path


# The [server] keys a reload applies to the running server; a change to any other key (listen,
# tls, access_log, trusted_proxies, workers, and keys added later unless listed here) needs a
# restart, and a reload that finds one refuses the whole file rather than half-apply it.
RELOADABLE: frozenset[str] = frozenset(
    {
        "token",  # token and token_env: the one Auth every endpoint, the dashboard and the
        "token_env",  # guard share is reconfigured in place
        "allowed_origins",
        "management",
        "dashboard",
        "limits",  # new connections get the new limits (open ones keep theirs); the cap at once
        "request_id",
        "model_dir",
    }
)


class RestartRequired(ConfigError):
    """A reloaded file changes [server] settings that only a restart applies."""


def server_changes(old: ServerConfig, new: ServerConfig) -> list[str]:
    """The [server] keys whose values differ (token_env by the token it names)."""
    changed = [
        name for name in ServerConfig.model_fields if getattr(old, name) != getattr(new, name)
    ]
    if "token_env" not in changed and old.bearer_token != new.bearer_token:
        changed.append("token_env")
    return sorted(changed)


def reloaded(
    old: Config,
    new: Config,
    source: Path,
    *,
    models: Iterable[str],
    keep_listen: bool,
    host: str | None = None,
) -> tuple[Config, list[str]]:
    """``new`` (read from ``source``) as a reload of the running ``old`` applies it, with the
    [server] keys it changes; raises ConfigError (RestartRequired) naming what it cannot apply.
    ``models``: those loaded; ``keep_listen``: ``serve --listen`` overrode the file's listen,
    so the reload keeps it as the start did; ``host``: the address served. The one check both
    a single server (app.py) and the master of several workers make."""
    missing = sorted({rc.model for rc in new.routes if rc.model is not None} - set(models))
    if missing:
        raise ConfigError(f"{source}: routes name models that are not loaded: {missing}")
    server = new.server
    if keep_listen:
        server = server.model_copy(update={"listen": old.server.listen})
    changed = server_changes(old.server, server)
    restart = [key for key in changed if key not in RELOADABLE]
    if restart:
        raise RestartRequired(
            f"{source}: [server] {', '.join(restart)} changed, which only a restart "
            "applies; nothing was reloaded (restart, or undo the change and reload)"
        )
    new = new.model_copy(update={"server": server})
    problem = new.exposure_problem(host if host is not None else parse_listen(server.listen)[0])
    if problem is not None:
        raise ConfigError(problem)
    return new, changed


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def from_dict(
    data: dict[str, object], source: str = "<config>", base_dir: Path = Path(".")
) -> Config:
    try:
        return Config.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def load(path: Path) -> Config:
    return loads(read(path), path)


def read(path: Path) -> str:
    """A config file's text (ConfigError when there is none)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None


def loads(text: str, path: Path) -> Config:
    """``text``, read from ``path`` (what errors name, and the directory paths are relative to):
    the master reads a file once and hands its workers the text it validated."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "base_dir" in data:
        raise ConfigError(f"{path}: base_dir: unknown key")
    return from_dict(data, str(path), path.resolve().parent)


def default_config_path() -> Path:
    """The embedded default: the bundled XOR example."""
    return Path(str(resources.files("webtorch.examples") / "xor.toml"))


def load_default() -> Config:
    return load(default_config_path())
