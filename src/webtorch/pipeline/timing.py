"""A request's time in each stage, as a ``Server-Timing`` header and for the access log."""

from __future__ import annotations

from collections.abc import Iterable


def server_timing(times: Iterable[tuple[str, float]]) -> bytes:
    """``clean;dur=0.41, featurize;dur=0.20``: milliseconds per stage (queue wait included).
    Stage names are tokens (graph.py refuses '/' and spaces; config names are plain)."""
    return ", ".join(f"{_token(name)};dur={seconds * 1000:.3f}" for name, seconds in times).encode()


def _token(name: str) -> str:
    # RFC 9110 token characters only: anything else (a dot is fine) becomes '_'.
    return "".join(c if c.isalnum() or c in "!#$%&'*+-.^_`|~" else "_" for c in name)


def stage_times(times: Iterable[tuple[str, float]]) -> str:
    """The access log's ``stages`` field: ``clean=0.41,featurize=0.20`` (milliseconds)."""
    return ",".join(f"{name}={seconds * 1000:.3f}" for name, seconds in times)
