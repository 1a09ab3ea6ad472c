"""Where a function stage runs: on the event loop, on a thread pool, or on a process pool.

The runner hands a placement one batch at a time, at most :attr:`Placement.concurrency` at once,
and hears back through ``done``. That is the whole interface, so another placement (the remote
one: ``remote.py``) plugs in without the runner knowing::

    class Placement(Protocol):
        kind: str             # "loop" | "thread" | "process" | "remote": metadata, metrics
        concurrency: int      # batches the runner may have in flight on it at once
        def run(self, batch, done) -> None   # done(result, None) or done(None, exc), exactly
                                             # once, on the loop thread (possibly before run
                                             # returns: the loop placement does)
        async def start(self) -> None        # before serving: spawn workers, connect
        async def close(self) -> None        # after the last batch
        def describe(self) -> dict           # where it runs, for GET /v2/pipelines/{p}

``batch`` is the stage's input in the form it takes (a list of records, a dict of columns, or a
``Joined`` dict for a join); the result is what the stage returns, one row per row. Errors: an
exception means the batch failed (the runner then reruns it request by request, then row by
row, to find the bad record); a row the stage refuses is a ``Reject`` in a returned list.

A placement is made by a :data:`PlacementFactory` from a :class:`StageSite` (what it needs to
know about the stage); :func:`local` is the factory for loop, thread and process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from webtorch.errors import ConfigError
from webtorch.metrics import StageStats
from webtorch.pipeline import child
from webtorch.pipeline.spec import Stage

if TYPE_CHECKING:
    from webtorch.config import StageConfig

log = logging.getLogger("webtorch.pipeline")

Done = Callable[[Any, BaseException | None], None]


class Placement(Protocol):
    kind: str
    concurrency: int

    def run(self, batch: Any, done: Done) -> None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass
class StageSite:
    """What a placement knows of its stage: the pipeline's name and file, the stage, its
    settings, its instruments and the loop."""

    pipeline: str
    path: Path
    stage: Stage
    settings: StageConfig
    stats: StageStats
    loop: asyncio.AbstractEventLoop


PlacementFactory = Callable[[StageSite], Placement]


class LoopPlacement:
    """On the event loop thread: no hop, no copy; for stages that take microseconds (a slow one
    holds every request up while it runs: give it a thread or a process)."""

    kind = "loop"
    concurrency = 1

    def __init__(self, site: StageSite) -> None:
        assert site.stage.fn is not None
        self._fn = site.stage.fn

    def run(self, batch: Any, done: Done) -> None:
        try:
            result = self._fn(batch)
        except Exception as exc:
            done(None, exc)
        else:
            done(result, None)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"placement": self.kind}


class ThreadPlacement:
    """On a pool of ``workers`` threads: for code that releases the GIL (torch, numpy, I/O)."""

    kind = "thread"

    def __init__(self, site: StageSite) -> None:
        assert site.stage.fn is not None
        self._fn = site.stage.fn
        self._loop = site.loop
        self.concurrency = site.settings.workers
        self._pool = ThreadPoolExecutor(self.concurrency, f"webtorch-{site.stage.name}")

    def run(self, batch: Any, done: Done) -> None:
        future = self._loop.run_in_executor(self._pool, self._fn, batch)
        future.add_done_callback(lambda f: done(*_outcome(f)))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, True)

    def describe(self) -> dict[str, Any]:
        return {"placement": self.kind, "workers": self.concurrency}


class ProcessPlacement:
    """On a pool of ``workers`` processes: for GIL-bound Python (text cleaning). Workers are
    spawned (not forked: the server has threads and an event loop), import the pipeline file by
    path and run the stage by name; batches and results cross pickled, and those bytes are the
    stage's bytes in and out."""

    kind = "process"
    close_grace = 10.0  # seconds a batch still running at shutdown may take

    def __init__(self, site: StageSite) -> None:
        self._site = site
        self._name = site.stage.name
        self._loop = site.loop
        self._stats = site.stats
        self.concurrency = site.settings.workers
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.concurrency,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=child.init,
            initargs=(str(self._site.path.resolve()),),
        )

    def run(self, batch: Any, done: Done) -> None:
        pool = self._pool
        try:
            payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
            submitted: Future[bytes] = pool.submit(child.run, self._name, payload)
        except Exception as exc:  # a batch that does not pickle, or a pool already broken
            self._broken(pool, exc)
            done(None, exc)
            return
        self._stats.bytes_in += len(payload)
        wrapped = asyncio.wrap_future(submitted, loop=self._loop)
        wrapped.add_done_callback(lambda f: self._finished(pool, f, done))

    def _finished(
        self, pool: ProcessPoolExecutor, future: asyncio.Future[bytes], done: Done
    ) -> None:
        result, exc = _outcome(future)
        if exc is not None:
            self._broken(pool, exc)
            done(None, exc)
            return
        self._stats.bytes_out += len(result)
        try:
            rows = pickle.loads(result)  # our own worker's pickle of the stage's result
        except Exception as exc:
            done(None, exc)
            return
        done(rows, None)

    def _broken(self, pool: ProcessPoolExecutor, exc: BaseException) -> None:
        if isinstance(exc, BrokenProcessPool) and pool is self._pool:
            # A worker died (killed, out of memory): later batches get a fresh pool (once: the
            # other batches that were on the broken one fail with it too).
            log.error("stage %s: a worker process died; starting a new pool", self._name)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    async def start(self) -> None:
        """Spawn every worker and import the file in each before the first request, so that a
        file that fails in a worker fails the start, and no request waits for a spawn."""
        pings = [
            asyncio.wrap_future(self._pool.submit(child.ping), loop=self._loop)
            for _ in range(self.concurrency)
        ]
        try:
            await asyncio.gather(*pings)
        except Exception as exc:
            site = self._site
            raise ConfigError(
                f"pipelines.{site.pipeline}.stages.{self._name}: its worker processes could "
                f"not start or import {site.path}: {exc!r}"
            ) from None

    async def close(self) -> None:
        """Let running batches finish for ``close_grace`` seconds (the server drained its
        requests already), then end the workers: a stage stuck in a worker must not keep the
        server from exiting."""
        pool = self._pool
        processes = list(pool._processes.values())  # typeshed knows it; no public accessor
        closing = asyncio.ensure_future(asyncio.to_thread(pool.shutdown, True, cancel_futures=True))
        try:
            await asyncio.wait_for(asyncio.shield(closing), self.close_grace)
        except TimeoutError:
            log.warning("stage %s: worker processes still busy; terminating them", self._name)
            for process in processes:
                process.terminate()
            await closing

    def describe(self) -> dict[str, Any]:
        return {"placement": self.kind, "workers": self.concurrency}


def _outcome(future: asyncio.Future[Any]) -> tuple[Any, BaseException | None]:
    if future.cancelled():
        return None, asyncio.CancelledError()
    exc = future.exception()
    return (None, exc) if exc is not None else (future.result(), None)


LOCAL: dict[str, Callable[[StageSite], Placement]] = {
    "loop": LoopPlacement,
    "thread": ThreadPlacement,
    "process": ProcessPlacement,
}


def local(site: StageSite) -> Placement:
    """The placement the stage's settings name (loop, thread or process)."""
    return LOCAL[site.settings.placement](site)
