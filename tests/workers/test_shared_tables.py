"""The shared-memory state store (webtorch/shared/memory.py) against the in-process one, on fake
clocks: the same answers, atomic updates from concurrent processes, eviction when a set is full,
and a lock left held by a killed process taken over."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from webtorch.config import GuardConfig
from webtorch.guard.core import Guard
from webtorch.proxy.health import ActiveSettings, GroupHealth, OutlierSettings, PassiveSettings
from webtorch.shared.memory import LOCK_TIMEOUT, WAYS, Region, SharedStore, _mp, key_bytes
from webtorch.shared.store import LocalStore
from webtorch.vocab import Outcome, Upstream

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def region() -> Iterator[Region]:
    made = Region.create(0)  # the least: 16 sets of 8 slots per table
    try:
        yield made
    finally:
        made.destroy()


def same_set(region: Region, count: int, prefix: str = "k") -> list[str]:
    """``count`` keys whose slots are in one set."""
    found: list[str] = []
    target = None
    i = 0
    while len(found) < count:
        key = f"{prefix}{i}"
        index = zlib.crc32(key_bytes(key)) & region.clients.mask
        target = index if target is None else target
        if index == target:
            found.append(key)
        i += 1
    return found


def test_buckets_answer_as_the_local_store_does(region: Region) -> None:
    shared, local = SharedStore(region, 0, 2), LocalStore()
    rng = random.Random(7)
    now = 100.0
    for _ in range(3000):
        now += rng.choice([0.0, 0.001, 0.05, 0.3, 2.0])
        key = f"10.0.0.{rng.randrange(20)}"  # 20 keys in 16 sets of 8: none overflows
        rate, burst = rng.choice([(5.0, 10.0), (0.5, 1.0), (20.0, 40.0)])
        assert shared.take(key, now, rate, burst) == pytest.approx(
            local.take(key, now, rate, burst), abs=1e-9
        )
    assert shared.evictions() == 0


def test_a_key_longer_than_a_slot_is_kept_by_its_digest(region: Region) -> None:
    store = SharedStore(region, 0, 1)
    long_key = "key:" + "x" * 100
    assert store.take(long_key, 0.0, 0.001, 1.0) == 0.0
    assert store.take(long_key, 0.0, 0.001, 1.0) > 0.0
    assert store.take(long_key + "y", 0.0, 0.001, 1.0) == 0.0  # another key, another bucket


def test_bans_hold_until_their_end_and_are_counted(region: Region) -> None:
    first, second = SharedStore(region, 0, 2), SharedStore(region, 1, 2)
    assert not second.banned("1.1.1.1", 10.0)
    first.ban("1.1.1.1", 70.0, 10.0)
    first.ban("2.2.2.2", 20.0, 10.0)
    assert second.banned("1.1.1.1", 69.9) and second.banned("2.2.2.2", 19.9)
    assert second.ban_count(15.0) == 2
    assert not second.banned("2.2.2.2", 20.0)  # ended: and its slot freed
    assert second.ban_count(30.0) == 1
    assert not first.banned("3.3.3.3", 30.0)


def test_a_full_set_evicts_the_bucket_touched_longest_ago(region: Region) -> None:
    store = SharedStore(region, 0, 1)
    keys = same_set(region, WAYS + 1)
    for t, key in enumerate(keys[:WAYS]):  # fills the set; each bucket left empty
        assert store.take(key, float(t), 0.001, 1.0) == 0.0
    assert store.take(keys[0], 20.0, 0.001, 1.0) > 0  # keys[0] touched last now; keys[1] oldest
    assert store.evictions() == 0
    assert store.take(keys[WAYS], 21.0, 0.001, 1.0) == 0.0  # a new key: evicts keys[1]
    assert store.evictions() == 1
    assert store.take(keys[0], 22.0, 0.001, 1.0) > 0  # kept: still empty
    assert store.take(keys[2], 22.0, 0.001, 1.0) > 0  # kept
    assert store.take(keys[1], 22.0, 0.001, 1.0) == 0.0  # forgotten: a full bucket again


def test_a_full_table_never_refuses_and_counts_what_it_forgot(region: Region) -> None:
    store = SharedStore(region, 0, 1)
    keys = [f"192.168.{i // 256}.{i % 256}" for i in range(1000)]
    for t, key in enumerate(keys):
        assert store.take(key, float(t), 1.0, 5.0) == 0.0
    per_set: dict[int, int] = {}
    for key in keys:
        index = zlib.crc32(key_bytes(key)) & region.clients.mask
        per_set[index] = per_set.get(index, 0) + 1
    assert store.evictions() == sum(max(0, n - WAYS) for n in per_set.values())
    # The most recent of each set are the ones kept: the last key's bucket has the 4 tokens it
    # was left with (forgotten, it would start again with 5).
    now = float(len(keys) - 1)
    waits = [store.take(keys[-1], now, 0.001, 5.0) for _ in range(5)]
    assert waits[:4] == [0.0] * 4 and waits[4] > 0


def test_upstream_marks_are_seen_by_every_store(region: Region) -> None:
    first, second = SharedStore(region, 0, 2), SharedStore(region, 1, 2)
    seen = second.marks()
    assert second.down_until("g/a:1") == float("-inf")
    first.mark_down("g/a:1", 600.0)
    assert second.marks() != seen
    assert second.down_until("g/a:1") == 600.0
    first.mark_up("g/a:1", 50.0)
    assert second.down_until("g/a:1") == 50.0
    first.mark_up("g/b:1", 50.0)  # never marked: nothing to lift
    assert second.down_until("g/b:1") == float("-inf")


def test_one_workers_surge_is_every_workers(region: Region) -> None:
    first, second = SharedStore(region, 0, 2), SharedStore(region, 1, 2)
    assert second.surge_began(None, 5.0) is None
    assert first.surge_began(5.0, 5.0) == 5.0
    assert second.surge_began(None, 5.001) is None  # read at most every SURGE_READ
    assert second.surge_began(None, 5.02) == 5.0
    assert second.surge_began(6.0, 6.0) == 5.0  # the earliest under way
    assert first.surge_began(None, 9.0) == 6.0  # first is calm, second's goes on
    assert second.surge_began(None, 9.1) is None
    assert first.surge_began(None, 9.2) is None


def test_a_lock_left_held_is_taken_over(region: Region) -> None:
    store = SharedStore(region, 0, 1)
    key = "10.9.9.9"
    index = zlib.crc32(key_bytes(key)) & region.clients.mask
    lock = region.clients.locks[index % len(region.clients.locks)]
    assert lock.acquire(True, 1.0)  # as a worker killed inside take() would leave it
    assert store.take(key, 0.0, 1.0, 1.0) == 0.0  # after LOCK_TIMEOUT, not forever
    assert region.clients.broken == 1
    assert lock.acquire(True, LOCK_TIMEOUT)  # released by the one that took it over
    lock.release()


CHILD = """
import json, os, sys
from webtorch.shared.memory import Region, SharedStore
spec = json.loads(os.environ["STATE"])
store = SharedStore(Region.attach(spec, int(spec["fd"])), int(sys.argv[1]), 3)
print("ready", flush=True)
sys.stdin.read(1)
admitted = 0
for i in range(int(sys.argv[2])):
    admitted += store.take("hot", 1.0, 1e-9, 500.0) == 0.0  # one bucket of 500, no refill
    store.take(f"cold-{sys.argv[1]}-{i % 300}", 1.0, 1.0, 2.0)  # churn around it
    if i % 50 == 0:
        store.ban(f"ban-{sys.argv[1]}-{i}", 1e9, 1.0)
print(admitted, flush=True)
"""


def test_concurrent_processes_take_each_token_once() -> None:
    """Three processes take from one bucket of 500 as fast as they can (2000 tries each, while
    churning other keys under the same locks): exactly 500 are admitted. Without the locks, two
    processes reading the same count would both take "the last" token."""
    region = Region.create(100_000)  # room for the churn: the hot key is never evicted
    try:
        _take_concurrently(region)
    finally:
        region.destroy()


def _take_concurrently(region: Region) -> None:
    assert region.fd is not None
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "STATE": json.dumps({**region.spec(), "fd": region.fd}),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(slot), "2000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=[region.fd],
        )
        for slot in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:  # all three start together
            assert child.stdin is not None
            child.stdin.write("g")
            child.stdin.close()
        admitted = [int(child.stdout.read()) for child in children if child.stdout is not None]
        assert [child.wait(60) for child in children] == [0, 0, 0]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert sum(admitted) == 500, admitted
    store = SharedStore(region, 0, 3)
    assert store.ban_count(2.0) == 3 * 40
    assert region.clients.broken == 0


def _groups(region: Region, active: bool = False) -> list[tuple[list[Upstream], GroupHealth]]:
    """The same group of two upstreams as two workers hold it."""
    made = []
    for slot in (0, 1):
        ups = [Upstream(f"127.0.0.1:{9000 + i}", "127.0.0.1", 9000 + i, 1, index=i) for i in (0, 1)]
        health = GroupHealth(
            ups,
            PassiveSettings(max_fails=1, fail_timeout=10.0),
            OutlierSettings(consecutive_5xx=2, base_ejection_time=30.0, max_ejection_percent=50),
            ActiveSettings(passes=1) if active else None,
            0.0,
            random.Random(slot),
            SharedStore(region, slot, 2),
            "pair",
        )
        made.append((ups, health))
    return made


def test_an_upstream_one_worker_takes_out_is_out_for_the_other_till_its_end(
    region: Region,
) -> None:
    (ups, first), (theirs, second) = _groups(region)
    assert len(second.eligible(0.0)) == 2
    assert first.record(ups[0], Outcome.CONNECT_FAILED, 1.0)  # passive: out for 10 s
    assert [u.index for u in second.eligible(1.0)] == [1]
    assert second.state_of(theirs[0], 1.0) == "unavailable"
    assert [u.index for u in second.eligible(11.0)] == [0, 1]  # back at its end, in both
    # Outlier ejection (two 5xx in a row: 30 s) travels the same way.
    first.record(ups[1], Outcome.SERVER_ERROR, 12.0)
    assert first.record(ups[1], Outcome.SERVER_ERROR, 12.5)
    assert [u.index for u in second.eligible(13.0)] == [0]
    assert [u.index for u in second.eligible(42.5)] == [0, 1]


def test_a_good_active_check_brings_an_upstream_back_for_every_worker(region: Region) -> None:
    (ups, first), (_, second) = _groups(region, active=True)
    assert first.record(ups[0], Outcome.CONNECT_FAILED, 1.0)
    assert [u.index for u in second.eligible(2.0)] == [1]
    assert first.record_check(ups[0], True, 3.0)  # it answers again: lifted in the store too
    assert [u.index for u in second.eligible(3.0)] == [0, 1]


def test_the_semaphores_go_with_their_master() -> None:
    """A region's named semaphores are unlinked by destroy(), and those of a master that died
    without it (kill -9) by the next master's create()."""
    shm = Path("/dev/shm")
    gone = subprocess.Popen(["true"])  # a pid that has exited
    gone.wait()
    left = f"/webtorch-{gone.pid}-test-0"
    _mp.SemLock(1, 1, 1, left, False)
    assert (shm / f"sem{left.replace('/', '.')}").exists()
    region = Region.create(0)
    mine = region.spec()["locks"].removeprefix("/")
    try:
        assert not (shm / f"sem{left.replace('/', '.')}").exists()
        assert len(list(shm.glob(f"sem.{mine}-*"))) == 17
    finally:
        region.destroy()
    assert list(shm.glob(f"sem.{mine}-*")) == []


def test_a_surge_one_workers_guard_sees_holds_new_clients_in_the_others(region: Region) -> None:
    """Two guards (two workers) on one region: a flood of new clients reaches the first only;
    a client new to the second during it gets the surge rate there too, while a client it knew
    before keeps its usual bucket."""
    settings = GuardConfig(rate=100.0, burst=100.0, surge_rate=1.0, surge_min_rate=100.0)
    first = Guard(settings, store=SharedStore(region, 0, 2))
    second = Guard(settings, store=SharedStore(region, 1, 2))
    path = "/"  # no detector: the rules read no more of the request
    now = 0.0
    assert second.rules(path, "10.0.0.1", 0.5) is not None  # known to the second from now
    while now < 5.0:  # calm: 8 requests/s to the first, its baseline
        first.rules(path, "10.0.0.2", now)
        now += 0.125
    for i in range(200):  # a flood of new clients, one request each
        first.rules(path, f"10.9.{i // 256}.{i % 256}", 5.0 + i * 1e-4)
    assert first.surge is not None and first.surge.active
    assert second.surge is not None and not second.surge.active  # it saw none of it
    newcomer = [second.rules(path, "10.8.8.8", 5.1 + i * 1e-3) for i in range(3)]
    assert [getattr(d, "reason", None) for d in newcomer] == ["ok", "surge", "surge"]
    assert getattr(second.rules(path, "10.0.0.1", 5.2), "reason", None) == "ok"
