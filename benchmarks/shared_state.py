"""What the state shared by workers (webtorch/shared/) costs per request, on the guard's path and
the proxy's, against the in-process state of one process: the same calls, interleaved, on this
process's CPU, the best of many repeats (a busy neighbour on the other core only ever adds
time, so the minimum is the cost).

    PYTHONPATH=$PWD/src taskset -c 0 .venv/bin/python benchmarks/shared_state.py [--repeats 25]
        [--clients 64]

Guard: ``Guard.rules`` for one request of one of ``--clients`` clients, in turn (the lists, the
ban check, the token bucket, with bans on; "+surge" adds the surge defence), no detector: what the
rules cost is all there is to compare, and the detector (the same either way) would only add
noise. Proxy: what a proxied request asks of its group's health (``eligible`` before the pick,
``record`` after the attempt), two upstreams. Run against an older tree (PYTHONPATH=its src),
the "local" rows give the one-process figures before the store existed.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

from webtorch.guard.core import Guard, GuardSettings
from webtorch.proxy.health import GroupHealth, OutlierSettings, PassiveSettings
from webtorch.vocab import Outcome, Upstream

N = 20_000


class _View:
    path = "/"


def guard_loop(guard: Guard, clients: list[str]) -> Callable[[], float]:
    view: Any = _View()
    rules = guard.rules
    count = len(clients)
    turn = [0]

    def run() -> float:
        now = 1000.0
        at = turn[0]
        start = time.perf_counter()
        for _ in range(N):
            now += 1e-5
            rules(view, clients[at], now)
            at = at + 1 if at + 1 < count else 0
        turn[0] = at  # the next repeat goes on where this one stopped
        return time.perf_counter() - start

    return run


def health_loop(health: GroupHealth, upstreams: list[Upstream]) -> Callable[[], float]:
    eligible, record, ok = health.eligible, health.record, Outcome.OK

    def run() -> float:
        now = 1000.0
        start = time.perf_counter()
        for i in range(N):
            now += 1e-5
            eligible(now)
            record(upstreams[i & 1], ok, now)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args()
    clients = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(args.clients)]
    cases: dict[str, Callable[[], float]] = {}
    stores: list[Any] = [None]
    try:
        from webtorch.shared.memory import Region, SharedStore

        region = Region.create(100_000)
        stores.append(SharedStore(region, 0, 2))
    except ImportError:  # a tree from before the store: its one-process figures only
        region = None
    for store in stores:
        where = "local" if store is None else "shared"
        extra: dict[str, Any] = {} if store is None else {"store": store}
        bucket = GuardSettings(rate=1e9, burst=1e9, ban_seconds=60.0)
        cases[f"guard, {where}"] = guard_loop(Guard(bucket, **extra), clients)
        surge = GuardSettings(rate=1e9, burst=1e9, ban_seconds=60.0, surge_rate=1e9)
        cases[f"guard+surge, {where}"] = guard_loop(Guard(surge, **extra), clients)
        ups = [Upstream(f"127.0.0.1:{9000 + i}", "127.0.0.1", 9000 + i, 1, index=i) for i in (0, 1)]
        shared: dict[str, Any] = {} if store is None else {"shared": store, "name": "g"}
        health = GroupHealth(
            ups, PassiveSettings(), OutlierSettings(), None, 0.0, random.Random(1), **shared
        )
        cases[f"proxy health, {where}"] = health_loop(health, ups)
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeats):
        for name, run in cases.items():  # interleaved: a noisy spell hits every case alike
            best[name] = min(best[name], run())
    print("| path | state | us per request |\n|---|---|---:|")
    for name, seconds in best.items():
        path, where = name.split(", ")
        print(f"| {path} | {where} | {1e6 * seconds / N:.2f} |")
    if region is not None:
        region.destroy()


if __name__ == "__main__":
    main()
