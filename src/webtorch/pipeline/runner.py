"""Runs a pipeline: one queue per stage, batches cut per stage, each batch handed to the
stage's placement, its rows cut back into each request's and passed on along the graph.

A request is a :class:`Call` (the Pending its handler returns): its rows enter the stages that
take the request, and each stage, when its batch is done, gives every request its own rows and
asks the request's :class:`~webtorch.pipeline.graph.Progress` which stages are now ready. Each
stage batches on its own (``serve/batcher.py``'s sans-IO queue: its own ``max_batch``,
``max_delay`` and ``max_queue``) and keeps up to its placement's ``concurrency`` batches in
flight, so a slow stage on a thread or process pool holds up only its own queue.

Errors stay with their records: a row returned as ``Reject`` answers its request 422 naming the
stage and the record's index; a batch that raises is run again request by request, and a
request that still fails row by row, so one bad record fails only its own request (500 naming
the stage and the record) and the rest of the batch goes on; a placement that says it cannot
run now (502, 503, 504) answers its batch's requests so at once. A model stage is a stage like
any other whose placement is the model's executor (``models.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from webtorch.errors import HTTPError, ServiceUnavailable
from webtorch.http.messages import Pending, Request, Response, error_response, json_response
from webtorch.metrics import StageStats
from webtorch.pipeline.batch import (
    Joined,
    StageError,
    concat,
    rejections,
    rows_of,
    split,
    take,
    to_form,
)
from webtorch.pipeline.child import StageFailed
from webtorch.pipeline.graph import REQUEST, Plan, Progress
from webtorch.pipeline.placement import Placement
from webtorch.pipeline.spec import Stage, Takes
from webtorch.pipeline.timing import server_timing
from webtorch.serve.batcher import BatchScheduler, Queued, QueueFull
from webtorch.vocab import MAX_QUEUED_ROWS

log = logging.getLogger("webtorch.pipeline")

# Makes a request's answer from its result rows: at once, or later (a train step's Pending).
Finish = Callable[["Call", Any], "Response | Pending"]


class Call:
    """One request on its way through a plan: its rows at each stage, its time in each, and
    the Pending its handler returned (held, not inherited: ``Pending`` is a compiled class,
    which an interpreted one cannot subclass)."""

    __slots__ = (
        "deadline",
        "entered",
        "finish",
        "keep_rejects",
        "pending",
        "plan",
        "progress",
        "request",
        "rows",
        "times",
        "values",
    )

    def __init__(
        self,
        plan: Plan,
        rows: int,
        finish: Finish,
        request: Request | None,
        keep_rejects: bool = False,
    ) -> None:
        self.pending = Pending()
        self.plan = plan
        # A stage's own endpoint answers Reject rows as rows (its caller, a remote placement,
        # hands them on): only the whole pipeline answers them 422.
        self.keep_rejects = keep_rejects
        self.rows = rows
        self.finish = finish
        self.request = request
        self.progress: Progress = plan.start()
        self.values: dict[str, Any] = {}
        self.deadline: asyncio.TimerHandle | None = None  # the pipeline's timeout
        self.entered: dict[str, float] = {}  # stage -> when the rows were queued there
        self.times: dict[str, float] = {}  # stage -> seconds: queue wait and its batch's run

    @property
    def response(self) -> Response | None:
        """The answer, once there is one."""
        return self.pending.response

    def input_for(self, name: str) -> Any:
        """The batch stage ``name`` takes for this request (its inputs' rows, joined)."""
        names = self.plan.inputs[name]
        if self.plan.joins[name]:
            return Joined({source: self.values[source] for source in names})
        return self.values[names[0]]

    def result(self) -> Any:
        plan = self.plan
        if plan.result_join:
            return Joined({source: self.values[source] for source in plan.result})
        return self.values[plan.result[0]]

    def timed(self) -> list[tuple[str, float]]:
        """(stage, seconds) in the plan's order: what Server-Timing lists."""
        times = self.times
        return [(name, times[name]) for name in self.plan.stages if name in times]


class StageRunner:
    """A function stage: its queue, its batches, its placement."""

    def __init__(
        self,
        stage: Stage,
        placement: Placement,
        stats: StageStats,
        loop: asyncio.AbstractEventLoop,
        *,
        max_batch: int,
        max_delay: float = 0.0,
        max_queue: int = MAX_QUEUED_ROWS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stage = stage
        self.name = stage.name
        self.takes = stage.takes
        self.placement = placement
        self.stats = stats
        self.loop = loop
        self.clock = clock
        self.queue: BatchScheduler[tuple[Call, Any]] = BatchScheduler(
            max_batch, max_delay, max_queue
        )
        self.in_flight = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        # Set by the PipelineRunner: where a request goes once this stage gave it its rows, and
        # how a request that cannot go on is answered.
        self.passed: Callable[[Call, str, Any], None] = _unset
        self.refused: Callable[[Call, Response], None] = _unset

    @property
    def max_batch(self) -> int:
        return self.queue.max_batch

    def add(self, call: Call, value: Any) -> None:
        """Queue a request's rows (QueueFull: the caller answers 503)."""
        now = self.clock()
        self.queue.add((call, value), call.rows, now)
        call.entered[self.name] = now
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self.queue
        while self.in_flight < self.placement.concurrency:
            now = self.clock()
            batch = queue.poll(now)
            if batch is None:
                break
            queue.finish()  # concurrency is counted here: the queue may cut the next batch
            self._start(batch, now)
        wake = queue.wake_at()
        if wake is not None and self.in_flight < self.placement.concurrency:
            self._timer = self.loop.call_later(max(0.0, wake - self.clock()), self._dispatch)

    def _start(self, batch: list[Queued[tuple[Call, Any]]], now: float) -> None:
        calls: list[Call] = []
        values: list[Any] = []
        record_wait = self.stats.wait.record
        for entry in batch:
            call, value = entry.item
            if call.response is not None:
                continue  # answered already (another branch rejected it)
            record_wait(now - entry.arrived)
            calls.append(call)
            values.append(value)
        if calls:
            self._run(calls, values)

    def _run(self, calls: list[Call], values: list[Any], then: Then = None) -> None:
        """Run one batch of whole requests' rows; ``then()`` once it is settled (reruns
        included)."""
        try:
            merged = concat(values, self.takes, self.name)
        except Exception as exc:  # rows that do not convert to the form the stage takes
            self._settle(calls, values, None, exc, self.clock(), then)
            return
        self.in_flight += 1
        started = self.clock()
        self.placement.run(
            merged, lambda result, exc: self._ran(calls, values, result, exc, started, then)
        )

    def _ran(
        self,
        calls: list[Call],
        values: list[Any],
        result: Any,
        exc: BaseException | None,
        started: float,
        then: Then,
    ) -> None:
        self.in_flight -= 1
        stats = self.stats
        end = self.clock()
        stats.run.record(end - started)
        stats.batch_rows.record(sum(call.rows for call in calls))
        stats.batches += 1
        self._settle(calls, values, result, exc, end, then)
        self._kick()

    def _settle(
        self,
        calls: list[Call],
        values: list[Any],
        result: Any,
        exc: BaseException | None,
        end: float,
        then: Then = None,
    ) -> None:
        """A batch's outcome: each request's rows on, or the failure narrowed down. Reruns
        go one at a time: a record that kills its worker process breaks every batch on the
        pool, so only a rerun alone says whose it is."""
        if exc is not None and not (isinstance(exc, HTTPError) and exc.status in _UNAVAILABLE):
            if len(calls) > 1:
                # One request's records broke the batch: each request on its own.
                steps = [
                    functools.partial(self._run, [call], [value])
                    for call, value in zip(calls, values, strict=True)
                ]
                self._serially(steps, then)
            else:
                _Rows(self, calls[0], values[0], exc, then).start()
            return
        self._conclude(calls, result, exc, end)
        if then is not None:
            then()

    def _serially(self, steps: Sequence[Callable[[Then], None]], then: Then) -> None:
        """Run ``steps`` one after another, each told how to start the next (on a later loop
        turn: a step on the loop finishes inside its call, and a chain of them must not
        nest); then ``then()``."""
        if not steps:
            if then is not None:
                then()
            return
        first, rest = steps[0], steps[1:]

        def after() -> None:
            self.loop.call_soon(self._serially, rest, then)

        first(after)

    def _conclude(
        self, calls: list[Call], result: Any, exc: BaseException | None, end: float
    ) -> None:
        """Each request's rows on, or (the placement unavailable) its answer now."""
        if exc is None:
            rows = sum(call.rows for call in calls)
            try:
                got = rows_of(result, self.name)
                if got != rows:
                    raise StageError(f"stage {self.name!r} returned {got} rows for {rows}")
            except StageError as error:
                # The stage's contract, not a record, is broken: no record to single out.
                for call in calls:
                    self._failed(call, None, error, end)
                return
        if exc is None:
            pieces = split(result, [call.rows for call in calls])
            for call, piece in zip(calls, pieces, strict=True):
                self._passed(call, piece, end)
        elif isinstance(exc, HTTPError):
            # Not the records: where the stage runs is unavailable (a model's full queue, a
            # remote stage's group down or timed out: 502/503/504). Each request gets that
            # answer now; narrowing down would send it row by row into the same failure.
            for call in calls:
                self._unavailable(call, exc, end)

    def _passed(self, call: Call, rows: Any, end: float) -> None:
        """A request's rows came out of this stage: rejected ones answer 422, else on."""
        if call.response is not None:
            return
        spent = end - call.entered.get(self.name, end)
        call.times[self.name] = spent
        self.stats.latency.record(spent)
        self.stats.rows += call.rows
        refused = [] if call.keep_rejects else rejections(rows)
        if refused:
            self.stats.errors += len(refused)
            index, first = refused[0]
            self.refused(
                call,
                json_response(
                    {
                        "error": f"stage {self.name!r} rejected record {index}: {first.reason}",
                        "stage": self.name,
                        "record": index,
                        "rejected": [{"record": i, "reason": r.reason} for i, r in refused],
                    },
                    422,
                ),
            )
            return
        self.passed(call, self.name, rows)

    def _failed(self, call: Call, index: int | None, exc: BaseException, end: float) -> None:
        if call.response is not None:
            return
        call.times[self.name] = end - call.entered.get(self.name, end)
        self.stats.errors += 1
        where = f" on record {index}" if index is not None else ""
        log.warning("pipeline stage %s failed%s: %s", self.name, where, _reason(exc))
        message = f"stage {self.name!r} failed{where}: {_reason(exc)}"
        body: dict[str, Any] = {"error": message, "stage": self.name}
        if index is not None:
            body["record"] = index
        # An HTTPError says what kind of failure it is (a model refusing an input: 422; its
        # queue full: 503; a remote stage down: 502/504); a stage's own exception is a 500.
        status = exc.status if isinstance(exc, HTTPError) else 500
        self.refused(
            call,
            json_response(body, status, list(exc.headers) if isinstance(exc, HTTPError) else None),
        )

    def _unavailable(self, call: Call, exc: HTTPError, end: float) -> None:
        if call.response is not None:
            return
        call.times[self.name] = end - call.entered.get(self.name, end)
        self.stats.errors += call.rows
        body = {"error": exc.message, "stage": self.name}
        self.refused(call, json_response(body, exc.status, list(exc.headers)))

    def _kick(self) -> None:
        if not self._scheduled and len(self.queue):
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    async def start(self) -> None:
        await self.placement.start()

    async def close(self) -> None:
        await self.placement.close()


class _Rows:
    """One request whose batch failed, run again row by row (one row at a time) to find the
    records that fail."""

    def __init__(
        self, stage: StageRunner, call: Call, value: Any, exc: BaseException, then: Then
    ) -> None:
        self.stage = stage
        self.call = call
        self.value = value
        self.exc = exc
        self.then = then
        self.results: list[Any] = []
        self.failures: list[tuple[int, BaseException]] = []

    def start(self) -> None:
        stage = self.stage
        if self.call.rows == 1:
            # Nothing to narrow down: this record fails the stage.
            stage._failed(self.call, 0, self.exc, stage.clock())
            self._finally()
            return
        self._next()

    def _next(self) -> None:
        stage = self.stage
        index = len(self.results)
        if index == self.call.rows or self.call.response is not None:
            self._end()
            return
        try:
            row = to_form(take(self.value, [index]), stage.takes, stage.name)
        except Exception as exc:
            self._done(index, None, exc)
            return
        stage.in_flight += 1
        stage.placement.run(row, functools.partial(self._ran, index))

    def _ran(self, index: int, result: Any, exc: BaseException | None) -> None:
        self.stage.in_flight -= 1
        self._done(index, result, exc)

    def _done(self, index: int, result: Any, exc: BaseException | None) -> None:
        if exc is None:
            try:
                if rows_of(result, self.stage.name) != 1:
                    exc = StageError(f"stage {self.stage.name!r} returned other than 1 row for 1")
            except StageError as error:
                exc = error
        if exc is not None:
            self.failures.append((index, exc))
        self.results.append(result)
        if self.failures:
            self._end()  # the first failing record is the one named: no need to go on
        else:
            self.stage.loop.call_soon(self._next)  # a later turn: rows on the loop must not nest

    def _end(self) -> None:
        stage = self.stage
        end = stage.clock()
        if self.failures:
            index, first = self.failures[0]
            stage._failed(self.call, index, first, end)
        elif self.call.response is None:
            # Each row passed alone (the batch failed for another reason: its size, a flaky
            # dependency): the request goes on with its rows.
            form: Takes = "records" if isinstance(self.results[0], list) else "tensors"
            try:
                rows = concat(self.results, form, stage.name)
            except Exception as exc:
                stage._failed(self.call, None, exc, end)
            else:
                stage._passed(self.call, rows, end)
        self._finally()

    def _finally(self) -> None:
        self.stage._kick()
        if self.then is not None:
            self.then()


# Called once a batch is settled, its reruns included (None: nothing waits for it).
Then = Callable[[], None] | None


Runner = StageRunner  # every stage is one: a model stage has a ModelPlacement


class PipelineRunner:
    """A pipeline's stages, running: requests in (:meth:`submit`), responses out."""

    def __init__(
        self,
        name: str,
        stages: dict[str, Runner],
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 0.0,
    ) -> None:
        self.name = name
        self.stages = stages
        self.loop = loop
        self.timeout = timeout
        for runner in stages.values():
            runner.passed = self._passed
            runner.refused = self.answer

    def submit(
        self,
        plan: Plan,
        value: Any,
        rows: int,
        finish: Finish,
        request: Request | None = None,
        keep_rejects: bool = False,
    ) -> Call:
        """Start a request's rows through ``plan``; HTTPError (503: a first stage's queue is
        full) if they cannot start."""
        call = Call(plan, rows, finish, request, keep_rejects)
        call.values[REQUEST] = value
        self._advance(call, REQUEST, first=True)
        if call.response is None and self.timeout > 0 and self.loop is not None:
            call.deadline = self.loop.call_later(self.timeout, self._expire, call)
        return call

    def _expire(self, call: Call) -> None:
        """The request ran out of time: 504 naming the stage(s) it is still in."""
        call.deadline = None
        stuck = [name for name in call.entered if name not in call.times]
        where = ", ".join(repr(name) for name in stuck) or "its answer"
        self.answer(
            call,
            json_response(
                {
                    "error": f"pipeline {self.name!r} timed out after {self.timeout:g} s "
                    f"in stage {where}",
                    "stage": stuck[0] if stuck else None,
                },
                504,
            ),
        )

    def _passed(self, call: Call, name: str, rows: Any) -> None:
        call.values[name] = rows
        self._advance(call, name)

    def _advance(self, call: Call, name: str, first: bool = False) -> None:
        ready = call.progress.done(call.plan, name)
        if call.progress.finished:
            try:
                answer = call.finish(call, call.result())
            except HTTPError as exc:
                if first:
                    raise
                answer = error_response(exc.status, exc.message, list(exc.headers))
            except Exception as exc:
                log.exception("pipeline %s: answering failed", self.name)
                answer = error_response(500, f"pipeline {self.name!r}: {_reason(exc)}")
            if isinstance(answer, Response):
                self.answer(call, answer)
            else:
                # A train step: it answers after the step with its own guarantees (WAL,
                # idempotency); a 504 now would tell a client that a step it took failed.
                if call.deadline is not None:
                    call.deadline.cancel()
                    call.deadline = None
                answer.subscribe(self.answer, call)
            return
        for stage in ready:
            runner = self.stages[stage]
            try:
                runner.add(call, call.input_for(stage))
            except (QueueFull, HTTPError) as exc:
                error = (
                    ServiceUnavailable(f"stage {stage!r} queue is full")
                    if isinstance(exc, QueueFull)
                    else exc
                )
                if first:
                    raise error from None
                self.answer(call, error_response(error.status, error.message))
                return

    def answer(self, call: Call, response: Response) -> None:
        """Resolve a request with ``response`` and its stage times (Server-Timing, access log)."""
        if call.response is not None:
            return
        if call.deadline is not None:
            call.deadline.cancel()
            call.deadline = None
        timed = call.timed()
        if timed:
            header = server_timing(timed)
            response = Response(  # a copy: a response object may be shared (cached errors)
                response.status,
                response.body,
                response.content_type,
                [*response.headers, (b"server-timing", header)],
                response.stream,
                response.content_length,
            )
            if call.request is not None:
                call.request.stages = header.decode()  # the access log reads the same
        call.pending.resolve(response)

    async def start(self) -> None:
        for runner in self.stages.values():
            await runner.start()

    async def close(self) -> None:
        for runner in self.stages.values():
            await runner.close()


# A placement's HTTPError with one of these statuses means the stage cannot run now, whatever
# the records: its batch's requests are answered so at once, not rerun one by one. Any other
# exception (a remote stage's 500 or 422 on a record included) is narrowed to the record.
_UNAVAILABLE: Final = frozenset({502, 503, 504})


def _reason(exc: BaseException) -> str:
    # A worker's StageFailed carries the repr of what the stage raised there.
    text = str(exc) if isinstance(exc, StageError | HTTPError | StageFailed) else repr(exc)
    return text[:500]


def _unset(*args: Any) -> None:
    raise RuntimeError("a stage runner used before its PipelineRunner was made")
