"""``[[plugins]]``: Python files that join the request's phases (plugins/), in order."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from webtorch.config.base import Strict

PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PluginConfig(Strict):
    """One plugin: its file, the name its metrics and errors carry, where it runs among the
    others, and what happens when it fails."""

    # The file that defines `plugin = ...` (relative to the config's directory).
    path: Path
    # Default: the file's name without .py.
    name: str | None = None
    # Lower runs first in every phase; equal orders keep the file's order.
    order: int = 0
    # Path prefixes the plugin sees ("/api" matches /api and /api/...); empty: every request.
    routes: list[str] = Field(default_factory=list)
    # "open": a failing phase is logged and counted and the request goes on without it;
    # "closed": the request gets a 500 naming the plugin (a connection is refused).
    on_error: Literal["open", "closed"] = "open"
    # Seconds an async phase (request, request_body) may take before it counts as failed.
    timeout: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # request_body: "buffer" hands the whole body (up to body_limit bytes; 413 beyond);
    # "stream" hands each chunk as it arrives (to read, not to change).
    body: Literal["buffer", "stream"] = "buffer"
    body_limit: Annotated[int, Field(ge=0, le=1 << 30)] = 1 << 20
    # The plugin's own table, handed to it as `host.settings` at startup.
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> PluginConfig:
        if self.name is not None and not PLUGIN_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, _ . - (at most 64)")
        for route in self.routes:
            if not route.startswith("/"):
                raise ValueError(f"routes: {route!r} does not start with '/'")
        return self

    @property
    def label(self) -> str:
        """The plugin's name: configured, or the file's stem."""
        return self.name if self.name is not None else self.path.stem
