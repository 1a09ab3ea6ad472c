"""The interface of state that must be the same in every worker, and its in-process
implementation (one process: ``server.workers = 1``).

What is in it is what a worker must not decide on alone: a client's token bucket (two workers
each admitting ``rate`` would admit twice it), its ban (a client banned by one worker must be
refused by the other), whether a surge is under way, and which upstreams are out (an upstream one
worker found dead is avoided by all at once). What stays per worker, and why, is in
ARCHITECTURE.md ("Processes").

Every operation takes the time it happens at (``now``, monotonic seconds: CLOCK_MONOTONIC is one
clock for every process of the machine), so the implementations are tested with fake clocks, and
does all of its read-modify-write as one step, so that an implementation over shared memory (a
lock per set of slots) or over Redis (a Lua script, ``EVALSHA``: one round trip, atomic on the
server) keeps the same meaning. Bounded: each keeps at most a fixed number of clients and bans,
evicting the least recently used (a bucket) or the one that ends soonest (a ban); an evicted
client starts again with a full bucket, an evicted ban is lifted early.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class StateStore(Protocol):
    """What the guard and the proxy ask of shared state. Keys are short strings (a client: its
    address or key; an upstream: ``group/address``)."""

    @property
    def workers(self) -> int:
        """How many processes share this store (1: in-process)."""
        ...

    def take(self, key: str, now: float, rate: float, burst: float) -> float:
        """Take one token from ``key``'s bucket (``rate`` per second, at most ``burst``; a new
        bucket starts full): 0.0 when there was one, else the seconds until there is."""
        ...

    def ban(self, key: str, until: float, now: float) -> None:
        """Ban ``key`` until ``until``."""
        ...

    def banned(self, key: str, now: float) -> bool:
        """Whether ``key`` is banned at ``now``."""
        ...

    def ban_count(self, now: float) -> int:
        """Bans in force at ``now`` (a gauge: asked once per scrape, not per request)."""
        ...

    def expire(self, now: float) -> None:
        """Housekeeping, once a second: drop what has expired where that frees memory."""
        ...

    def surge_began(self, began: float | None, now: float) -> float | None:
        """This process's surge (when its detector saw one begin, None: calm) in, the server's
        out: the earliest surge under way in any process, None when all are calm."""
        ...

    def mark_down(self, key: str, until: float) -> None:
        """An upstream is out until ``until``: every process avoids it till then."""
        ...

    def mark_up(self, key: str, now: float) -> None:
        """An upstream is back at ``now`` (a good active check): lift its mark."""
        ...

    def down_until(self, key: str) -> float:
        """Until when ``key`` is marked out (-inf: never marked)."""
        ...

    def marks(self) -> int:
        """A number that changes whenever a mark does: a process re-reads the marks it cares
        about only when it moved (one read per request instead of one per upstream)."""
        ...


class LocalStore:
    """:class:`StateStore` in one process: dicts, as the guard kept them before there were
    workers. ``max_keys`` bounds the buckets (least recently used evicted) and the bans (the one
    that ends soonest, after the expired)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, refilled]
        self.bans: dict[str, float] = {}  # key -> end, in order of end (every ban lasts as long)
        self.evicted = 0
        self._down: dict[str, float] = {}
        self._marks = 0

    @property
    def workers(self) -> int:
        return 1

    def take(self, key: str, now: float, rate: float, burst: float) -> float:
        # On every request: written out (no min/max calls) for speed.
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [burst, now]
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
                self.evicted += 1
            tokens = burst
        else:
            buckets.move_to_end(key)
            tokens = bucket[0] + (now - bucket[1]) * rate
            if tokens > burst:
                tokens = burst
        bucket[1] = now
        if tokens >= 1.0 - 1e-9:  # a token refilled over exactly 1/rate s counts as whole
            tokens -= 1.0
            bucket[0] = tokens if tokens > 0.0 else 0.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / rate

    def ban(self, key: str, until: float, now: float) -> None:
        bans = self.bans
        bans.pop(key, None)  # re-inserted last: the dict stays in order of ban end
        if len(bans) >= self.max_keys:
            self.expire(now)
            while len(bans) >= self.max_keys:
                del bans[next(iter(bans))]
        bans[key] = until

    def banned(self, key: str, now: float) -> bool:
        until = self.bans.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self.bans[key]
        return False

    def ban_count(self, now: float) -> int:
        return sum(1 for until in self.bans.values() if until > now)

    def expire(self, now: float) -> None:
        bans = self.bans
        for key in [k for k, until in bans.items() if until <= now]:
            del bans[key]

    def surge_began(self, began: float | None, now: float) -> float | None:
        return began

    def mark_down(self, key: str, until: float) -> None:
        self._down[key] = until
        self._marks += 1

    def mark_up(self, key: str, now: float) -> None:
        if key in self._down:
            self._down[key] = min(self._down[key], now)
            self._marks += 1

    def down_until(self, key: str) -> float:
        return self._down.get(key, -float("inf"))

    def marks(self) -> int:
        return self._marks
