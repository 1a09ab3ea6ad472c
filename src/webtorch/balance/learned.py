"""``policy = "learned"``: a small network predicts what each candidate will cost this request.

For every candidate it predicts the request's latency and its failure probability from
request features (method, body size, route, the affinity key) and the upstream's state
(in-flight, its peak-EWMA latency, recent errors, time since its last failure, whether it served
this key recently, i.e. has the model warm) and picks the lowest expected cost,

    cost = predicted mean latency + failure_cost x predicted failure probability,

among a few sampled candidates, exploring a bounded share of the time. It learns from every
outcome the proxy reports, in small batches on the proxy's clock (``maintain``), never on a
request's path; in the server the steps run on a thread of their own (``train_in_thread``): a
step costs milliseconds of torch (5-30 ms measured on a shared 2-core machine), and up to four
a call on the event loop held every request in flight for that long, four times a second
(issue 23: the tail the live lab measured, which the fake-clock simulator does not show).

The prior is built in rather than learned: the network predicts *residuals* over peak-EWMA's
estimate (``ewma x (inflight + 1)``) and over the upstream's error rate, and its last layer
starts at zero, so before it has seen anything it behaves as ``peak_ewma`` and it only
departs from that where data says so. Failures carry their own head, so an upstream that fails
fast never looks attractive because its (failed) answers are quick.

The client's tail (issue 23): the network is trained toward the *expected* latency (gamma
deviance), not a typical one (squared log-latency error, which predicts the geometric mean and
made an upstream slow on a few percent of its requests look fast); and the evidence that only
the loop can react to in time stays in the loop: the prior is raised to the age of the
upstream's oldest unkeyed request in flight, so a stall or one of its very slow answers counts
while it is happening, not when (or if) its answer comes. What the network knows of an upstream
by name fades unless fresh outcomes keep supporting it, becomes the group's average at once when
a probe finds the upstream far faster than the estimate that kept it avoided (a healed upstream
regains its share at the first probe after healing), and it learns from the last few seconds
of outcomes only (a fault that has passed must not be taught on). A guard rail (``_guard``)
holds it to its prior: a randomised trial where it overrules peak-EWMA, and a back-off to
peak-EWMA when it does worse.

The network sees bucketed features (server identity, route, body size, method, key warmth,
in-flight, time since the last failure, error rate) while the continuous estimates enter through
the priors, so its answers can be cached per feature combination until the next training step:
a pick costs a few dictionary lookups and float operations, not a forward pass. Training runs in
torch. The weights are saved as safetensors in ``state_dir`` and
loaded at start, so what was learned survives restarts.
"""

from __future__ import annotations

import logging
import math
import random
import zlib
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from webtorch.balance.base import Outcome, Policy, Upstream
from webtorch.balance.hashing import KeySpec, hash64
from webtorch.balance.peak_ewma import LatencyEstimate
from webtorch.balance.settings import LearnedSettings
from webtorch.files import write_private
from webtorch.http.messages import Request

log = logging.getLogger("webtorch.balance")

MAX_UPSTREAMS = 16  # upstream identity (one-hot); beyond, indexes share slots
ROUTE_BUCKETS = 4
# The network sees bucketed features (so its answers can be cached, see Learned._residual):
# identity, route, body size, method, key warmth, in-flight, time since failure, error rate.
# A value's bucket is bisect_right(edges, value): bucket i holds values below edges[i].
SIZE_EDGES = (1, 1024, 65536, 1 << 20)  # 0 / <1 KiB / <64 KiB / <1 MiB / larger
INFLIGHT_EDGES = (1, 2, 3, 5, 9, 17)
SINCE_FAILURE_EDGES = (1.0, 10.0, 60.0)  # seconds
ERROR_EDGES = (0.001, 0.05, 0.2)
_WIDTHS = (
    MAX_UPSTREAMS,
    ROUTE_BUCKETS,
    len(SIZE_EDGES) + 1,
    2,
    3,
    len(INFLIGHT_EDGES) + 1,
    len(SINCE_FAILURE_EDGES) + 1,
    len(ERROR_EDGES) + 1,
)
_OFFSETS = tuple(sum(_WIDTHS[:i]) for i in range(len(_WIDTHS)))
FEATURES = sum(_WIDTHS)
WARM_WINDOW = 60.0  # seconds an upstream counts as having a key warm after serving it
ERROR_DECAY = 0.9  # per observation: the error-rate EWMA's memory (~10 outcomes)
PENDING_LIMIT = 65536  # picks awaiting their outcome; older ones are dropped
REPLAY = 8192  # outcomes kept for training
RATIO_CLIP = 100.0  # the most an answer counts over its prediction, in training (see _step)
REPLAY_AGE = 5.0  # seconds an outcome is learned from...
REPLAY_MIN = 512  # ...unless it is among the last this many
SAVE_EVERY = 60.0  # seconds between weight saves while serving
CACHE_LIMIT = 4096  # cached network answers (cleared at every training step anyway)
COLD_WEIGHT = 0.1  # the cold-load penalty's EWMA weight per cold load
WARM_SMOOTHING = 1.0  # seconds: the time constant of an upstream's latency for keys it has warm
# Per training step, the share of the network's weights on upstream identity that is forgotten
# (half-life ~35 steps, seconds under load). An upstream it avoids sends no outcomes to unlearn
# a transient fault from, and without this a slow spell learned by name outlives the fault (on
# a fake clock, tests/balance/test_learned_tail.py's healed upstream regained its share 10-18 s
# after healing in 2 of 3 seeds without it, 3 of 3 with it): persistent differences are learned
# again from the traffic that shows them.
IDENTITY_DECAY = 0.02
REFUTED = 2.0  # a probe answered in under 1/REFUTED of the estimate: the estimate was stale
# The guard rail (Learned._guard): on picks where the network overrules its prior (peak-EWMA's
# choice), GUARD_CONTROL of them follow the prior instead, at random: a controlled trial of the
# two on the same situations. Once GUARD_CONTROLS such control picks are in, the network's mean
# realised latency on the others is set against theirs; more than (1 + GUARD_MARGIN) x theirs,
# and by more than GUARD_SIGNIFICANCE standard errors, and it follows the prior for GUARD_HOLD
# seconds.
GUARD_CONTROL = 0.05
GUARD_CONTROLS = 30
GUARD_MARGIN = 0.25
GUARD_SIGNIFICANCE = 2.5
GUARD_HOLD = 60.0

Code = tuple[int, int, int, int, int, int, int, int]


def one_hot(codes: Sequence[Code]) -> np.ndarray:
    """The network's input rows for feature codes."""
    x = np.zeros((len(codes), FEATURES), dtype=np.float32)
    for row, code in enumerate(codes):
        for offset, value in zip(_OFFSETS, code, strict=True):
            x[row, offset + value] = 1.0
    return x


SHARE_WINDOW = 5.0  # seconds: the time constant of the keyed-traffic shares


def _decayed(count: float, elapsed: float) -> float:
    return count * math.exp(-max(elapsed, 0.0) / SHARE_WINDOW)


def _mean_and_error(arm: list[float]) -> tuple[float, float]:
    """The mean of (count, sum, sum of squares) and its standard error."""
    n, total, squares = arm
    mean = total / n
    variance = max(squares / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
    return mean, math.sqrt(variance / n)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class _Net(nn.Module):
    """Features -> (log-latency residual, failure-logit residual)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, hidden)
        self.out = nn.Linear(hidden, 2)
        # Zero residuals at the start: the policy is peak_ewma until data says otherwise.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))  # type: ignore[no-any-return]


class _State:
    """What the policy tracks per upstream (kept in ``Upstream.stats["learned"]``)."""

    __slots__ = (
        "error_bucket",
        "error_logit",
        "error_rate",
        "last_failure",
        "latency",
        "outstanding",
        "picked",
        "picked_at",
        "warm",
        "warm_latency",
    )

    def __init__(self, initial_latency: float, decay_time: float) -> None:
        # Peak-EWMA's estimate as its last answer left it: not decayed toward zero between
        # answers as peak_ewma's reads are. An avoided upstream is probed instead (see pick), and
        # the decay taught the network a bias: an upstream picked rarely always answered slower
        # than its decayed estimate, so it was learned slow by name and kept rare (a healed one
        # had 6% of the traffic 10-20 s after healing, on a fake clock). Of every answer but
        # those to keyed requests the upstream had cold: a model load must not make it look
        # slow for the models it has loaded (Learned.cold_penalty holds that cost).
        self.latency = LatencyEstimate(initial_latency, decay_time)
        # Answers to keys it had warm, smoothed rather than peak-sensitive: such an answer is
        # often slow only for having queued behind a model load, and a peak would make every
        # model it holds look as slow as a cold load elsewhere, scattering them (each move a
        # new load). A real slowdown still shows, here within a second or so, and at once in
        # ``latency``, failures and the error rate.
        self.warm_latency = LatencyEstimate(initial_latency, WARM_SMOOTHING, peak=False)
        self.set_error_rate(0.0)
        self.last_failure = -math.inf
        # The keys it served most recently, oldest first (key -> time): "warm" means among the
        # last ``warm_keys`` distinct keys and within WARM_WINDOW.
        self.warm: dict[str, float] = {}
        # Keyed picks, an exponentially decayed count (see Learned._over_share).
        self.picked = 0.0
        self.picked_at = 0.0
        # Its picks awaiting their outcome, oldest first (id of the request -> when sent): a
        # request in flight far longer than its estimate is evidence before its answer is.
        self.outstanding: dict[int, float] = {}

    def set_error_rate(self, rate: float) -> None:
        """The error rate, and what a pick needs of it, kept with it (it changes only on an
        outcome): its bucket among the features and the logit of its clamped value, the prior."""
        self.error_rate = rate
        self.error_bucket = bisect_right(ERROR_EDGES, rate)
        clamped = min(max(rate, 0.01), 0.99)
        self.error_logit = math.log(clamped / (1.0 - clamped))

    def estimate(self, warmth: int, now: float, cold_penalty: float) -> float:
        """Its latency estimate for a request whose key is warm (2), cold (1) or absent (0)."""
        if warmth == 2 and self.warm_latency.observed:
            return self.warm_latency.get(now)
        if warmth == 1:
            return self.latency.value + cold_penalty
        return self.latency.value


class Learned(Policy):
    name = "learned"
    learns = True

    def __init__(
        self,
        group: Sequence[Upstream],
        settings: LearnedSettings | None = None,
        *,
        hash_key: str | None = None,
        rng: random.Random | None = None,
        train_in_thread: bool = False,
    ) -> None:
        super().__init__(group)
        # Training off the caller's thread (the server's event loop): maintain() hands a step's
        # minibatches to this thread and takes the new weights at a later call. Off (the
        # default) for the fake-clock simulator and tests, where steps must land deterministically.
        self._trainer = ThreadPoolExecutor(1, "webtorch-learned-train") if train_in_thread else None
        self._training: Future[float] | None = None
        s = settings if settings is not None else LearnedSettings()
        self.explore = s.explore
        self.sample = s.sample
        self.explore_margin = s.explore_margin
        self.warm_keys = s.warm_keys
        self.key_balance = s.key_balance
        self._keyed = 0.0  # all keyed picks, decayed like each upstream's count
        self._keyed_at = 0.0
        total_weight = sum(u.weight for u in self.group) or 1
        self._fair = {u.index: u.weight / total_weight for u in self.group}
        self.batch = s.batch
        self.train_interval = s.train_interval
        self.failure_cost = s.failure_cost
        self.decay_time = s.decay_time
        self.initial_latency = s.initial_latency
        self.key = KeySpec.parse(hash_key) if hash_key else None
        self.rng = rng or random.Random()
        self.state_dir = s.state_dir
        self.net = _Net(s.hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=s.learning_rate)
        # Per pick awaiting its outcome: the features and the priors it was scored with.
        self._pending: dict[tuple[int, int], tuple[Code, float, float]] = {}
        self._replay: deque[tuple[Code, float, float, float, float]] = deque(maxlen=REPLAY)
        self._replayed_at: deque[float] = deque(maxlen=REPLAY)  # when each outcome came
        self._cache: dict[Code, tuple[float, float]] = {}
        self._fresh = 0  # outcomes since the last training step
        # The identity slots the group uses, and those whose learned part is stale (see _forget).
        self._slots = sorted({u.index % MAX_UPSTREAMS for u in self.group})
        self._stale: set[int] = set()
        self._last_train = -math.inf
        self._last_save = -math.inf
        self.steps = 0
        self.prediction_error = 0.0  # EWMA of |predicted - actual| log-latency, chosen upstream
        # (outcomes compared, sum of predicted seconds, sum of observed seconds): the dashboard
        # diffs it each second to draw prediction against what happened.
        self.compared: tuple[int, float, float] = (0, 0.0, 0.0)
        self.explored = 0
        # The guard rail (see _guard): times it backed off to the prior (in /metrics), until when
        # it follows the prior, and its trial: per overruling pick awaiting its outcome, whether
        # it was a control (followed the prior); per arm, (picks, sum, sum of squares) of the
        # seconds they took.
        self.guard_backoffs = 0
        self.backed_off_until = -math.inf
        self._guarded: dict[tuple[int, int], bool] = {}
        self._trial: list[list[float]] = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
        # Seconds a cold key costs beyond a warm answer (a model load): an EWMA over every cold
        # load in the group, without decay in time, since a load costs what it costs however
        # long ago the last one was.
        # Until one is seen, it is the pessimistic prior: keys are sticky from the start.
        self.cold_penalty = self.initial_latency
        self.cold_loads = 0
        for upstream in self.group:
            upstream.stats["learned"] = _State(self.initial_latency, self.decay_time)
        self._load()
        self._sync()

    # -- picking -------------------------------------------------------------------------------

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        key = self.key.extract(request) if self.key is not None else None
        if len(candidates) > self.sample:
            scored = self.rng.sample(list(candidates), self.sample)
            if key is not None and not any(key in u.stats["learned"].warm for u in scored):
                # Affinity in the sample: the upstream with this key warm is always scored.
                for upstream in candidates:
                    if key in upstream.stats["learned"].warm:
                        scored[0] = upstream
                        break
        else:
            scored = list(candidates)
        shared = self._request_code(request, key)
        if key is not None:
            scored = self._keyed_candidates(key, scored, now)
        backed_off = now < self.backed_off_until
        if len(candidates) == 1:
            self.last_reason = "only_candidate"
        else:
            self.last_reason = "learned_prior" if backed_off else "learned"
        costs: list[tuple[float, Upstream, tuple[Code, float, float]]] = []
        prior_best = math.inf
        prior_pick = 0  # the prior's own choice, an index into costs
        for upstream in scored:
            code, prior_latency, prior_logit = self._score_inputs(upstream, shared, key, now)
            prior_cost = math.exp(prior_latency) + self.failure_cost * _sigmoid(prior_logit)
            if prior_cost < prior_best:
                prior_best, prior_pick = prior_cost, len(costs)
            if backed_off:
                cost = prior_cost
            else:
                residual_latency, residual_logit = self._residual(code)
                cost = math.exp(prior_latency + residual_latency) + self.failure_cost * _sigmoid(
                    prior_logit + residual_logit
                )
            costs.append((cost, upstream, (code, prior_latency, prior_logit)))
        best_cost, best, best_entry = min(costs, key=itemgetter(0))
        network_choice = best
        warm_here = [c for c in costs if c[2][0][4] == 2] if key is not None else []
        if len(warm_here) > 1:
            # Warm in several places: the one it went to last, unless it is predicted to cost
            # more than a model load over the best. A key that spilled off an upstream over
            # its share then moves whole and stays, rather than following in-flight counts
            # back and forth (which multiply small differences: ratios of costs say little
            # here) and leaving the upstream it spilled to with the odd request of many keys,
            # more than it holds, each one a load that pushes another model out.
            latest = max(warm_here, key=lambda c: c[1].stats["learned"].warm[key])
            if latest[1] is not best and latest[0] <= best_cost + self.cold_penalty:
                best_cost, best, best_entry = latest
        elif key is not None and len(costs) > 1 and not warm_here:
            # A key warm nowhere goes to its home: of the candidates below their fair share of
            # keyed traffic (all, if none is), the first in the key's rendezvous-hash order;
            # unless that is predicted to cost more than explore_margin x the best. A model is
            # then loaded in one place, not wherever in-flight counts pointed each of its first
            # requests, and new keys fill the emptiest upstreams: models tend to appear most
            # popular first, so this packs them as longest-first scheduling does, leaving little
            # to spill later under key_balance. Shares count from the first keyed pick here,
            # since most keys are first asked for within the first few dozen requests.
            roomy = [c for c in costs if self._keyed_load(c[1], now, least=1.0) < 1.0] or costs
            home = max(roomy, key=lambda c: hash64(f"{key}@{c[1].address}".encode()))
            if home[1] is not best and home[0] <= self.explore_margin * best_cost:
                best_cost, best, best_entry = home
                self.last_reason = "learned_home"
        if len(costs) > 1:
            # Recovery: an avoided upstream gets no answers to learn it healed from; one idle and
            # unmeasured for a while is sent a request (peak_ewma's probe: see its module doc).
            # Not a keyed request where its key is cold: a probe must not cost a model load.
            for entry in costs:
                other = entry[1]
                if (
                    other is not best
                    and entry[2][0][4] != 1
                    and other.stats["learned"].latency.due(now, other.inflight)
                ):
                    other.stats["learned"].latency.probed(now)
                    _, best, best_entry = entry
                    self.last_reason = "learned_probe"
                    break
        if (
            len(costs) > 1
            and self.last_reason != "learned_probe"
            and self.rng.random() < self.explore
        ):
            # Exploration stays near the best: among the others predicted to cost at most
            # explore_margin x the best. Trying one that is surely worse teaches little (its
            # estimate says so already, and it ages until a request tries it again) and would
            # cost a client a slow answer, or a cold model load, every time.
            limit = self.explore_margin * best_cost
            near = [c for c in costs if c[1] is not best and c[0] <= limit]
            if near:
                _, best, best_entry = near[self.rng.randrange(len(near))]
                self.explored += 1
                self.last_reason = "learned_explore"
        if self.last_reason == "learned" and best is network_choice and key is None:
            prior = costs[prior_pick]
            if prior[1] is not best:
                # The network overrules its prior here: a pick for the guard rail's trial, and
                # one in GUARD_CONTROL follows the prior (the trial's control arm). Not a keyed
                # request: there a pick's cost is not all in its own answer (a cold load evicts
                # another key's model, which later requests pay for), and affinity decides.
                control = self.rng.random() < GUARD_CONTROL
                if control:
                    _, best, best_entry = prior
                    self.last_reason = "learned_control"
                guarded = self._guarded
                if len(guarded) >= PENDING_LIMIT:
                    guarded.pop(next(iter(guarded)))
                guarded[(id(request), best.index)] = control
        pending = self._pending
        if len(pending) >= PENDING_LIMIT:
            pending.pop(next(iter(pending)))  # an outcome that never came (a cancelled attempt)
        pending[(id(request), best.index)] = best_entry
        if key is None:
            # In flight, for the tail in the loop (see _score_inputs). Not a keyed request: a
            # model load is slow by nature, and its cost is priced as such (cold_penalty).
            outstanding = best.stats["learned"].outstanding
            if len(outstanding) >= PENDING_LIMIT:
                outstanding.pop(next(iter(outstanding)))
            outstanding[id(request)] = now
        if key is not None:
            st_best: _State = best.stats["learned"]
            st_best.picked = _decayed(st_best.picked, now - st_best.picked_at) + 1.0
            st_best.picked_at = now
            self._keyed = _decayed(self._keyed, now - self._keyed_at) + 1.0
            self._keyed_at = now
            warm = st_best.warm
            seen = warm.pop(key, None)
            if seen is not None and now - seen < WARM_WINDOW and self.last_reason == "learned":
                self.last_reason = "learned_affinity"  # the key was warm where it went
            warm[key] = now
            if len(warm) > self.warm_keys:
                warm.pop(next(iter(warm)))
        return best

    def _keyed_candidates(self, key: str, scored: list[Upstream], now: float) -> list[Upstream]:
        """Affinity within bounded loads: a key stays where it is warm, but no upstream takes
        more than (1 + key_balance) x its fair share of keyed traffic while others have room
        (consistent hashing with bounded loads, applied to the learned choice). Only upstreams
        that answer count as room: balancing must never push traffic onto one that fails."""
        within = [
            u
            for u in scored
            if u.stats["learned"].error_rate < 0.2 and not self._over_share(u, now)
        ]
        if not within:
            return scored
        warm = [u for u in scored if key in u.stats["learned"].warm]
        if warm:
            latest = max(warm, key=lambda u: u.stats["learned"].warm[key])
            if latest not in within:
                # The key's upstream is over its share: it spills to one with real room, below
                # its fair share (warm there if it can be). Spilling merely to wherever is
                # under the cap would shuffle popular keys among the upstreams at the cap and
                # leave one below its share for good, taking only the odd spilled request,
                # each a model load.
                room = [u for u in within if self._keyed_load(u, now) < 1.0]
                return [u for u in room if u in warm] or room or within
        return within

    def predict(
        self, request: Request, candidates: Sequence[Upstream], now: float
    ) -> list[tuple[float, float]]:
        """(predicted seconds, failure probability) per candidate: for tests and the dashboard."""
        key = self.key.extract(request) if self.key is not None else None
        shared = self._request_code(request, key)
        out = []
        for upstream in candidates:
            code, prior_latency, prior_logit = self._score_inputs(upstream, shared, key, now)
            residual_latency, residual_logit = self._residual(code)
            out.append(
                (
                    math.exp(prior_latency + residual_latency),
                    _sigmoid(prior_logit + residual_logit),
                )
            )
        return out

    def _keyed_load(self, upstream: Upstream, now: float, least: float = 20.0) -> float:
        """Its share of recent keyed picks over its fair share (1.0: exactly its part);
        0.0 while there are fewer than ``least`` keyed picks to speak of shares."""
        st: _State = upstream.stats["learned"]
        total = _decayed(self._keyed, now - self._keyed_at)
        if total < least:
            return 0.0
        share = _decayed(st.picked, now - st.picked_at) / total
        return share / max(self._fair.get(upstream.index, 0.0), 1e-9)

    def _over_share(self, upstream: Upstream, now: float) -> bool:
        return self._keyed_load(upstream, now) > 1.0 + self.key_balance

    @staticmethod
    def _request_code(request: Request, key: str | None) -> tuple[int, int, int, int]:
        size = request.body_length()
        if size is None:
            size = 1 << 20  # a chunked upload of unknown length: count it as large
        route = zlib.crc32(request.path.split("/", 2)[1].encode()) % ROUTE_BUCKETS
        method = 0 if request.method in ("GET", "HEAD") else 1
        return route, bisect_right(SIZE_EDGES, size), method, 0 if key is None else 1

    def _score_inputs(
        self, upstream: Upstream, shared: tuple[int, int, int, int], key: str | None, now: float
    ) -> tuple[Code, float, float]:
        """The network's features for one candidate, and the two priors it corrects: log of
        peak-EWMA's estimate ``ewma x (inflight + 1)`` and the logit of the error rate."""
        st: _State = upstream.stats["learned"]
        route, size, method, has_key = shared
        warmth = 0
        if has_key:
            seen = st.warm.get(key) if key is not None else None
            warmth = 2 if seen is not None and now - seen < WARM_WINDOW else 1
        code: Code = (
            upstream.index % MAX_UPSTREAMS,
            route,
            size,
            method,
            warmth,
            bisect_right(INFLIGHT_EDGES, upstream.inflight),
            bisect_right(SINCE_FAILURE_EDGES, now - st.last_failure),
            st.error_bucket,
        )
        if st.latency.observed:
            estimate = st.estimate(warmth, now, self.cold_penalty)
            outstanding = st.outstanding
            while len(outstanding) > upstream.inflight:
                # More awaited than in flight: an attempt ended unobserved (the client left, no
                # connection came): its entry would age for ever. The oldest go first.
                del outstanding[next(iter(outstanding))]
            if outstanding:
                # The tail in the loop: a request out longer than the estimate (a stall, one of
                # its intermittently slow answers) makes it at least that slow now, and whatever
                # is sent there may queue behind it; peak-EWMA learns of it only when (if) the
                # answer comes.
                estimate = max(estimate, now - next(iter(outstanding.values())))
        else:
            # Never measured: free while idle, so that it gets a request to be measured by,
            # and pessimistic while that request is out (as peak_ewma).
            estimate = self.initial_latency if upstream.inflight else 1e-4
            if warmth == 1:
                estimate += self.cold_penalty
        prior_latency = math.log(max(estimate, 1e-4) * (upstream.inflight + 1))
        return code, prior_latency, st.error_logit

    def _residual(self, code: Code) -> tuple[float, float]:
        """The network's two corrections for these features. The features are discrete, so
        answers are cached until the next training step: a pick costs dictionary lookups, not
        a forward pass."""
        cached = self._cache.get(code)
        if cached is None:
            x = one_hot([code])
            hidden = np.maximum(x @ self._w1 + self._b1, 0.0)
            out = hidden @ self._w2 + self._b2
            cached = (float(out[0, 0]), float(out[0, 1]))
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[code] = cached
        return cached

    # -- learning ------------------------------------------------------------------------------

    def observe(
        self,
        upstream: Upstream,
        outcome: Outcome,
        latency: float,
        now: float,
        request: Request | None = None,
    ) -> None:
        st: _State = upstream.stats["learned"]
        failed = outcome.is_failure
        # A failure counts as slow: it must never make an upstream look fast.
        seen = max(latency, self.initial_latency) if failed else latency
        st.set_error_rate(st.error_rate * ERROR_DECAY + (1.0 - ERROR_DECAY) * float(failed))
        if failed:
            st.last_failure = now
        entry = None
        if request is not None:
            entry = self._pending.pop((id(request), upstream.index), None)
            st.outstanding.pop(id(request), None)
        warmth = entry[0][4] if entry is not None else 0
        if warmth == 1 and not failed:
            # A cold load: what it cost beyond a warm answer is the model's, not the upstream's.
            measured = st.latency.observed
            extra = max(latency - (st.estimate(2, now, 0.0) if measured else 0.0), 0.0)
            if self.cold_loads:
                self.cold_penalty += COLD_WEIGHT * (extra - self.cold_penalty)
            else:
                self.cold_penalty = extra
            self.cold_loads += 1
            if not measured:
                # Its first answers may all be loads: what is left of one without the load is
                # its first measure (else it would stay "never measured", pessimistic while
                # busy, and be starved of the keys it holds).
                st.latency.observe(max(latency - self.cold_penalty, 1e-4), now)
        else:
            estimate = st.latency.value
            probing = st.latency.probing
            st.latency.observe(seen, now)
            if warmth == 2:
                st.warm_latency.observe(seen, now)
            if probing and not failed and REFUTED * latency < estimate:
                # A probe found it far faster than the estimate that kept it avoided: that
                # estimate is replaced (LatencyEstimate.observe), and what the network learned of
                # it by name in the same spell is as stale (see _forget).
                self._stale.add(upstream.index % MAX_UPSTREAMS)
        if entry is None:
            return
        code, prior_latency, prior_logit = entry
        control = self._guarded.pop((id(request), upstream.index), None)
        if control is not None:
            self._guard(control, seen, now)
        log_latency = math.log(max(latency, 1e-4))
        self._replay.append((code, prior_latency, prior_logit, log_latency, float(failed)))
        self._replayed_at.append(now)
        self._fresh += 1
        if not failed:
            predicted = prior_latency + self._residual(code)[0]
            error = abs(predicted - log_latency)
            self.prediction_error = 0.98 * self.prediction_error + 0.02 * error
            n, predicted_sum, observed_sum = self.compared
            self.compared = (n + 1, predicted_sum + math.exp(predicted), observed_sum + latency)

    def _guard(self, control: bool, realised: float, now: float) -> None:
        """The guard rail: the network must never do much worse than its prior. On the picks
        where it overrules the prior, a random GUARD_CONTROL of them follow the prior instead
        (reason ``learned_control``), so both arms face the same situations and what each
        delivered is measured, not estimated (an estimate from the prior would be wrong exactly
        where the network is right). Every GUARD_CONTROLS control outcomes a verdict: the
        network's mean (failures count as slow, the tail weighs in) more than GUARD_MARGIN
        above the control's, and by more than GUARD_SIGNIFICANCE standard errors (Welch: heavy
        tails make a window's mean noisy), backs it off to the prior for GUARD_HOLD seconds;
        then it gets a fresh trial."""
        arm = self._trial[control]
        arm[0] += 1.0
        arm[1] += realised
        arm[2] += realised * realised
        prior_arm, network_arm = self._trial[True], self._trial[False]
        if prior_arm[0] < GUARD_CONTROLS:
            return
        self._trial = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
        if network_arm[0] < 2.0:
            return
        network_mean, network_error = _mean_and_error(network_arm)
        prior_mean, prior_error = _mean_and_error(prior_arm)
        gap = network_mean - prior_mean
        if (
            network_mean > (1.0 + GUARD_MARGIN) * prior_mean
            and gap > GUARD_SIGNIFICANCE * math.hypot(network_error, prior_error)
            and now >= self.backed_off_until
        ):
            self.backed_off_until = now + GUARD_HOLD
            self.guard_backoffs += 1
            log.warning(
                "learned policy: where it overruled its prior its picks took %.1f ms on average, "
                "the prior's %.1f ms; following the prior (peak-EWMA) for %.0f s",
                1e3 * network_mean,
                1e3 * prior_mean,
                GUARD_HOLD,
            )

    def backed_off_for(self, now: float) -> float:
        """Seconds it still follows its prior after a guard rail back-off (0.0: it does not)."""
        return max(self.backed_off_until - now, 0.0)

    def maintain(self, now: float) -> None:
        training = self._training
        if training is not None:
            if not training.done():
                return  # the thread is still at it: nothing else touches the network meanwhile
            self._training = None
            self._finished(training)
        if self._stale:
            self._forget()
        if self._fresh >= self.batch and now - self._last_train >= self.train_interval:
            # One step per batch of new outcomes (a few at most per call): the network keeps up
            # with the traffic instead of learning at a fixed rate.
            # Outcomes older than REPLAY_AGE are not learned from (but the last REPLAY_MIN are):
            # a fault that has passed must not be taught for as long as it takes 8192 newer
            # outcomes to arrive (41 s at 200 requests/s).
            replay, stamps = self._replay, self._replayed_at
            while len(replay) > REPLAY_MIN and now - stamps[0] > REPLAY_AGE:
                replay.popleft()
                stamps.popleft()
            batches = [self._minibatch() for _ in range(min(self._fresh // self.batch, 4))]
            self._fresh = 0
            self._last_train = now
            if self._trainer is None:
                for batch in batches:
                    self._step(batch)
                self._sync()
            else:
                self._training = self._trainer.submit(self._steps, batches)
                return
        if self.state_dir is not None and self.steps and now - self._last_save >= SAVE_EVERY:
            self._save()
            self._last_save = now

    def _forget(self) -> None:
        """What the network learned of each upstream in ``_stale`` by name becomes the group's
        average: a probe refuted the estimate that kept it avoided, and an avoided upstream sends
        no outcomes to unlearn its spell from; fading (IDENTITY_DECAY) takes tens of seconds, and
        a residual only a fifth above the others' starves it (the pick takes the least cost).
        Called only while no training step is out: it writes the weights."""
        stale, self._stale = self._stale, set()
        others = [slot for slot in self._slots if slot not in stale]
        if not others:
            return
        weight = self.net.hidden.weight
        moments = self.optimizer.state.get(weight, {})
        with torch.no_grad():
            group = weight[:, others].mean(dim=1)
            for slot in stale:
                weight[:, slot] = group
                average = moments.get("exp_avg")
                if isinstance(average, torch.Tensor):
                    average[:, slot] = 0.0  # no momentum left to carry the old belief back
        self._sync()

    def _finished(self, training: Future[float]) -> None:
        """Take a background step's weights (or log why it failed: the old ones stay)."""
        try:
            training.result()
        except Exception:
            log.exception("learned policy: a training step failed")
        self._sync()

    def _wait(self) -> None:
        """Let a background step finish (before the network is used here)."""
        training, self._training = self._training, None
        if training is not None:
            self._finished(training)

    def train_step(self) -> float:
        """One optimizer step on a minibatch of recent outcomes, here and now; returns its
        loss."""
        self._wait()
        if not self._replay:
            return 0.0
        loss = self._step(self._minibatch())
        self._fresh = max(self._fresh - self.batch, 0)
        self._sync()
        return loss

    def _minibatch(self) -> list[tuple[Code, float, float, float, float]]:
        replay = self._replay
        if not replay:
            return []
        size = min(self.batch, len(replay))
        return [replay[self.rng.randrange(len(replay))] for _ in range(size)]

    def _steps(self, batches: list[list[tuple[Code, float, float, float, float]]]) -> float:
        loss = 0.0
        for batch in batches:
            loss = self._step(batch)
        return loss

    def _step(self, picks: list[tuple[Code, float, float, float, float]]) -> float:
        """One optimizer step on ``picks``. Touches only the network and its optimizer, so it
        may run on the training thread (nothing reads them while a step is out)."""
        if not picks:
            return 0.0
        x = torch.from_numpy(one_hot([p[0] for p in picks]))
        prior_latency = torch.tensor([p[1] for p in picks])
        prior_logit = torch.tensor([p[2] for p in picks])
        log_latency = torch.tensor([p[3] for p in picks])
        failed = torch.tensor([p[4] for p in picks])
        out = self.net(x)
        ok = 1.0 - failed
        # Latency is learned from answers (a failure's time says little about the next answer);
        # failures from every outcome. The latency target is the expected latency, not a
        # typical one: with y the latency and m = exp(prior + residual) the prediction, the loss
        # y/m - log(y/m) - 1 (gamma deviance) is least where m is the mean of y. An upstream
        # fast on 95% of its requests and 50x slower on 5% is predicted at its mean, 3.5x
        # fast, where squared log-latency error made it its geometric mean, 1.2x, and the
        # network learned to cancel peak-EWMA's caution after each slow answer (issue 23).
        # y/m is clipped at RATIO_CLIP: one timeout must not swamp a step.
        log_ratio = log_latency - (prior_latency + out[:, 0])
        ratio = torch.exp(log_ratio.clamp(max=math.log(RATIO_CLIP)))
        deviance = ok * (ratio - log_ratio - 1.0)
        latency_loss = deviance.sum() / ok.sum().clamp(min=1.0)
        fail_loss = nn.functional.binary_cross_entropy_with_logits(prior_logit + out[:, 1], failed)
        loss = latency_loss + fail_loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            # What it knows of one upstream by name fades unless outcomes keep supporting it
            # (see IDENTITY_DECAY): an upstream avoided after a transient fault sends none.
            self.net.hidden.weight[:, :MAX_UPSTREAMS] *= 1.0 - IDENTITY_DECAY
        self.steps += 1
        return float(loss.detach())

    def _sync(self) -> None:
        """Copy the weights to numpy for inference; cached answers are stale now."""
        with torch.no_grad():
            self._w1 = self.net.hidden.weight.detach().numpy().T.copy()
            self._b1 = self.net.hidden.bias.detach().numpy().copy()
            self._w2 = self.net.out.weight.detach().numpy().T.copy()
            self._b2 = self.net.out.bias.detach().numpy().copy()
        self._cache = {}

    # -- persistence ---------------------------------------------------------------------------

    @property
    def _weights_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "weights.safetensors"

    def _load(self) -> None:
        path = self._weights_path
        if path is None or not path.exists():
            return
        try:
            state = load_file(str(path))
            self.net.load_state_dict(state)
        except Exception as exc:  # a damaged or incompatible file: start from the prior
            log.warning("learned policy: ignoring %s (%s); starting from the prior", path, exc)
            return
        log.info("learned policy: loaded weights from %s", path)

    def _save(self) -> None:
        path = self._weights_path
        if path is None:
            return
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        # Atomic (a crash mid-save leaves the previous weights) and 0600 in a 0700 directory:
        # the weights are learned from the traffic.
        write_private(path, lambda temp: save_file(state, str(temp)))

    def close(self) -> None:
        self._wait()
        if self._trainer is not None:
            self._trainer.shutdown(wait=True)
        if self._fresh:
            self.train_step()  # what came in since the last step is learned before it is saved
        if self.steps:
            self._save()
