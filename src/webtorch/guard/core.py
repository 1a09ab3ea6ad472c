"""The guard's decisions: allow, throttle (429) or block (403), and why. Sans-IO.

Every request passes :meth:`Guard.check` before its handler; every connection passes
:meth:`Guard.connect`. In order, cheapest and most certain first:

1. the allow-list (trusted networks skip everything) and the deny-list;
2. an active ban (set by an earlier block, expiring after ``ban_seconds``);
3. per-client caps that need no model: open connections (``connect``) and a token bucket of
   ``rate`` requests/s with ``burst`` (nginx's limit_req, with nodelay);
3b. during a surge of the server's whole request rate (``surge.py``), clients first seen less
   than ``SURGE_GRACE`` seconds before it began, or during it, get a bucket of ``surge_rate``
   requests/s (and a second's worth of burst) instead: a flood spread over many new addresses
   is throttled within a fraction of a second of its start, while the clients that were here
   before it keep their usual allowance;
4. the detector: an **injection** score at or above ``block`` blocks the request (and bans the
   client when ``ban_seconds`` > 0); an **abuse** score at or above ``block`` blocks and bans,
   at or above ``throttle`` throttles.

In ``monitor`` mode every decision is made, counted and logged as it would be, and the request is
let through anyway (``Decision.enforced`` is False): the way to roll a guard out.

The clock is passed in, so policies are tested with a fake one. The settings are the config's
``[guard]`` section itself (:class:`~webtorch.config.GuardConfig`): one copy of each default.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from webtorch.config import GuardConfig
from webtorch.guard.clients import ClientTable
from webtorch.guard.features import RequestView
from webtorch.guard.scorer import Scorer
from webtorch.guard.surge import SurgeDetector
from webtorch.metrics import Histogram
from webtorch.shared.store import LocalStore, StateStore

ALLOW, THROTTLE, BLOCK = "allow", "throttle", "block"
# A client first seen less than this long before a surge began counts as part of it: a flood
# is detected a few tens of milliseconds after its first requests, not before.
SURGE_GRACE = 1.0
# Where a keyed client's address pays for the new keys it brings: a bucket of its own, apart
# from the address's bucket as a client (an address never starts with this).
_NEW_KEYS = "new-keys:"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class Decision:
    action: str  # allow, throttle or block: what the guard decided
    # allow_list, deny_list, banned, connections, rate_limit, new_keys, surge, injection,
    # abuse, ok
    reason: str
    injection: float | None = None  # scores, when the detector ran
    abuse: float | None = None
    retry_after: float = 0.0  # for a throttle: seconds until the client may retry
    enforced: bool = True  # False in monitor mode: the request goes through regardless

    @property
    def score(self) -> float | None:
        """The higher of the two scores (the access log's one number)."""
        if self.injection is None or self.abuse is None:
            return None
        return max(self.injection, self.abuse)

    @property
    def refused(self) -> bool:
        return self.enforced and self.action != ALLOW


# What the rules answer when they let a request through and there is no detector: one shared
# instance (nothing changes a Decision once made), counted under this key.
_ALLOW_OK = (ALLOW, "ok")
_ALLOWED = Decision(*_ALLOW_OK)

SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class GuardStats:
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (action, reason)
    blocked_clients: Counter[str] = field(default_factory=Counter)
    # The detector's score (the higher head) of each request it scored.
    scores: Histogram = field(default_factory=lambda: Histogram(SCORE_BUCKETS))


class Guard:
    def __init__(
        self,
        settings: GuardConfig,
        scorer: Scorer | None = None,
        clock: Callable[[], float] | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        # The clients' history, the detector's input: this process's (each worker scores on
        # what it sees; see ARCHITECTURE.md, Processes).
        self.clients = ClientTable(settings.max_clients)
        self.stats = GuardStats()
        # What must hold across the workers of a server: the token buckets and the bans (at
        # most max_clients each: a client rotating keys through blocks must not grow them
        # without bound), and whether a surge is under way. One process: dicts in it.
        self.store: StateStore = store if store is not None else LocalStore(settings.max_clients)
        self.last_history: list[float] = []
        self._allow = [ipaddress.ip_network(c, strict=False) for c in settings.allow]
        self._deny = [ipaddress.ip_network(c, strict=False) for c in settings.deny]
        self._listed: dict[str, str | None] = {}  # address -> "allow" / "deny" / None, cached
        self._enforce = settings.mode == "enforce"
        self._bans_on = settings.ban_seconds > 0 and self._enforce  # see _banned
        self._workers = self.store.workers
        self._burst = settings.burst or max(settings.rate, 1.0)
        self.surge: SurgeDetector | None = None
        if settings.surge_rate > 0:
            # With workers, each detects on its share of the traffic (the kernel spreads
            # connections over them) against its share of the floor; any one's surge is every
            # worker's (StateStore.surge_began).
            floor = settings.surge_min_rate / self.store.workers
            self.surge = SurgeDetector(settings.surge_factor, floor)
        self.surge_began: float | None = None  # the server's surge, as of the last request

    # -- connections ---------------------------------------------------------------------------

    def connect(self, address: str, now: float) -> Decision:
        """A new connection from ``address``: refused by the lists, a ban or the cap."""
        listed = self._list_of(address)
        if listed == "allow":
            return self._count(Decision(ALLOW, "allow_list"), address)
        if listed == "deny":
            return self._count(Decision(BLOCK, "deny_list", enforced=self._enforce), address)
        if self._banned(address, now):
            return self._count(Decision(BLOCK, "banned", enforced=self._enforce), address)
        state = self.clients.get(address, now)
        cap = self.settings.max_connections
        if cap and state.connections >= cap:
            decision = self._count(
                Decision(THROTTLE, "connections", enforced=self._enforce), address
            )
            if decision.refused:
                return decision
        else:
            decision = Decision(ALLOW, "ok")
        state.connections += 1  # admitted (perhaps only because the guard is monitoring)
        return decision

    def disconnect(self, address: str) -> None:
        state = self.clients.peek(address)
        if state is not None and state.connections > 0:
            state.connections -= 1

    # -- requests ------------------------------------------------------------------------------

    def check(
        self, view: RequestView, client: str, now: float, address: str | None = None
    ) -> Decision:
        """The whole decision for one request: :meth:`rules`, then the detector's score."""
        decided = self.rules(view.path, client, now, address)
        if isinstance(decided, Decision):
            return decided
        assert self.scorer is not None
        injection, abuse = self.scorer.score_one(view, decided)
        return self.decide(client, injection, abuse, now, address)

    def rules(
        self, path: str, client: str, now: float, address: str | None = None
    ) -> Decision | list[float]:
        """Everything but the detector: the lists, bans, buckets and the surge defence. Returns
        the final decision when they settle it (or there is no detector), else the client's
        history features to score the request with; then :meth:`decide` finishes it. Split so
        that the I/O shell can score many requests at once between the two.

        ``address``: the client's address when ``client`` is another key (an API-key header).
        The lists are about addresses, so they apply to it; a ban of either refuses; and a key
        new to the table costs its address a token of ``new_keys_rate``, so that rotating keys
        (a fresh one per request) neither dodges the limits nor grows the table."""
        where = client if address is None else address
        listed = self._list_of(where)
        if listed == "allow":
            return Decision(ALLOW, "allow_list")
        if listed == "deny":
            return self._count(Decision(BLOCK, "deny_list", enforced=self._enforce), client)
        if self._banned(client, now) or (address is not None and self._banned(address, now)):
            return self._count(Decision(BLOCK, "banned", enforced=self._enforce), client)
        state = self.clients.peek(client)
        if state is None and address is not None:
            s = self.settings
            payer = _NEW_KEYS + address
            refused = self._bucket(payer, now, s.new_keys_rate, s.new_keys_burst, "new_keys")
            if refused is not None:
                return self._count(refused, client)
        state = self.clients.get(client, now)
        scorer = self.scorer
        if scorer is not None:  # the history is the detector's input; the rules need none of it
            state.arrive(path, now)
        surge = self.surge
        began = None
        if surge is not None:
            surge.arrive(now)
            began = surge.began
            if self._workers > 1:  # any worker's surge is every worker's
                began = self.store.surge_began(began, now)
            self.surge_began = began
        if began is not None and state.first > began - SURGE_GRACE:
            rate = self.settings.surge_rate
            throttled = self._bucket(client, now, rate, max(rate, 1.0), "surge")
        else:
            throttled = self._bucket(client, now, self.settings.rate, self._burst, "rate_limit")
        if throttled is not None:
            return self._count(throttled, client)
        if scorer is None:
            self.stats.decisions[_ALLOW_OK] += 1
            return _ALLOWED
        history = state.features(now)
        self.last_history = history  # what the request was scored with (for feedback)
        return history

    def decide(
        self, client: str, injection: float, abuse: float, now: float, address: str | None = None
    ) -> Decision:
        """The decision for a request the rules let through, from the detector's scores. A
        block bans the client: a key, not its address (``address``, as for :meth:`rules`),
        which others may share (a NAT, a gateway). A banned key swapped for fresh ones meets
        its address's allowance of new keys."""
        self.stats.scores.record(max(injection, abuse))
        s = self.settings
        if injection >= s.block:
            decision = Decision(BLOCK, "injection", injection, abuse, enforced=self._enforce)
        elif abuse >= s.block:
            decision = Decision(BLOCK, "abuse", injection, abuse, enforced=self._enforce)
        elif abuse >= s.throttle:
            decision = Decision(
                THROTTLE, "abuse", injection, abuse, retry_after=1.0, enforced=self._enforce
            )
        else:
            decision = Decision(ALLOW, "ok", injection, abuse)
        if decision.action == BLOCK and s.ban_seconds > 0 and self._enforce:
            self.ban(client, now)
        return self._count(decision, client)

    def ban(self, client: str, now: float) -> None:
        """Ban ``client`` for ``ban_seconds`` from ``now``, in every worker, within
        ``max_clients`` bans: when full, expired bans go first, then the one ending soonest."""
        self.store.ban(client, now + self.settings.ban_seconds, now)

    def ban_count(self, now: float) -> int:
        """Bans in force (the whole server's)."""
        return self.store.ban_count(now)

    def refuse(self, client: str, reason: str, now: float) -> Decision:
        """A block for ``reason`` found outside the rules and the detector (a body past the
        scanning budget, with body_scan_over = "refuse"); no ban."""
        return self._count(Decision(BLOCK, reason, enforced=self._enforce), client)

    def answered(self, client: str, status: int) -> None:
        """The response's status: a client collecting 4xx is probing (a detector's input)."""
        if self.scorer is None:
            return
        state = self.clients.peek(client)
        if state is not None:
            state.answered(status)

    # -- helpers -------------------------------------------------------------------------------

    def _bucket(
        self, key: str, now: float, rate: float, burst: float, reason: str
    ) -> Decision | None:
        if rate <= 0:
            return None
        # Refilled lazily, by the time since last taken from (StateStore.take).
        wait = self.store.take(key, now, rate, burst)
        if wait <= 0.0:
            return None
        return Decision(THROTTLE, reason, retry_after=wait, enforced=self._enforce)

    def _banned(self, client: str, now: float) -> bool:
        # Without ban_seconds nothing is ever banned ([guard] is the same in every worker and
        # cannot change by reload): not asked, which saves the store a lookup per request.
        return self._bans_on and self.store.banned(client, now)

    def expire(self, now: float) -> None:
        """Drop expired bans and fold pending scores (the app calls this once a second)."""
        self.stats.scores.compact()
        self.store.expire(now)

    def _list_of(self, address: str) -> str | None:
        if not self._allow and not self._deny:
            return None
        try:
            return self._listed[address]
        except KeyError:
            pass
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            listed = None  # a configured key (an API key header), not an address
        else:
            listed = (
                "allow"
                if any(ip in net for net in self._allow)
                else "deny"
                if any(ip in net for net in self._deny)
                else None
            )
        if len(self._listed) >= 65536:
            self._listed.clear()
        self._listed[address] = listed
        return listed

    def _count(self, decision: Decision, client: str) -> Decision:
        self.stats.decisions[(decision.action, decision.reason)] += 1
        if decision.action == BLOCK:
            stats = self.stats.blocked_clients
            stats[client] += 1
            if len(stats) > 10_000:  # bounded: keep the heaviest half
                keep = stats.most_common(5_000)
                stats.clear()
                stats.update(dict(keep))
        return decision


def retry_after_header(seconds: float) -> bytes:
    return str(max(1, math.ceil(seconds))).encode()
