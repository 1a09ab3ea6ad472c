""":class:`~webtorch.shared.store.StateStore` over shared memory: the workers of one master.

The master makes the region (:meth:`Region.create`): a memfd every worker maps (handed over as
the config is, by descriptor) and a few named POSIX semaphores; a worker opens both
(:meth:`Region.attach`). In the region, after a header, three fixed-size tables of 64-byte slots:
client buckets, bans, upstream marks. Nothing grows: the sizes are set at start from
``guard.max_clients``, and ``[guard]`` cannot change by reload (the master refuses it).

A table is set-associative: a key's CRC-32 picks a set of 8 consecutive slots and the key lives
in one of them, with a count of the set's used slots beside (so a set without bans answers "not
banned" from one word). A new key takes an empty slot of its set or evicts the one with the
lowest stamp: touched longest ago (a bucket) or ending soonest (a ban, an expired one first). A
full table never refuses: it forgets the stalest and counts it (``evictions``); a forgotten
client starts again with a full bucket, a forgotten ban is lifted early. A slot: the key (40
bytes, NUL-padded; a longer key is replaced by a 39-byte BLAKE2b digest after a 0xFF byte, which
no text key starts with) and three 8-byte words: its stamp (last touch, or a ban's end), a
value (a bucket's tokens) and the key's CRC-32, which :meth:`Table.find` searches the set's 8
of at once. Slots are read and written through memoryviews of 8-byte words, not ``struct``.

Python has no atomic operations on shared memory, so every read-modify-write holds a lock: one
of 16 semaphores for the client and ban tables (a set's index picks it), one for the marks. They
are ``_multiprocessing.SemLock``, the C semaphore under ``multiprocessing.Lock``: an uncontended
acquire and release is two atomic instructions in glibc's futex-based sem_trywait/sem_post,
0.09 us from Python, where an fcntl lock is two system calls (3 us). It is the one standard-library
type that is both that fast and can be opened by name from another, unrelated, process (its
``_rebuild``, which multiprocessing itself uses to pass locks to the processes it spawns), so no
dependency is added for it. A worker killed (SIGKILL) inside the few microseconds it holds a lock
would leave it held: a waiter gives up after ``LOCK_TIMEOUT``, counts it (``broken``), does its
update anyway and releases, which frees the semaphore for everyone after.

The surge is lock-free: each worker writes only its own slot (when its detector's surge began)
and reads the others' at most every ``SURGE_READ`` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import math
import mmap
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import Any, Final, Protocol

# The C module under multiprocessing's locks (no stubs: typed here by what is used).
_mp: Any = importlib.import_module("_multiprocessing")

log: Final = logging.getLogger("webtorch.shared")

MAGIC: Final = b"WTSTATE1"
KEY: Final = 40  # bytes of key in a slot
SLOT: Final = 64
WAYS: Final = 8  # slots in a set
SET: Final = SLOT * WAYS
STRIPES: Final = 16  # locks for the client and ban tables (a power of two)
_STRIPE_MASK: Final = STRIPES - 1
KEY_CACHE: Final = 16384  # keys a worker remembers the bytes and set of
MAX_WORKERS: Final = 256
HEADER: Final = 4096
_MARKS: Final = 8  # header offsets: the marks' change counter
_EVICTIONS: Final = 64  # one counter per table (under their locks: a rare write)
_SURGE: Final = 512  # a double per worker slot: when its surge began (0: calm)
LOCK_TIMEOUT: Final = 0.25  # seconds: a lock held longer was left by a killed process
SURGE_READ: Final = 0.01  # seconds between two reads of the other workers' surges
MARK_SLOTS: Final = 4096  # upstream marks: groups x servers
_PREFIX: Final = "webtorch"  # semaphores are named /webtorch-<master's pid>-<random>-<i>

_STAMP_WORD: Final = KEY // 8  # a slot's words: the key's 5, the stamp, a value, the tag
_TAG: Final = SLOT // 8 - 1
_STAMP: Final = struct.Struct("=d")
_COUNT: Final = struct.Struct("=q")
_EMPTY_SLOT: Final = bytes(SLOT)


class _Lock(Protocol):
    def acquire(self, block: bool = ..., timeout: float | None = ...) -> bool: ...
    def release(self) -> None: ...


def key_bytes(key: str) -> bytes:
    """``key`` as a slot holds it: 40 bytes."""
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) > KEY or not raw:
        return b"\xff" + hashlib.blake2b(raw, digest_size=KEY - 1).digest()
    return raw.ljust(KEY, b"\0")


def _sets(slots: int) -> int:
    """Sets for at least ``slots`` slots: a power of two, at least one per lock stripe."""
    return max(STRIPES, 1 << max(0, math.ceil(math.log2(max(slots, 1) / WAYS))))


class Table:
    """One set-associative table in ``buf`` at ``offset``: a count of used slots per set (8
    bytes each), then the sets. ``locks[i % len(locks)]`` guards set ``i``: callers hold it
    around :meth:`find`, :meth:`claim` and :meth:`free`."""

    def __init__(
        self, buf: mmap.mmap, offset: int, sets: int, locks: list[_Lock], counter: int
    ) -> None:
        self.buf = buf
        self.offset = offset
        self.sets = sets
        self.mask = sets - 1
        self.slots = offset + 8 * sets  # where the sets begin
        self.locks = locks
        self.lock_mask = len(locks) - 1
        self.counter = counter  # header offset of its evictions counter
        self.broken = 0  # locks found held past LOCK_TIMEOUT
        self.words = memoryview(buf).cast("q")  # the counts and tags, as 8-byte words
        self.doubles = memoryview(buf).cast("d")  # the stamps

    @property
    def size(self) -> int:
        return self.sets * (8 + SET)

    def lock(self, index: int) -> _Lock:
        lock = self.locks[index & self.lock_mask]
        if not lock.acquire(True, LOCK_TIMEOUT):
            self.taken_over()
        return lock

    def taken_over(self) -> None:
        self.broken += 1
        log.warning(
            "a shared-state lock was held for %.2f s (a worker killed while holding it?): "
            "taken over",
            LOCK_TIMEOUT,
        )

    def used(self, index: int) -> int:
        """Slots in use in set ``index`` (one aligned word: read without the lock)."""
        return int(self.words[(self.offset >> 3) + index])

    def find(self, key: bytes, index: int, tag: int) -> int:
        """The offset of ``key``'s slot in set ``index``, or -1. ``tag``: its CRC-32, which
        each slot keeps in its last word: the set's 8 tags are searched in C, and a key is
        compared only where its tag is (keys of one set often share their first bytes)."""
        base = self.slots + index * SET
        first = (base >> 3) + _TAG
        tags = self.words[first : first + SET // 8 : SLOT // 8].tolist()
        start = 0
        while True:
            try:
                way = tags.index(tag, start)
            except ValueError:
                return -1
            at = base + way * SLOT
            if self.buf[at : at + KEY] == key:
                return at
            start = way + 1  # another key with the same CRC-32: rare, and looked past

    def claim(self, key: bytes, index: int, tag: int) -> int:
        """A slot for ``key`` (not in the set): an empty one, else the one with the lowest
        stamp, evicted. Its values are left for the caller to write."""
        buf = self.buf
        doubles = self.doubles
        base = self.slots + index * SET
        victim = base
        lowest = math.inf
        for at in range(base, base + SET, SLOT):
            if buf[at] == 0:
                victim = at
                self.words[(self.offset >> 3) + index] += 1
                break
            stamp = doubles[(at >> 3) + _STAMP_WORD]
            if stamp < lowest:
                victim, lowest = at, stamp
        else:
            (count,) = _COUNT.unpack_from(buf, self.counter)
            _COUNT.pack_into(buf, self.counter, count + 1)
        buf[victim : victim + KEY] = key
        self.words[(victim >> 3) + _TAG] = tag
        return victim

    def free(self, at: int, index: int) -> None:
        """Empty the slot at ``at`` of set ``index``."""
        self.buf[at : at + SLOT] = _EMPTY_SLOT
        self.words[(self.offset >> 3) + index] -= 1

    def evictions(self) -> int:
        return int(_COUNT.unpack_from(self.buf, self.counter)[0])

    def later(self, now: float) -> int:
        """Used slots whose stamp is after ``now`` (unlocked: for gauges). Only the sets whose
        count says they hold something are read: about 1 ms for 16,384 sets with few in use."""
        counts = self.words[self.offset >> 3 : (self.offset >> 3) + self.sets].tolist()
        doubles = self.doubles
        found = 0
        for index, used in enumerate(counts):
            if used:
                first = ((self.slots + index * SET) >> 3) + _STAMP_WORD
                stamps = doubles[first : first + SET // 8 : SLOT // 8].tolist()
                found += sum(1 for stamp in stamps if stamp > now)  # 0.0: an empty slot
        return found


def _release(lock: _Lock) -> None:
    # try/except, not contextlib.suppress: this is on every request, and a context manager
    # costs more than the lock.
    try:  # noqa: SIM105
        lock.release()
    except ValueError:  # it was taken over (LOCK_TIMEOUT) and released by the one who took it
        pass


class Region:
    """The mapped region and its locks. The master creates it (:meth:`create`), hands
    :meth:`spec` to each worker, which attaches (:meth:`attach`); :meth:`destroy` at the end."""

    def __init__(
        self, buf: mmap.mmap, spec: dict[str, Any], locks: list[_Lock], fd: int | None
    ) -> None:
        self.buf = buf
        self._spec = spec
        self.fd = fd  # the master's: passed to each worker it starts
        clients = int(spec["client_sets"])
        bans = int(spec["ban_sets"])
        stripes, marks_lock = locks[:STRIPES], locks[STRIPES]
        offset = HEADER
        self.clients = Table(buf, offset, clients, stripes, _EVICTIONS)
        offset += self.clients.size
        self.bans = Table(buf, offset, bans, stripes, _EVICTIONS + 8)
        offset += self.bans.size
        self.marks = Table(buf, offset, _sets(MARK_SLOTS), [marks_lock], _EVICTIONS + 16)

    @staticmethod
    def size_for(client_sets: int, ban_sets: int) -> int:
        return HEADER + (client_sets + ban_sets + _sets(MARK_SLOTS)) * (8 + SET)

    @classmethod
    def create(cls, max_clients: int) -> Region:
        """A new region for ``max_clients`` clients (buckets) and as many bans."""
        _sweep()
        client_sets = _sets(max_clients)
        spec: dict[str, Any] = {
            "client_sets": client_sets,
            "ban_sets": client_sets,
            "locks": f"/{_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}",
        }
        size = cls.size_for(client_sets, client_sets)
        fd = os.memfd_create("webtorch-state")
        locks: list[_Lock] = []
        try:
            os.ftruncate(fd, size)  # zeros, and pages only where written
            buf = mmap.mmap(fd, size)
            buf[: len(MAGIC)] = MAGIC
            for i in range(STRIPES + 1):
                # kind 1: a semaphore; value 1, at most 1; not unlinked: workers open it by name
                locks.append(_mp.SemLock(1, 1, 1, f"{spec['locks']}-{i}", False))
        except BaseException:
            os.close(fd)
            for i in range(len(locks)):
                _unlink(f"{spec['locks']}-{i}")
            raise
        spec["size"] = size
        return cls(buf, spec, locks, fd)

    @classmethod
    def attach(cls, spec: dict[str, Any], fd: int) -> Region:
        """The region of ``spec`` (from the master's :meth:`spec`) through ``fd``, which is
        closed: the mapping is what stays."""
        try:
            buf = mmap.mmap(fd, int(spec["size"]))
        finally:
            os.close(fd)
        if buf[: len(MAGIC)] != MAGIC:
            raise ValueError("not a WebTorch shared-state region")
        rebuild = _mp.SemLock._rebuild
        locks = [rebuild(0, 1, 1, f"{spec['locks']}-{i}") for i in range(STRIPES + 1)]
        return cls(buf, spec, locks, None)

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def destroy(self) -> None:
        """The master's, at exit: the semaphores' names go (the memory goes with its last
        mapping)."""
        for i in range(STRIPES + 1):
            _unlink(f"{self._spec['locks']}-{i}")
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _sweep(shm: Path = Path("/dev/shm")) -> None:
    """Unlink the semaphores of masters that died without doing it (kill -9): glibc keeps a
    named semaphore as ``/dev/shm/sem.NAME``, and NAME holds the master's pid."""
    for path in shm.glob(f"sem.{_PREFIX}-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _unlink("/" + path.name.removeprefix("sem."))
        except PermissionError:
            pass  # alive, someone else's


def _unlink(name: str) -> None:
    with contextlib.suppress(OSError):
        _mp.sem_unlink(name)


class SharedStore:
    """:class:`~webtorch.shared.store.StateStore` over a :class:`Region`; ``slot`` is this
    worker's (its surge slot), ``workers`` how many share it.

    Per request the guard asks :meth:`banned` and :meth:`take`. Both find a key's set from a
    cache of this worker's (the key's bytes and set, and where its bucket was last found), so a
    client seen before costs a dict lookup instead of encoding and hashing its key; the slot is
    checked to still hold the key under the lock. A set without bans answers :meth:`banned`
    from its count, without the lock."""

    def __init__(self, region: Region, slot: int, workers: int) -> None:
        if not 0 <= slot < MAX_WORKERS:
            raise ValueError(f"worker slot {slot} outside 0..{MAX_WORKERS - 1}")
        self.region = region
        self.slot = slot
        self._workers = workers
        buf = self.buf = region.buf
        self._doubles = memoryview(buf).cast("d")
        self._words = memoryview(buf).cast("q")
        self._clients = region.clients
        self._stripes = region.clients.locks
        self._bans = region.bans
        self._marks = region.marks
        self._ban_counts = region.bans.offset >> 3  # the bans' per-set counts, as words
        self._keys: dict[str, list[Any]] = {}  # key -> [its bytes, its set, its bucket or -1]
        self._surge_at = _SURGE + 8 * slot
        self._published = 0.0  # what this worker last wrote to its surge slot
        self._surge_read = -math.inf  # when the others' slots were last read
        self._others = 0.0  # the earliest surge under way elsewhere (0: none)
        # The bans of a scrape (ban_count): counted at most once a second.
        self._ban_count = (-math.inf, 0)

    @property
    def workers(self) -> int:
        return self._workers

    def _entry(self, key: str) -> list[Any]:
        keys = self._keys
        if len(keys) >= KEY_CACHE:
            keys.clear()  # bounded; the clients still coming back are cached again at once
        k = key_bytes(key)
        tag = zlib.crc32(k)
        entry = keys[key] = [k, tag & self._clients.mask, -1, tag]
        return entry

    # -- buckets: the stamp is when the bucket was last refilled; a: its tokens

    def take(self, key: str, now: float, rate: float, burst: float) -> float:
        # On every request: written out (no min/max calls, the release inline) for speed.
        entry = self._keys.get(key)
        if entry is None:
            entry = self._entry(key)
        k, index, at, tag = entry
        lock = self._stripes[index & _STRIPE_MASK]
        if not lock.acquire(True, LOCK_TIMEOUT):
            self._clients.taken_over()
        try:
            if at < 0 or self.buf[at : at + KEY] != k:
                at = entry[2] = self._locate(k, index, tag, now, burst)
            values = self._doubles
            i = (at + KEY) >> 3
            tokens: float = values[i + 1] + (now - values[i]) * rate
            if tokens > burst:
                tokens = burst
            values[i] = now
            if tokens >= 1.0 - 1e-9:  # as LocalStore.take
                tokens -= 1.0
                values[i + 1] = tokens if tokens > 0.0 else 0.0
                return 0.0
            values[i + 1] = tokens
            return (1.0 - tokens) / rate
        finally:
            try:  # noqa: SIM105 (a context manager costs more than the lock)
                lock.release()
            except ValueError:  # taken over (LOCK_TIMEOUT) and released by the one who took it
                pass

    def _locate(self, k: bytes, index: int, tag: int, now: float, burst: float) -> int:
        """``k``'s bucket, a new full one if it has none (the set's lock held)."""
        table = self._clients
        at = table.find(k, index, tag)
        if at < 0:
            at = table.claim(k, index, tag)
            values = self._doubles
            i = (at + KEY) >> 3
            values[i + 1] = burst  # a new bucket is full
            values[i] = now
        return at

    # -- bans: the stamp is the ban's end

    def ban(self, key: str, until: float, now: float) -> None:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._entry(key)
        k, index, _, tag = entry
        table = self._bans
        lock = table.lock(index)
        try:
            at = table.find(k, index, tag)
            if at < 0:
                at = table.claim(k, index, tag)
            self._doubles[(at + KEY) >> 3] = until
        finally:
            _release(lock)

    def banned(self, key: str, now: float) -> bool:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._entry(key)
        index = entry[1]
        table = self._bans
        if not table.words[self._ban_counts + index]:
            return False  # no ban in its set: the common case, without the lock
        lock = table.lock(index)
        try:
            at = table.find(entry[0], index, entry[3])
            if at < 0:
                return False
            if now < self._doubles[(at + KEY) >> 3]:
                return True
            table.free(at, index)  # expired: the set may go back to answering without a lock
            return False
        finally:
            _release(lock)

    def ban_count(self, now: float) -> int:
        counted_at, count = self._ban_count
        if now - counted_at >= 1.0:
            count = self._bans.later(now)
            self._ban_count = (now, count)
        return count

    def expire(self, now: float) -> None:
        return None  # an expired ban is freed when next asked about, or evicted first

    def evictions(self) -> int:
        """Clients forgotten because their set was full (buckets and bans), by every worker."""
        return self._clients.evictions() + self._bans.evictions()

    def taken_over(self) -> int:
        """Locks this worker found held past LOCK_TIMEOUT and took over."""
        return self._clients.broken + self._bans.broken + self._marks.broken

    # -- the surge: lock-free, one writer per slot

    def surge_began(self, began: float | None, now: float) -> float | None:
        mine = 0.0 if began is None else began
        buf = self.buf
        if mine != self._published:
            _STAMP.pack_into(buf, self._surge_at, mine)
            self._published = mine
        if now >= self._surge_read:
            self._surge_read = now + SURGE_READ
            earliest = 0.0
            for at in range(_SURGE, _SURGE + 8 * self._workers, 8):
                if at != self._surge_at:
                    (other,) = _STAMP.unpack_from(buf, at)
                    if other and (not earliest or other < earliest):
                        earliest = other
            self._others = earliest
        others = self._others
        if not others:
            return began
        return others if began is None or others < began else began

    # -- upstream marks: the stamp is the end of the mark

    def mark_down(self, key: str, until: float) -> None:
        self._mark(key, until, lower=False)

    def mark_up(self, key: str, now: float) -> None:
        self._mark(key, now, lower=True)

    def _mark(self, key: str, until: float, lower: bool) -> None:
        k = key_bytes(key)
        table = self._marks
        tag = zlib.crc32(k)
        index = tag & table.mask
        lock = table.lock(index)
        try:
            at = table.find(k, index, tag)
            if at < 0:
                if lower:
                    return  # never marked: nothing to lift
                at = table.claim(k, index, tag)
            elif lower:
                until = min(until, _STAMP.unpack_from(self.buf, at + KEY)[0])
            _STAMP.pack_into(self.buf, at + KEY, until)
            (count,) = _COUNT.unpack_from(self.buf, _MARKS)
            _COUNT.pack_into(self.buf, _MARKS, count + 1)
        finally:
            _release(lock)

    def down_until(self, key: str) -> float:
        k = key_bytes(key)
        table = self._marks
        tag = zlib.crc32(k)
        index = tag & table.mask
        lock = table.lock(index)
        try:
            at = table.find(k, index, tag)
            return -math.inf if at < 0 else float(_STAMP.unpack_from(self.buf, at + KEY)[0])
        finally:
            _release(lock)

    def marks(self) -> int:
        # An aligned 8-byte word, written under the marks' lock: a reader sees the old count or
        # the new one, and re-reads the marks when it moved.
        return int(self._words[_MARKS >> 3])
