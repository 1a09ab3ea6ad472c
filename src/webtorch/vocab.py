"""Vocabulary several layers share, kept below all of them so that imports point one way
(ARCHITECTURE.md): how an attempt to an upstream ended (:class:`Outcome`), an upstream server and
the live state the proxy keeps about it (:class:`Upstream`), and the retry conditions that config
validates and the proxy acts on. Plain types, no I/O; compiled with the request path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final


class Outcome(enum.Enum):
    """How one attempt to one upstream ended, as far as the upstream is to blame."""

    OK = "ok"  # a response the upstream meant (1xx-4xx, and 5xx other than below)
    SERVER_ERROR = "server_error"  # a 500, 502, 503 or 504 from the upstream itself: alive, unwell
    CONNECT_FAILED = "connect_failed"  # refused, unreachable or connect timeout: no byte sent
    RESET = "reset"  # the connection broke
    # The response was not valid HTTP, broke a limit (max_response_header_bytes...) or was one
    # the proxy cannot relay (101 Switching Protocols): nginx's "invalid_header".
    INVALID_RESPONSE = "invalid_response"
    TIMEOUT = "timeout"  # no (complete) response within the read or total timeout
    CANCELLED = "cancelled"  # the client went away first: says nothing about the upstream

    @property
    def is_failure(self) -> bool:
        """A failure of the upstream (nginx's "unsuccessful attempt"; Envoy's gateway errors)."""
        return self in _FAILURES

    @property
    def is_gateway_failure(self) -> bool:
        """The upstream could not be talked to at all (no HTTP response came back)."""
        return self in _GATEWAY_FAILURES


_GATEWAY_FAILURES: Final = frozenset(
    {Outcome.CONNECT_FAILED, Outcome.RESET, Outcome.TIMEOUT, Outcome.INVALID_RESPONSE}
)
_FAILURES: Final = _GATEWAY_FAILURES | {Outcome.SERVER_ERROR}


@dataclass(eq=False, slots=True)
class Upstream:
    """One server of an upstream group, and the live state the proxy keeps about it.

    ``inflight`` is maintained by the proxy (incremented when an attempt starts, decremented when
    its response has been fully relayed or it failed). ``weight_factor`` in (0, 1] is set by the
    health machinery during slow start; policies that use weights multiply by it.
    """

    address: str  # "host:port", also the upstream's name in metrics and cookies
    host: str
    port: int
    weight: int = 1
    index: int = 0  # position in the group's server list, stable across picks
    inflight: int = 0
    weight_factor: float = 1.0
    # Free for a policy's per-upstream state (a policy owns its key, e.g. "peak_ewma").
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_weight(self) -> float:
        return self.weight * self.weight_factor


# nginx's proxy_next_upstream vocabulary, the part that applies here (proxy/retry.py).
RETRY_CONDITIONS: Final = frozenset(
    {
        "error",
        "timeout",
        "invalid_header",
        "http_500",
        "http_502",
        "http_503",
        "http_504",
        "http_429",
        "non_idempotent",
    }
)


# A batching queue's defaults (serve/batcher.py): the rows merged into one batch and the rows
# queued before new work is refused 503. One copy for the queues' constructors and the config
# sections that set them ([models.X], its train section, [pipelines.X.stages.S]).
MAX_BATCH_ROWS: Final = 256
MAX_QUEUED_ROWS: Final = 65536
