"""The vocabulary every balancing policy and failure-handling state machine shares.

Sans-IO: nothing here touches a socket or the event loop, and time is passed in as ``now``
(seconds, monotonic). The proxy owns the I/O, counts in-flight requests on each
:class:`Upstream` and reports every attempt's :class:`Outcome` back through ``observe``; policies
only read that state and decide.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from mypy_extensions import mypyc_attr

from webtorch.http.messages import Request

# Outcome and Upstream are spoken below this layer too (http/client.py reports outcomes on
# upstream connections), so they live in webtorch/vocab.py; re-exported here, where policies,
# the proxy and policies written outside WebTorch have always imported them.
from webtorch.vocab import Outcome as Outcome
from webtorch.vocab import Upstream as Upstream


# Policies may be written outside the compiled core (see scripts/compile), by users too.
@mypyc_attr(allow_interpreted_subclasses=True)
class Policy(ABC):
    """Chooses the upstream for one attempt. One instance per upstream group.

    ``candidates`` is never empty and holds only the upstreams the health machinery currently
    allows and that this request has not already tried; it is ordered by ``Upstream.index``.
    ``group`` is every upstream of the group (a hashing policy places keys on the whole ring so
    that an ejection moves only that upstream's keys).
    """

    # Class-level (ClassVar): compiled code reads them from the class, so that a subclass's
    # own value holds whether it is compiled or not.
    name: ClassVar[str] = ""
    # Whether observe() learns anything: the proxy skips the call per response when not.
    learns: ClassVar[bool] = False
    # Whether the policy asks for load probes (see probes() and on_probe()).
    probing: ClassVar[bool] = False
    # Why the last pick chose its upstream, for the access log: set by every pick (one store, no
    # allocation), the policy's name or a variant of it ("hash_overflow"), or "only_candidate"
    # when there was no choice to make.
    last_reason: str = ""

    def __init__(self, group: Sequence[Upstream]) -> None:
        self.group = list(group)

    @abstractmethod
    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        """The upstream this attempt goes to."""

    def observe(
        self,
        upstream: Upstream,
        outcome: Outcome,
        latency: float,
        now: float,
        request: Request | None = None,
    ) -> None:
        """An attempt to ``upstream`` ended: ``latency`` is seconds from sending the request to
        the response head (or to the failure). Called once per attempt, never for CANCELLED
        attempts that had not reached the upstream; ``request`` is the request the attempt
        carried (the same object ``pick`` saw), so a policy can join what it knew at the pick
        with what happened. The default learns nothing; a policy that overrides this sets
        ``learns = True`` (the proxy skips the call otherwise)."""
        return None

    def probes(self, now: float) -> Sequence[Upstream]:
        """Upstreams to probe for their load now (asked after every pick when ``probing``).
        The proxy sends each a ``GET`` of the group's probe path and reports back through
        :meth:`on_probe`; a probe is never on a request's path."""
        return ()

    def on_probe(self, upstream: Upstream, load: ProbeResult | None, now: float) -> None:
        """A probe came back: ``load`` is what the upstream reported, None when it failed or
        did not answer in time."""
        return None

    def maintain(self, now: float) -> None:
        """Housekeeping off the request path (training, saving state): the proxy calls it a few
        times a second."""
        return None

    def close(self) -> None:
        """The group is being replaced or the server stops: persist what should survive."""
        return None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What an upstream says about its own load when probed (WebTorch answers
    ``GET /v2/health/load`` with these)."""

    inflight: int  # requests it is working on
    latency: float  # seconds, its recent typical (median) service time; 0.0 when unknown
