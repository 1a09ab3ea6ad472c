"""The settings of the policies that have some, typed, with the one copy of their defaults.

``[upstreams.X.peak_ewma]``, ``.prequal`` and ``.learned`` in the config are these classes
(``config.py`` names them as its fields), and each policy takes its own class whole, so a
setting a policy reads is a setting the config accepts, checked and defaulted in one place.
Built without the config they are the policies' defaults: ``PeakEwma(group)`` is
``PeakEwma(group, PeakEwmaSettings())``. Here rather than beside each policy so that the config
can import them without torch (``learned.py`` imports it). :class:`StickySettings` is the same
for sticky sessions' cookie (``sticky.py``, ``[upstreams.X.sticky]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Settings(BaseModel):
    # As the config's own sections: an unknown key is an error (a typo is not a default).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PeakEwmaSettings(_Settings):
    """``policy = "peak_ewma"`` (Finagle / Linkerd)."""

    decay_time: Annotated[float, Field(gt=0)] = 10.0  # seconds for the EWMA to forget a peak
    # What an upstream with no observation yet is assumed to cost (pessimistic, as Finagle).
    initial_latency: Annotated[float, Field(gt=0)] = 1.0


class PrequalSettings(_Settings):
    """``policy = "prequal"`` (Google's Prequal, NSDI 2024): probes feed a small pool.
    ``probe_path`` and ``probe_timeout`` are the prober's (``proxy/probe.py``), the rest the
    policy's."""

    probe_path: str = "/v2/health/load"  # WebTorch upstreams answer it; others fall back
    probes_per_request: Annotated[float, Field(ge=0)] = 1.0  # probe rate per request picked
    pool_size: Annotated[int, Field(ge=1)] = 16
    max_age: Annotated[float, Field(gt=0)] = 1.0  # seconds a probe result may be used
    max_reuse: Annotated[int, Field(ge=1)] = 3  # picks one probe result may serve
    hot_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.84  # in-flight above it: hot
    probe_timeout: Annotated[float, Field(gt=0)] = 0.5

    @field_validator("probe_path")
    @classmethod
    def _check_probe_path(cls, path: str) -> str:
        # It goes into a request line as it is.
        if not path.startswith("/") or any(c <= " " or c == "\x7f" for c in path):
            raise ValueError("the probe path starts with '/' and has no spaces or control bytes")
        return path


class LearnedSettings(PeakEwmaSettings):
    """``policy = "learned"``: a small PyTorch model predicts each candidate's latency and
    failure probability; it trains online from outcomes, off the request path. Its priors are
    peak-EWMA estimates, hence ``decay_time`` and ``initial_latency``, as ``peak_ewma``'s."""

    # Its weights, kept across restarts; relative to the config's directory; default:
    # webtorch-state/balancer-<group> in the working directory (the group resolves it; a
    # policy built with None keeps nothing).
    state_dir: Path | None = None
    explore: Annotated[float, Field(ge=0, le=1)] = 0.05  # share of picks that explore
    # An exploring pick takes another candidate predicted to cost at most this x the best.
    explore_margin: Annotated[float, Field(ge=1)] = 2.0
    # Candidates scored per pick (a random sample of them when there are more): every one in
    # groups up to this size.
    sample: Annotated[int, Field(ge=2)] = 16
    # A key (hash_key's value, e.g. the model) counts as warm on an upstream while it is among
    # the last this-many distinct keys that upstream served (about how many models it holds).
    warm_keys: Annotated[int, Field(ge=1)] = 8
    # Keyed traffic: no upstream above (1 + this) x its fair share while others have room.
    key_balance: Annotated[float, Field(gt=0)] = 0.2
    hidden: Annotated[int, Field(ge=4, le=1024)] = 32
    learning_rate: Annotated[float, Field(gt=0)] = 1e-2
    batch: Annotated[int, Field(ge=1)] = 64  # outcomes per training step
    train_interval: Annotated[float, Field(gt=0)] = 0.25  # seconds between training steps
    failure_cost: Annotated[float, Field(ge=0)] = 1.0  # seconds a failure is worth in the cost


class StickySettings(_Settings):
    """``[upstreams.X.sticky]``: sticky sessions by cookie, as nginx's ``sticky cookie``; what
    ``StickyCookie`` (``sticky.py``) sets. ``expires``: seconds (Max-Age); None: a session
    cookie. The values are checked where the cookie is built (a config's check builds one), by
    the rules of a cookie: a name, domain and path a browser takes, expires > 0 and finite,
    samesite one of strict, lax or none (any case; none needs secure)."""

    cookie: str = "webtorch_route"
    expires: float | None = None
    domain: str | None = None
    path: str = "/"
    httponly: bool = True
    secure: bool = False
    samesite: str | None = None


PolicySettings = PeakEwmaSettings | PrequalSettings | LearnedSettings

# The policies with settings of their own, by name; each is also the name of its section in
# ``[upstreams.X]``.
SETTINGS: dict[str, type[PolicySettings]] = {
    "peak_ewma": PeakEwmaSettings,
    "prequal": PrequalSettings,
    "learned": LearnedSettings,
}
