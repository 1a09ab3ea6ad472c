"""Each client's recent history, in bounded memory: what floods, scans and slow attacks look like.

A client is an IP address, or a configured key such as an API-key header. Its state is a few
decayed counters updated in O(1) per request: request rates over 1 s, 10 s and 60 s windows
(exponentially decayed, so no per-request timestamps are kept), inter-arrival statistics, open
connections, the share of its answers that were 4xx, and how many distinct paths it asked for.

Memory is bounded whatever the traffic: the table is an LRU of at most ``max_clients`` entries,
so a botnet rotating through millions of addresses evicts its own oldest entries rather than
growing the table; a client that comes back after eviction starts with a clean history, which
costs a flood at most the few requests it takes to look like one again.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from array import array
from collections import OrderedDict

WINDOWS = (1.0, 10.0, 60.0)  # seconds: the decay times of the rate counters
DISTINCT_WINDOW = 60.0  # distinct paths are counted per this many seconds
DISTINCT_LIMIT = 256  # path hashes kept per window (a scanner saturates it: that is the signal)
ERROR_DECAY = 0.9  # weight of the past in the 4xx share (about the last 10 answers)

CLIENT_FEATURES = (
    "rate_1s",
    "rate_10s",
    "rate_60s",
    "interarrival_log_mean",
    "interarrival_log_std",
    "connections",
    "error_share",
    "distinct_paths",
    "distinct_share",
)
N_CLIENT = len(CLIENT_FEATURES)


def shown_client(client: str) -> str:
    """``client`` as the dashboard and the logs may show it. An address stays as it is; a client
    key (``key:<header value>``, an API key: a secret) becomes ``key:`` + its first characters
    (at most 4, a quarter of it) + ``…`` + 8 hex digits of its digest: enough to tell keys
    apart and to find one's own, not to use it. A long key, kept as ``key#<digest>``, is shown
    by the digest's first 8 digits."""
    if client.startswith("key:"):
        key = client[4:]
        digest = hashlib.blake2b(key.encode("latin-1"), digest_size=4).hexdigest()
        return f"key:{key[: min(4, len(key) // 4)]}…{digest}"
    if client.startswith("key#"):
        return client[:12]
    return client


class ClientState:
    __slots__ = (
        "connections",
        "distinct",
        "distinct_since",
        "error_share",
        "first",
        "gap_mean",
        "gap_var",
        "last",
        "rates",
        "requests",
        "window_requests",
    )

    def __init__(self, now: float) -> None:
        self.rates = [0.0, 0.0, 0.0]  # decayed counts, one per window; rate = count / window
        self.first = now  # first seen (since its last eviction)
        self.last = now
        self.requests = 0
        self.gap_mean = 0.0  # EWMA of log inter-arrival seconds
        self.gap_var = 0.0
        self.connections = 0
        self.error_share = 0.0
        # Path hashes as 4-byte words, not a set of ints (~60 bytes each): at most 1 KiB a
        # client, so the table's bytes are bounded with its entries. Searched in C.
        self.distinct = array("I")
        self.distinct_since = now
        self.window_requests = 0

    def arrive(self, path: str, now: float) -> None:
        elapsed = max(now - self.last, 0.0)
        rates = self.rates
        for i, window in enumerate(WINDOWS):
            rates[i] = rates[i] * math.exp(-elapsed / window) + 1.0
        if self.requests:
            gap = math.log(elapsed + 1e-4)
            delta = gap - self.gap_mean
            self.gap_mean += 0.1 * delta
            self.gap_var = 0.9 * (self.gap_var + 0.1 * delta * delta)
        self.requests += 1
        self.last = now
        if now - self.distinct_since > DISTINCT_WINDOW:
            del self.distinct[:]
            self.distinct_since = now
            self.window_requests = 0
        self.window_requests += 1
        distinct = self.distinct
        if len(distinct) < DISTINCT_LIMIT:
            digest = zlib.crc32(path.encode("utf-8", "surrogateescape"))
            if digest not in distinct:
                distinct.append(digest)

    def answered(self, status: int) -> None:
        error = 1.0 if 400 <= status < 500 else 0.0
        self.error_share = ERROR_DECAY * self.error_share + (1.0 - ERROR_DECAY) * error

    def features(self, now: float) -> list[float]:
        """:data:`CLIENT_FEATURES` as of ``now`` (rates decayed to now, logs of counts)."""
        elapsed = max(now - self.last, 0.0)
        rates = [
            math.log1p(count * math.exp(-elapsed / window) / window)
            for count, window in zip(self.rates, WINDOWS, strict=True)
        ]
        distinct = len(self.distinct)
        return [
            *rates,
            self.gap_mean if self.requests > 1 else math.log(60.0),
            math.sqrt(self.gap_var),
            math.log1p(self.connections),
            self.error_share,
            math.log1p(distinct),
            distinct / max(self.window_requests, 1),
        ]


class ClientTable:
    """At most ``max_clients`` states, least recently seen evicted first."""

    def __init__(self, max_clients: int = 100_000) -> None:
        self.max_clients = max_clients
        self._states: OrderedDict[str, ClientState] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._states)

    def get(self, key: str, now: float) -> ClientState:
        states = self._states
        state = states.get(key)
        if state is None:
            state = states[key] = ClientState(now)
            if len(states) > self.max_clients:
                states.popitem(last=False)
                self.evicted += 1
        else:
            states.move_to_end(key)
        return state

    def peek(self, key: str) -> ClientState | None:
        return self._states.get(key)

    def keys(self) -> list[str]:
        return list(self._states)
