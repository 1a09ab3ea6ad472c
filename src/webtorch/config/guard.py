"""``[guard]``: the request guard (guard/), its thresholds, limits and online adaptation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from webtorch.config.base import Strict, check_networks


class GuardConfig(Strict):
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
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
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
        return check_networks(networks)

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
