"""Every policy says why it chose (``last_reason``, the access log's "reason"), and the group
records it on the request, sticky sessions included."""

from __future__ import annotations

import asyncio
import random

from webtorch.balance.base import ProbeResult, Upstream
from webtorch.balance.classic import LeastConn, Random2, RoundRobin
from webtorch.balance.hashing import BoundedLoadHash, hash64
from webtorch.balance.learned import Learned
from webtorch.balance.peak_ewma import PeakEwma
from webtorch.balance.prequal import Prequal
from webtorch.balance.settings import LearnedSettings, PrequalSettings
from webtorch.balance.sticky import route_id
from webtorch.config import UpstreamConfig
from webtorch.http.messages import Request
from webtorch.proxy.upstream import UpstreamGroup

NOW = 100.0


def group(n: int) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(n)]


def get(key: str | None = None, cookie: str | None = None) -> Request:
    headers = []
    if key is not None:
        headers.append((b"x-key", key.encode()))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    return Request("GET", "/", "", headers, b"")


def test_classic_policies() -> None:
    ups = group(3)
    rr = RoundRobin(ups)
    rr.pick(get(), ups, NOW)
    assert rr.last_reason == "round_robin"
    rr.pick(get(), ups[:1], NOW)
    assert rr.last_reason == "only_candidate"
    lc = LeastConn(ups)
    ups[0].inflight = 1
    assert lc.pick(get(), ups[:2], NOW) is ups[1] and lc.last_reason == "least_conn"
    lc.pick(get(), ups[1:], NOW)
    assert lc.last_reason == "least_conn_tie"  # both idle: round robin between them
    r2 = Random2(ups, rng=random.Random(1))
    r2.pick(get(), ups, NOW)
    assert r2.last_reason == "random2"
    pe = PeakEwma(ups, rng=random.Random(1))
    pe.pick(get(), ups, NOW)
    assert pe.last_reason == "peak_ewma"


def test_hash_home_overflow_and_no_key() -> None:
    ups = group(3)
    policy = BoundedLoadHash(ups, "header:x-key")
    home = policy.home_of("model-a")
    assert home is not None
    assert policy.pick(get("model-a"), ups, NOW) is home and policy.last_reason == "hash"
    other = next(u for u in ups if u is not home)
    other.inflight = 10  # at the cap, but not on the way: still the key's home
    assert policy.pick(get("model-a"), ups, NOW) is home and policy.last_reason == "hash"
    other.inflight = 0
    home.inflight = 10  # the home is over the load bound: the next one on the ring
    assert policy.pick(get("model-a"), ups, NOW) is not home
    assert policy.last_reason == "hash_overflow"
    policy.pick(get(), ups, NOW)
    assert policy.last_reason == "hash_no_key"


def test_prequal_cold_hot_and_fallback() -> None:
    ups = group(2)
    policy = Prequal(ups, PrequalSettings(probes_per_request=0.0), rng=random.Random(1))
    policy.pick(get(), ups, NOW)
    assert policy.last_reason == "prequal_fallback"  # no probe result yet
    policy.on_probe(ups[0], ProbeResult(1, 0.01), NOW)
    policy.on_probe(ups[1], ProbeResult(2, 0.02), NOW)
    assert policy.pick(get(), ups, NOW) is ups[0] and policy.last_reason == "prequal_cold"
    policy.pool.clear()
    for inflight in (0, 0, 0, 0, 0, 0):  # a pool of idle results from elsewhere...
        policy.on_probe(
            Upstream("10.9.9.9:80", "10.9.9.9", 80, index=9), ProbeResult(inflight, 0.01), NOW
        )
    policy.on_probe(ups[0], ProbeResult(50, 0.01), NOW)  # ...and both candidates hot
    policy.on_probe(ups[1], ProbeResult(40, 0.05), NOW)
    assert policy.pick(get(), ups, NOW) is ups[1] and policy.last_reason == "prequal_hot"


def test_learned_explore_and_affinity() -> None:
    ups = group(3)
    policy = Learned(
        ups, LearnedSettings(explore=0.0), hash_key="header:x-key", rng=random.Random(2)
    )
    first = policy.pick(get("k"), ups, NOW)
    # The key was warm nowhere yet, every candidate costs the same: it goes to its home (the
    # first in its rendezvous order), unless that is the cheapest anyway.
    assert policy.last_reason in ("learned", "learned_home")
    assert first is max(ups, key=lambda u: hash64(f"k@{u.address}".encode()))
    assert policy.pick(get("k"), ups, NOW + 1) is first
    assert policy.last_reason == "learned_affinity"
    policy.pick(get("k"), ups[:1], NOW + 2)
    assert policy.last_reason == "only_candidate"
    explorer = Learned(ups, LearnedSettings(explore=1.0), rng=random.Random(2))
    explorer.pick(get(), ups, NOW)
    assert explorer.last_reason == "learned_explore"


def test_the_group_records_the_reason_on_the_request_sticky_first() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = UpstreamConfig.model_validate(
            {"servers": ["10.0.0.1:80", "10.0.0.2:80"], "sticky": {"cookie": "route"}}
        )
        g = UpstreamGroup("backend", config, loop)
        request = get()
        g.choose(request, g.upstreams, NOW)
        assert request.reason == "round_robin"
        pinned = get(cookie=f"route={route_id('10.0.0.2:80')}")
        assert g.choose(pinned, g.upstreams, NOW) is g.upstreams[1]
        assert pinned.reason == "sticky_cookie"
        g.close()
    finally:
        loop.close()
