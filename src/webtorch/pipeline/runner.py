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
the stage and the record) and the rest of the batch goes on. A model stage is the model's own
executor (:class:`ModelStage`): its dynamic batching, training priority and WAL are the
model's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np

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
from webtorch.pipeline.placement import Placement, Unavailable
from webtorch.pipeline.spec import Stage, Takes
from webtorch.pipeline.timing import server_timing, stage_times
from webtorch.serve.batcher import BatchScheduler, Queued, QueueFull
from webtorch.serve.wire.tensors import InputData

if TYPE_CHECKING:
    from webtorch.serve.endpoint import ModelEndpoint

log = logging.getLogger("webtorch.pipeline")

# Makes a request's answer from its result rows: at once, or later (a train step's Pending).
Finish = Callable[["Call", Any], "Response | Pending"]


class Call(Pending):
    """One request on its way through a plan: its rows at each stage, its time in each."""

    __slots__ = (
        "entered",
        "finish",
        "keep_rejects",
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
        super().__init__()
        self.plan = plan
        # A stage's own endpoint answers Reject rows as rows (its caller, a remote placement,
        # hands them on): only the whole pipeline answers them 422.
        self.keep_rejects = keep_rejects
        self.rows = rows
        self.finish = finish
        self.request = request
        self.progress: Progress = plan.start()
        self.values: dict[str, Any] = {}
        self.entered: dict[str, float] = {}  # stage -> when the rows were queued there
        self.times: dict[str, float] = {}  # stage -> seconds: queue wait and its batch's run

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
        max_queue: int = 65536,
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
        self.queue.add((call, value), call.rows, self.clock())
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
            call.entered[self.name] = entry.arrived
            calls.append(call)
            values.append(value)
        if calls:
            self._run(calls, values)

    def _run(self, calls: list[Call], values: list[Any]) -> None:
        """Run one batch of whole requests' rows."""
        try:
            merged = concat(values, self.takes, self.name)
        except Exception as exc:  # rows that do not convert to the form the stage takes
            self._settle(calls, values, None, exc, self.clock())
            return
        self.in_flight += 1
        started = self.clock()
        self.placement.run(
            merged, lambda result, exc: self._ran(calls, values, result, exc, started)
        )

    def _ran(
        self,
        calls: list[Call],
        values: list[Any],
        result: Any,
        exc: BaseException | None,
        started: float,
    ) -> None:
        self.in_flight -= 1
        stats = self.stats
        end = self.clock()
        stats.run.record(end - started)
        stats.batch_rows.record(sum(call.rows for call in calls))
        stats.batches += 1
        self._settle(calls, values, result, exc, end)
        self._kick()

    def _settle(
        self,
        calls: list[Call],
        values: list[Any],
        result: Any,
        exc: BaseException | None,
        end: float,
    ) -> None:
        """A batch's outcome: each request's rows on, or the failure narrowed down."""
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
        elif isinstance(exc, Unavailable):
            # The placement could not run the batch at all (a remote stage's group is down or
            # timed out: 502/503/504): no record to single out, and narrowing down would send
            # it again row by row into the same failure. Every request gets that answer.
            for call in calls:
                self._unavailable(call, exc, end)
        elif len(calls) > 1:
            # One request's records broke the batch: each request on its own.
            for call, value in zip(calls, values, strict=True):
                self._run([call], [value])
        else:
            _Rows(self, calls[0], values[0], exc).start()

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
        self.refused(call, json_response(body, 500))

    def _unavailable(self, call: Call, exc: Unavailable, end: float) -> None:
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
    """One request whose batch failed, run again row by row to find the records that fail."""

    def __init__(self, stage: StageRunner, call: Call, value: Any, exc: BaseException) -> None:
        self.stage = stage
        self.call = call
        self.value = value
        self.exc = exc
        self.results: list[Any] = [None] * call.rows
        self.failures: list[tuple[int, BaseException]] = []
        self.left = call.rows

    def start(self) -> None:
        stage = self.stage
        if self.call.rows == 1:
            # Nothing to narrow down: this record fails the stage.
            stage._failed(self.call, 0, self.exc, stage.clock())
            return
        for index in range(self.call.rows):
            try:
                row = to_form(take(self.value, [index]), stage.takes, stage.name)
            except Exception as exc:
                self._done(index, None, exc)
                continue
            stage.in_flight += 1
            stage.placement.run(row, functools.partial(self._ran, index))

    def _ran(self, index: int, result: Any, exc: BaseException | None) -> None:
        self.stage.in_flight -= 1
        self._done(index, result, exc)
        self.stage._kick()

    def _done(self, index: int, result: Any, exc: BaseException | None) -> None:
        if exc is None:
            try:
                if rows_of(result, self.stage.name) != 1:
                    exc = StageError(f"stage {self.stage.name!r} returned other than 1 row for 1")
            except StageError as error:
                exc = error
        if exc is not None:
            self.failures.append((index, exc))
        else:
            self.results[index] = result
        self.left -= 1
        if self.left:
            return
        stage = self.stage
        end = stage.clock()
        if self.failures:
            index, first = min(self.failures, key=lambda f: f[0])
            stage._failed(self.call, index, first, end)
            return
        # Each row passed alone (the batch failed for another reason: its size, a flaky
        # dependency): the request goes on with its rows.
        form: Takes = "records" if isinstance(self.results[0], list) else "tensors"
        try:
            rows = concat(self.results, form, stage.name)
        except Exception as exc:
            stage._failed(self.call, None, exc, end)
            return
        stage._passed(self.call, rows, end)


class ModelStage:
    """A model stage: each request's rows go to the model's executor as one job, so the model
    batches them with its own dynamic batching and serialises them with its training."""

    def __init__(
        self,
        stage: Stage,
        endpoints: Mapping[str, ModelEndpoint],
        stats: StageStats,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        assert stage.model is not None
        self.stage = stage
        self.name = stage.name
        self.model = stage.model
        self.endpoints = endpoints  # looked up per request: a reload replaces the endpoint
        self.stats = stats
        self.clock = clock
        self.passed: Callable[[Call, str, Any], None] = _unset
        self.refused: Callable[[Call, Response], None] = _unset

    def endpoint(self) -> ModelEndpoint:
        endpoint = self.endpoints.get(self.model)
        if endpoint is None:
            raise ServiceUnavailable(f"stage {self.name!r}: model {self.model!r} is not loaded")
        return endpoint

    @property
    def max_batch(self) -> int:
        endpoint = self.endpoints.get(self.model)
        return endpoint.executor.scheduler.max_batch if endpoint is not None else 1 << 30

    def inputs(self, value: Any, endpoint: ModelEndpoint) -> dict[str, InputData]:
        """A request's rows as the model's input arrays, by the model's input names (one
        column into a one-input model goes by position, whatever its name)."""
        columns = to_form(value, "tensors", self.name)
        if isinstance(columns, Joined):
            raise StageError(f"stage {self.name!r}: a model stage cannot be a join")
        specs = endpoint.model.inputs
        arrays: dict[str, InputData] = {}
        for spec in specs:
            column = columns.get(spec.name)
            if column is None and len(specs) == 1 and len(columns) == 1:
                column = next(iter(columns.values()))
            if column is None:
                raise StageError(
                    f"stage {self.name!r}: model {self.model!r} takes {spec.name!r}; "
                    f"the rows have {sorted(columns)}"
                )
            arrays[spec.name] = _array(column, spec.dtype.numpy)
        return arrays

    def add(self, call: Call, value: Any) -> None:
        endpoint = self.endpoint()
        call.entered[self.name] = self.clock()
        capture = _Capture()
        try:
            arrays = self.inputs(value, endpoint)
        except StageError as exc:
            self._fail(call, 422, str(exc))
            return
        job = endpoint.executor.submit(arrays, call.rows, capture.encode)
        job.subscribe(self._answered, (call, capture))

    def _answered(self, arg: tuple[Call, _Capture], response: Response) -> None:
        call, capture = arg
        end = self.clock()
        spent = end - call.entered.get(self.name, end)
        call.times[self.name] = spent
        self.stats.latency.record(spent)
        if capture.outputs is None or response.status != 200:
            self.stats.errors += call.rows
            self._fail(call, response.status, _error_text(response))
            return
        self.stats.rows += call.rows
        self.passed(call, self.name, capture.outputs)

    def _fail(self, call: Call, status: int, why: str) -> None:
        self.refused(
            call,
            json_response({"error": f"stage {self.name!r}: {why}", "stage": self.name}, status),
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


Runner = StageRunner | ModelStage


class PipelineRunner:
    """A pipeline's stages, running: requests in (:meth:`submit`), responses out."""

    def __init__(self, name: str, stages: dict[str, Runner]) -> None:
        self.name = name
        self.stages = stages
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
        return call

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
        timed = call.timed()
        if timed:
            response = Response(  # a copy: a response object may be shared (cached errors)
                response.status,
                response.body,
                response.content_type,
                [*response.headers, (b"server-timing", server_timing(timed))],
                response.stream,
                response.content_length,
            )
            if call.request is not None:
                call.request.stages = stage_times(timed)
        call.resolve(response)

    async def start(self) -> None:
        for runner in self.stages.values():
            await runner.start()

    async def close(self) -> None:
        for runner in self.stages.values():
            await runner.close()


class _Capture:
    """Keeps the model's output rows for a request (the executor's encoder is given them)."""

    __slots__ = ("outputs",)

    def __init__(self) -> None:
        self.outputs: dict[str, np.ndarray] | None = None

    def encode(self, outputs: dict[str, np.ndarray]) -> Response:
        self.outputs = outputs
        return _CAPTURED


_CAPTURED: Final = Response(200, b"")


def _array(column: Any, dtype: np.dtype[Any]) -> np.ndarray:
    if hasattr(column, "detach"):  # a torch tensor
        column = column.detach().cpu().numpy()
    array = np.asarray(column)
    if array.dtype != dtype:
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


def _error_text(response: Response) -> str:
    try:
        import orjson

        message = orjson.loads(response.body).get("error")
    except Exception:
        message = None
    return str(message) if message else f"the model answered {response.status}"


def _reason(exc: BaseException) -> str:
    # A worker's StageFailed carries the repr of what the stage raised there.
    text = str(exc) if isinstance(exc, StageError | HTTPError | StageFailed) else repr(exc)
    return text[:500]


def _unset(*args: Any) -> None:
    raise RuntimeError("a stage runner used before its PipelineRunner was made")
