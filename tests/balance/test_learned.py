"""The learned policy under a fake clock: its prior, learning from outcomes, affinity, failures,
and weights that survive a restart."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from webtorch.balance.base import Outcome, Upstream
from webtorch.balance.hashing import hash64
from webtorch.balance.learned import Learned
from webtorch.balance.settings import LearnedSettings
from webtorch.http.messages import Request


def group(n: int) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(n)]


def get(key: str | None = None, size: int = 0) -> Request:
    headers = [(b"x-key", key.encode())] if key is not None else []
    return Request("POST" if size else "GET", "/api/x", "", headers, b"x" * size)


def policy(ups: list[Upstream], **settings: object) -> Learned:
    # The network's first layer starts from torch's global generator: seeded here, so that a
    # test does not depend on which tests ran before it.
    torch.manual_seed(0)
    return Learned(
        ups,
        LearnedSettings(**{"explore": 0.0, "batch": 32, **settings}),  # type: ignore[arg-type]
        hash_key="header:x-key",
        rng=random.Random(3),
    )


def serve(
    p: Learned, ups: list[Upstream], latency_of: object, rounds: int, now: float = 0.0
) -> tuple[Counter[int], float]:
    """Send ``rounds`` requests through ``p`` (one at a time), answering each with
    ``latency_of(upstream, request) -> (outcome, seconds)``, training as the proxy would."""
    assert callable(latency_of)
    picked: Counter[int] = Counter()
    for i in range(rounds):
        request = get(key=f"k{i % 4}")
        upstream = p.pick(request, ups, now)
        picked[upstream.index] += 1
        outcome, seconds = latency_of(upstream, request)
        now += 0.01
        p.observe(upstream, outcome, seconds, now, request)
        p.maintain(now)
    return picked, now


def test_before_any_data_it_is_peak_ewma() -> None:
    ups = group(2)
    p = policy(ups)
    now = 1.0
    # One observation each: upstream 1 answered in 200 ms, upstream 0 in 5 ms.
    for u, seconds in ((ups[0], 0.005), (ups[1], 0.2)):
        p.observe(u, Outcome.OK, seconds, now)
    assert all(p.pick(get(), ups, now) is ups[0] for _ in range(20))
    # In-flight counts too: ewma x (inflight + 1), as peak_ewma.
    ups[0].inflight = 100
    assert p.pick(get(), ups, now) is ups[1]


def test_a_fast_failing_upstream_does_not_attract_traffic() -> None:
    ups = group(3)
    p = policy(ups)

    def answer(u: Upstream, r: Request) -> tuple[Outcome, float]:
        if u.index == 1:
            return Outcome.SERVER_ERROR, 0.001  # 503 in a millisecond
        return Outcome.OK, 0.02

    picked, _ = serve(p, ups, answer, 600)
    assert picked[1] < 0.05 * 600, picked


def test_it_learns_request_dependent_cost() -> None:
    # Upstream 0 is slow for large requests only; upstream 1 costs the same for all.
    ups = group(2)
    p = policy(ups, train_interval=0.001, batch=16, learning_rate=1e-2)
    rng = random.Random(5)
    now = 0.0
    errors = []
    for i in range(3000):
        size = 100_000 if rng.random() < 0.5 else 0
        request = get(size=size)
        upstream = ups[i % 2]  # both observed equally: a supervised stream
        shared = p._request_code(request, None)
        p._pending[(id(request), upstream.index)] = p._score_inputs(upstream, shared, None, now)
        seconds = 0.5 if (upstream.index == 0 and size) else 0.02
        now += 0.01
        p.observe(upstream, Outcome.OK, seconds, now, request)
        p.maintain(now)
        if i % 500 == 499:
            errors.append(p.prediction_error)
    assert errors[-1] < errors[0] * 0.8, errors
    big, small = get(size=100_000), get(size=0)
    assert p.pick(big, ups, now) is ups[1]  # large requests avoid upstream 0...
    (slow, _), (fast, _) = p.predict(big, ups, now)
    assert slow > 2 * fast
    (a, _), (b, _) = p.predict(small, ups, now)
    assert a < 3 * b  # ...while small ones cost about the same on both


def test_affinity_keeps_a_key_where_it_is_warm() -> None:
    # A cold upstream pays 200 ms the first time it serves a key (a model load); warm: 10 ms.
    ups = group(4)
    p = policy(ups, train_interval=0.001, explore=0.05)
    warm: set[tuple[int, str]] = set()

    def answer(u: Upstream, r: Request) -> tuple[Outcome, float]:
        key = r.header(b"x-key")
        assert key is not None
        cold = (u.index, key.decode()) not in warm
        warm.add((u.index, key.decode()))
        return Outcome.OK, 0.2 if cold else 0.01

    serve(p, ups, answer, 1500)
    # After learning, each key sticks to a warm upstream: few new cold loads.
    before = len(warm)
    serve(p, ups, answer, 400, now=100.0)
    assert len(warm) - before <= 8, len(warm) - before


def test_it_scores_every_candidate_and_finds_the_one_fast_upstream() -> None:
    # One fast upstream among ten: a sample of a few would miss it on most picks.
    ups = group(10)
    p = policy(ups)
    for u in ups:
        p.observe(u, Outcome.OK, 0.001 if u.index == 7 else 0.1, 0.0)
    picks = Counter(p.pick(get(), ups, 0.01).index for _ in range(100))
    assert picks == Counter({7: 100}), picks


def test_exploration_stays_near_the_best() -> None:
    ups = group(4)
    p = policy(ups, explore=1.0, explore_margin=2.0)
    for u, seconds in zip(ups, (0.010, 0.015, 0.5, 1.0), strict=True):
        p.observe(u, Outcome.OK, seconds, 0.0)
    picks = Counter(p.pick(get(), ups, 0.0).index for _ in range(200))
    # Every pick explores: always the one other candidate within 2x of the best, never the
    # ones that would cost a client a slow answer.
    assert set(picks) == {1}, picks
    assert p.last_reason == "learned_explore"


def test_an_avoided_upstream_is_probed_and_regains_its_share_when_healed() -> None:
    ups = group(2)
    p = policy(ups)
    p.observe(ups[0], Outcome.OK, 0.010, 0.0)
    p.observe(ups[1], Outcome.OK, 2.0, 0.0)  # a slow spell
    assert p.pick(get(), ups, 0.1) is ups[0]
    # Nothing is sent to it, so nothing new is learnt about it; its estimate alone would take
    # ln(2.0 / 0.010) x decay_time = 53 s to fade. A second later it is sent one request.
    now = 0.1
    while p.pick(get(), ups, now) is ups[0]:
        p.observe(ups[0], Outcome.OK, 0.010, now)
        now += 0.1
        assert now < 10.0, "never tried again"
    assert 1.0 <= now < 1.2, now
    assert p.last_reason == "learned_probe"
    p.observe(ups[1], Outcome.OK, 0.010, now)  # healed: its share comes back at once
    picks: Counter[int] = Counter()
    for _ in range(100):  # requests piling up in flight: the cheaper takes each
        chosen = p.pick(get(), ups, now)
        chosen.inflight += 1
        picks[chosen.index] += 1
    assert picks[1] > 30, picks


def test_a_new_key_goes_to_its_home_and_cold_loads_are_priced() -> None:
    ups = group(4)
    p = policy(ups)
    for u in ups:
        p.observe(u, Outcome.OK, 0.01, 0.0)
    # Warm nowhere, every candidate costs the same: the first key goes to its rendezvous home,
    # and each next new key to the first in its rendezvous order of those still below their
    # fair share of keyed picks: four new keys, four upstreams.
    homes = [p.pick(get(k), ups, 0.0) for k in ("a", "b", "c", "d")]
    assert homes[0] is max(ups, key=lambda u: hash64(f"a@{u.address}".encode()))
    assert len({u.index for u in homes}) == 4
    # A key asked for again stays where it went.
    assert [p.pick(get(k), ups, 0.0) for k in ("a", "b", "c", "d")] == homes
    assert p.cold_penalty == p.initial_latency  # the prior: sticky before anything is known
    request = get("g")
    cold = p.pick(request, ups, 0.0)
    p.observe(cold, Outcome.OK, 0.21, 0.1, request)  # a model load: 200 ms over 10 ms
    assert abs(p.cold_penalty - 0.2) < 0.01
    # Its warm latency stays that of the model it has loaded.
    (warm, _), *_ = p.predict(get("g"), [cold], 0.1)
    assert warm < 0.05, warm


def test_weights_survive_a_restart(tmp_path: Path) -> None:
    ups = group(2)
    p = Learned(
        ups, LearnedSettings(explore=0.0, batch=8, state_dir=tmp_path), rng=random.Random(1)
    )
    serve(p, ups, lambda u, r: (Outcome.OK, 0.01 if u.index else 0.05), 200)
    assert p.steps > 0
    p.close()
    assert (tmp_path / "weights.safetensors").exists()
    again = Learned(
        group(2), LearnedSettings(explore=0.0, state_dir=tmp_path), rng=random.Random(1)
    )
    for name, tensor in p.net.state_dict().items():
        assert again.net.state_dict()[name].equal(tensor), name


def test_weights_are_saved_private_and_atomically(tmp_path: Path) -> None:
    """The policy's state is learned from the traffic: 0600 in directories created 0700 (the
    old save left 0644 files in 0755 directories under a 022 umask), renamed into place."""
    old_umask = os.umask(0o022)
    try:
        ups = group(2)
        state = tmp_path / "state" / "learned"
        p = Learned(
            ups, LearnedSettings(explore=0.0, batch=8, state_dir=state), rng=random.Random(1)
        )
        serve(p, ups, lambda u, r: (Outcome.OK, 0.01 if u.index else 0.05), 50)
        p.close()
    finally:
        os.umask(old_umask)
    saved = state / "weights.safetensors"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert [d.stat().st_mode & 0o777 for d in (state, state.parent)] == [0o700, 0o700]
    assert [f.name for f in state.iterdir()] == ["weights.safetensors"]  # no temp file left


def test_a_damaged_weights_file_falls_back_to_the_prior(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"not safetensors")
    p = Learned(group(2), LearnedSettings(state_dir=tmp_path))
    assert float(p.net.out.weight.detach().abs().sum()) == 0.0


def test_in_the_server_training_runs_off_the_event_loop() -> None:
    """A training step costs milliseconds of torch: in the server it runs on its own thread,
    maintain() returning at once, and the new weights are taken at a later call."""
    import threading

    ups = group(2)
    torch.manual_seed(0)
    p = Learned(ups, LearnedSettings(explore=0.0, batch=8), train_in_thread=True)
    gate = threading.Event()
    threads: list[str] = []
    step = p._step

    def gated(picks: list[tuple[object, ...]]) -> float:
        threads.append(threading.current_thread().name)
        assert gate.wait(10.0)
        return step(picks)  # type: ignore[arg-type]

    p._step = gated  # type: ignore[method-assign]
    now = 0.0
    for _ in range(16):
        request = get()
        upstream = p.pick(request, ups, now)
        now += 0.01
        p.observe(upstream, Outcome.OK, 0.5 if upstream.index else 0.01, now, request)
    before = p._w2.copy()
    p.maintain(now)  # hands the step over and returns while it is held at the gate
    assert p._training is not None and not p._training.done()
    assert p.steps == 0 and (p._w2 == before).all()
    p.maintain(now + 1.0)  # still out: nothing is touched
    gate.set()
    p._training.result(timeout=10.0)
    p.maintain(now + 2.0)  # takes the new weights
    assert p._training is None and p.steps == 2
    assert not (p._w2 == before).all()
    assert threads and all(t.startswith("webtorch-learned-train") for t in threads)
    p.close()


# Every setting of [upstreams.X.learned] with another value than its default: each must change
# what the policy does (a setting read nowhere, or shadowed by a second copy, fails here).
OTHER_VALUES: dict[str, object] = {
    "decay_time": 1.0,
    "initial_latency": 0.1,
    "state_dir": "TMP",
    "explore": 0.5,
    "explore_margin": 10.0,
    "sample": 2,
    "warm_keys": 1,
    "key_balance": 5.0,
    "hidden": 8,
    "learning_rate": 0.1,
    "batch": 8,
    "train_interval": 5.0,
    "failure_cost": 10.0,
}


def fingerprint(settings: LearnedSettings) -> tuple[object, ...]:
    """What a policy with ``settings`` does with one fixed workload: its picks, its predictions
    at the end, and the files it keeps."""
    ups = group(6)
    torch.manual_seed(0)
    p = Learned(ups, settings, hash_key="header:x-key", rng=random.Random(5))
    rng = random.Random(1)
    warm: set[tuple[int, str]] = set()
    out: list[tuple[Upstream, Request, float]] = []  # in flight: (upstream, request, done at)
    picks = []
    took_of: dict[int, float] = {}
    now = 0.0
    for i in range(600):
        now += 0.004
        for entry in [e for e in out if e[2] <= now]:
            out.remove(entry)
            upstream, request, _ = entry
            upstream.inflight -= 1
            failed = upstream.index == 5 and rng.random() < 0.3
            outcome = Outcome.SERVER_ERROR if failed else Outcome.OK
            p.observe(upstream, outcome, took_of[id(request)], now, request)
        p.maintain(now)
        key = f"m{rng.randrange(10)}" if i % 2 else None
        request = get(key, size=rng.choice((0, 100_000)))
        upstream = p.pick(request, ups, now)
        upstream.inflight += 1
        picks.append(upstream.index)
        cold = key is not None and (upstream.index, key) not in warm
        if key is not None:
            warm.add((upstream.index, key))
        took = 0.005 * (1 + upstream.index) + (0.1 if cold else 0.0) + (0.02 if i % 3 else 0.0)
        took_of[id(request)] = took
        out.append((upstream, request, now + took))
    predictions = [p.predict(get(k, s), ups, now) for k in (None, "m1") for s in (0, 100_000)]
    p.close()
    kept = sorted(q.name for q in settings.state_dir.iterdir()) if settings.state_dir else []
    return tuple(picks), str(predictions), tuple(kept)


def test_every_learned_setting_changes_what_it_does(tmp_path: Path) -> None:
    assert set(OTHER_VALUES) == set(LearnedSettings.model_fields), "a setting without a check"
    base = fingerprint(LearnedSettings())
    for name, value in OTHER_VALUES.items():
        if value == "TMP":
            value = tmp_path / name
            value.mkdir()
        changed = fingerprint(LearnedSettings(**{name: value}))  # type: ignore[arg-type]
        assert changed != base, f"{name} = {value!r} changes nothing"


def test_the_guard_rail_backs_off_to_the_prior_when_the_network_does_worse() -> None:
    """A network that has learned something wrong (here: made to think the slow upstream is
    fast) must not keep clients on it: a share of the picks where it overrules the prior follow
    the prior instead, and once those show the prior's picks faster, it follows the prior
    (counted, for GUARD_HOLD seconds, then it is tried again)."""
    from webtorch.balance import learned as module

    ups = group(2)
    p = policy(ups)
    p._residual = lambda code: (-6.0 if code[0] == 1 else 0.0, 0.0)  # type: ignore[method-assign]
    now = 0.0

    def answer(u: Upstream) -> float:
        return 0.200 if u.index == 1 else 0.010

    for _ in range(50):  # both measured, the prior choosing the fast one
        for u in ups:
            p.observe(u, Outcome.OK, answer(u), now)
        now += 0.01
    picked: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    limit = int(2 * module.GUARD_CONTROLS / module.GUARD_CONTROL)
    for _ in range(limit):
        request = get()
        u = p.pick(request, ups, now)
        picked[u.index] += 1
        reasons[p.last_reason] += 1
        now += 0.01
        p.observe(u, Outcome.OK, answer(u), now, request)
        if p.guard_backoffs:
            break
    assert p.guard_backoffs == 1, (picked, reasons)
    # The controls were the picks that went to the prior's choice, about GUARD_CONTROL of them.
    assert reasons["learned_control"] == module.GUARD_CONTROLS == picked[0]
    assert p.backed_off_for(now) == pytest.approx(module.GUARD_HOLD, abs=0.02)
    after = Counter(p.pick(get(), ups, now).index for _ in range(50))
    assert after == Counter({0: 50}) and p.last_reason == "learned_prior"
    now += module.GUARD_HOLD
    assert p.backed_off_for(now) == 0.0
    resumed = set()
    for _ in range(5):  # a fresh trial (after the probes of two upstreams idle for a minute)
        request = get()
        u = p.pick(request, ups, now)
        resumed.add(p.last_reason)
        p.observe(u, Outcome.OK, answer(u), now, request)
    assert "learned" in resumed, resumed


def test_the_guard_rail_stays_off_while_the_network_does_better() -> None:
    from webtorch.balance import learned as module

    ups = group(2)
    p = policy(ups)
    # The prior (peak-EWMA) rates upstream 1 worse than it is (one slow answer long ago, and it
    # decays slowly); the network knows better, and is right.
    p.observe(ups[0], Outcome.OK, 0.050, 0.0)
    p.observe(ups[1], Outcome.OK, 5.0, 0.0)
    p._residual = lambda code: (-6.0 if code[0] == 1 else 0.0, 0.0)  # type: ignore[method-assign]
    now = 0.01
    reasons: Counter[str] = Counter()
    for _ in range(int(3 * module.GUARD_CONTROLS / module.GUARD_CONTROL)):
        request = get()
        u = p.pick(request, ups, now)
        reasons[p.last_reason] += 1
        now += 0.001
        p.observe(u, Outcome.OK, 0.050 if u.index == 0 else 0.010, now, request)
    assert p.guard_backoffs == 0
    assert reasons["learned_control"] >= 2 * module.GUARD_CONTROLS, reasons
