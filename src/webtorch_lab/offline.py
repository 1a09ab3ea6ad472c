"""A balancing policy against the lab's upstream model on a fake clock: no sockets, no proxy.

The lab proper (``runner.py``) measures whole balancers, WebTorch's proxy or nginx, over loopback
in real time: the numbers users compare. This drives one :class:`~webtorch.balance.base.Policy`
directly against :class:`~webtorch_lab.model.UpstreamModel` instances with the lab's own load plan
(``schedule.plan``), in simulated time: a scenario's seconds run in a fraction of a second and the
same seed gives the same result. It is for tuning and testing what a policy *decides* (where keys
go, how load spreads), not for timing: there are no retries, timeouts, health checks or network
delays, and in-flight counts and latencies are exactly what the upstream model says. With a
``timeout`` a request unanswered that long is given up as the client would: the policy hears
``Outcome.TIMEOUT`` and the model forgets it if it is still queued (see ``families.py``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from webtorch.balance.base import Outcome, Policy, ProbeResult, Upstream
from webtorch.http.messages import Request
from webtorch_lab.model import Respond, UpstreamModel
from webtorch_lab.schedule import Planned

_DONE, _PROBE, _ARRIVE, _TIMEOUT = 0, 1, 2, 3  # event kinds, in the order handled at equal times


@dataclass(frozen=True)
class OfflineResult:
    requests: int  # answered in the measured period (t >= 0)
    latencies: list[float]  # seconds, sorted
    cold_loads: int
    shares: list[float]  # each upstream's share of the measured requests, in group order
    failures: int = 0  # measured requests answered 5xx or given up at the timeout
    # What the client saw per measured request, sorted: a failure counts as the timeout (as its
    # latency without one), so a tail quantile prices failures too.
    client: list[float] = field(default_factory=list)

    def client_percentile(self, q: float) -> float:
        if not self.client:
            return 0.0
        return self.client[min(int(q * len(self.client)), len(self.client) - 1)]

    @property
    def success(self) -> float:
        total = len(self.client)
        return 1.0 - self.failures / total if total else 1.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        return self.latencies[min(int(q * len(self.latencies)), len(self.latencies) - 1)]

    @property
    def cold_rate(self) -> float:
        return self.cold_loads / self.requests if self.requests else 0.0


def run_offline(
    policy: Policy,
    upstreams: Sequence[Upstream],
    models: Sequence[UpstreamModel],
    load: Sequence[Planned],
    *,
    key_header: bytes = b"x-key",
    maintain_every: float = 0.1,
    probe_delay: float = 0.001,
    timeout: float | None = None,
) -> OfflineResult:
    """Send every planned request through ``policy`` to the upstream models; ``upstreams[i]``
    is served by ``models[i]``. Black holes (requests never answered) stay in flight. A probing
    policy's probes are answered with the upstream model's load report ``probe_delay`` seconds
    after they are asked for."""
    events: list[tuple[float, int, int]] = [(p.t, _ARRIVE, i) for i, p in enumerate(load)]
    heapq.heapify(events)
    picked: dict[int, tuple[Request, Upstream, float]] = {}
    answers: dict[int, Respond] = {}
    latencies: list[float] = []
    served: Counter[int] = Counter()
    client: list[float] = []
    failures = 0
    cold = 0
    next_maintain = load[0].t if load else 0.0

    def schedule(respond: Respond) -> None:
        answers[respond.rid] = respond
        heapq.heappush(events, (respond.at, _DONE, respond.rid))

    while events:
        now, kind, rid = heapq.heappop(events)
        if now >= next_maintain:
            policy.maintain(now)
            next_maintain = now + maintain_every
        if kind == _PROBE:
            probed = upstreams[rid]
            inflight, latency = models[probed.index].load()
            policy.on_probe(probed, ProbeResult(inflight, latency), now)
            continue
        if kind == _TIMEOUT:
            given_up = picked.pop(rid, None)
            if given_up is None:
                continue  # answered in time
            request, upstream, sent = given_up
            upstream.inflight -= 1
            models[upstream.index].cancel(rid)  # queued or held: forgotten; in service: runs on
            policy.observe(upstream, Outcome.TIMEOUT, now - sent, now, request)
            if sent >= 0:
                latencies.append(now - sent)
                client.append(now - sent)
                served[upstream.index] += 1
                failures += 1
            continue
        if kind == _ARRIVE:
            planned = load[rid]
            headers = [(key_header, planned.key.encode())] if planned.key is not None else []
            method = "POST" if planned.size else "GET"
            request = Request(method, "/lab", "", headers, b"\0" * planned.size)
            upstream = policy.pick(request, upstreams, now)
            upstream.inflight += 1
            picked[rid] = (request, upstream, now)
            if policy.probing:
                for probed in policy.probes(now):
                    heapq.heappush(events, (now + probe_delay, _PROBE, probed.index))
            action = models[upstream.index].arrive(rid, now, planned.key, planned.size)
            if isinstance(action, Respond):
                schedule(action)
            if timeout is not None:
                heapq.heappush(events, (now + timeout, _TIMEOUT, rid))
            continue
        respond = answers.pop(rid)
        owner = picked.pop(rid, None)
        if owner is None:  # given up at the timeout: the work ends, nobody hears the answer
            for model in models:
                if rid in model.in_service:
                    for started in model.complete(rid, now):
                        schedule(started)
            continue
        request, upstream, sent = owner
        upstream.inflight -= 1
        outcome = Outcome.OK if respond.status < 500 else Outcome.SERVER_ERROR
        policy.observe(upstream, outcome, now - sent, now, request)
        if sent >= 0:
            latencies.append(now - sent)
            served[upstream.index] += 1
            cold += respond.cold
            failed = respond.status >= 500
            failures += failed
            client.append(timeout if failed and timeout is not None else now - sent)
        for started in models[upstream.index].complete(rid, now):
            schedule(started)
    total = sum(served.values())
    shares = [served[u.index] / total if total else 0.0 for u in upstreams]
    return OfflineResult(total, sorted(latencies), cold, shares, failures, sorted(client))
