"""A request's time in each stage, as a ``Server-Timing`` header (which the access log reads
too: ``Request.stages``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Stage names as header tokens, made once per name (a pipeline has a handful).
_TOKENS: Final[dict[str, str]] = {}


def server_timing(times: Iterable[tuple[str, float]]) -> bytes:
    """``clean;dur=0.41, featurize;dur=0.20``: milliseconds per stage (queue wait included)."""
    return ", ".join(
        f"{_TOKENS.get(name) or _token(name)};dur={seconds * 1000:.3f}" for name, seconds in times
    ).encode()


def _token(name: str) -> str:
    # RFC 9110 token characters only: anything else becomes '_' (graph.py refuses '/' and
    # spaces already; a name is the user's to choose).
    token = "".join(c if c.isalnum() or c in "!#$%&'*+-.^_`|~" else "_" for c in name)
    if len(_TOKENS) < 4096:
        _TOKENS[name] = token
    return token
