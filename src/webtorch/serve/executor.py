"""The per-model executor: the I/O shell around :class:`BatchScheduler`.

One executor per model serialises all work on it (inference now, training next), so no two
forward or optimizer steps ever race. Requests are queued as numpy arrays with an ``encode``
callback; a batch concatenates them, runs preprocess -> network -> postprocess once, splits the
outputs and encodes each request's response, resolving its Pending. Handlers return that Pending, so
a request costs no asyncio task.

Where compute runs is ``mode``: ``"loop"`` runs batches on the event loop thread, scheduled with
``call_soon`` so that every request already readable on a socket joins the batch first; ``"thread"``
runs them on one worker thread while the loop keeps accepting. For small models the loop is faster
(no thread hop, no GIL ping-pong); BENCHMARKS.md has the numbers behind the default.

Training (``train/trainer.py``) goes through the same executor, so no inference ever sees a
half-updated model and no two steps race. When no step is in flight, the queued train requests
become a group of micro-batches of up to ``train.max_batch`` rows each (usually one: every request
that arrived while the previous step ran). While that queue still grows from one loop turn to the
next, below ``train.max_batch``, the group waits another turn (``BatchScheduler.growing``): the
answers of the last step are coming back as new requests, and a step's torch cost hardly depends
on its rows. With a WAL the group is written and fsynced on an I/O
thread (group commit: one fsync for all of it) while the model computes the first micro-batch's
gradients, so the disk's latency hides behind the compute. Each micro-batch's optimizer step
follows once it is computed and logged, in log order, and only then are its requests answered.
A train request repeating the idempotency key of one applied already is answered as that one was
(:meth:`Trainer.answered`); one repeating a key queued or in flight waits for its answer. Neither
is applied again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Literal, Protocol, TypeVar, cast

import numpy as np
import torch

from webtorch.errors import BadRequest, HTTPError, ModelFailed, NotFound, ServiceUnavailable
from webtorch.http.messages import Pending, Response, error_response, response_for_error
from webtorch.metrics import ModelStats
from webtorch.serve.batcher import BatchScheduler, QueueFull
from webtorch.serve.datatypes import to_numpy, to_torch
from webtorch.serve.model import LoadedModel, Tensors, TensorSpec
from webtorch.serve.wire import tensors as codecs
from webtorch.serve.wire.tensors import InputData
from webtorch.train.checkpoint import Snapshot
from webtorch.train.forms import TrainRequest, settle
from webtorch.train.trainer import Answer, Batch, Prepared, StepResult, Trainer, UncheckedRows
from webtorch.train.wal import delete_segments

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter

log: Final = logging.getLogger("webtorch.serve")
_E = TypeVar("_E")

ComputeMode = Literal["loop", "thread"]
Priority = Literal["inference", "fifo"]
Encoder = Callable[[dict[str, np.ndarray]], Response]


class BatchEncoder(Protocol):
    """Encodes the responses of several requests at once (see ``ShortForm.encode_batch``):
    given the batch's outputs and each request's row count, one response per request, or None
    where it cannot, and the requests are then encoded one by one."""

    def encode_batch(
        self, outputs: dict[str, np.ndarray], counts: list[int]
    ) -> list[Response] | None: ...


TrainEncoder = Callable[[TrainRequest, float, int], Response]
# The responses of a whole step's requests at once, from their losses and the step number (see
# ``forms.encode_short_batch``).
TrainBatchEncoder = Callable[[list[float], int], list[Response]]


class Job(Pending):
    """One request's work, and the Pending its handler returned: one allocation per request."""

    __slots__ = ("encode", "inputs", "rows", "together")

    def __init__(
        self,
        inputs: dict[str, InputData],
        rows: int,
        encode: Encoder,
        together: BatchEncoder | None = None,
    ) -> None:
        # Pending's fields, set here rather than through super().__init__(): a call saved per
        # request on the hot path.
        self.response = None
        self._callback = None
        self._arg = None
        self.on_cancel = None
        self.inputs = inputs
        self.rows = rows
        self.encode = encode
        # Encodes this job's response with those of the other jobs of its batch that share it.
        self.together = together


class TrainJob(Pending):
    """One train request's work and its Pending."""

    __slots__ = ("arrived", "encode", "request", "together")

    def __init__(
        self,
        request: TrainRequest,
        encode: TrainEncoder,
        arrived: float,
        together: TrainBatchEncoder | None = None,
    ) -> None:
        self.response = None
        self._callback = None
        self._arg = None
        self.on_cancel = None
        self.request = request
        self.encode = encode
        self.arrived = arrived
        # Encodes this job's response with those of its step's other jobs that share it.
        self.together = together


class _Step:
    """A train micro-batch in flight: computed, logged, then applied. (Not a dataclass, so
    that its ``__init__`` compiles: see :class:`webtorch.http.messages.Request`.)"""

    def __init__(self, jobs: list[TrainJob], batch: Batch) -> None:
        self.jobs = jobs
        self.batch = batch
        self.preparing = False
        self.prepared: Prepared | None = None  # gradients computed
        self.logged = False  # durable (or nothing to log)


# Micro-batches logged with one fsync, at most (more than one only when more than train.max_batch
# rows are queued): bounds a group's memory and latency.
MAX_GROUP: Final = 256


class Executor:
    def __init__(
        self,
        model: LoadedModel,
        stats: ModelStats,
        *,
        max_batch: int = 256,
        max_delay: float = 0.0,
        max_queue: int = 65536,
        mode: ComputeMode = "loop",
        loop: asyncio.AbstractEventLoop | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        self.model = model
        self.stats = stats
        self.scheduler: BatchScheduler[Job] = BatchScheduler(max_batch, max_delay, max_queue)
        self.mode = mode
        self.loop = loop or asyncio.get_event_loop()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._pool = ThreadPoolExecutor(1, f"webtorch-{model.name}") if mode == "thread" else None
        self._closed = False
        self._busy = False  # a batch or a train phase holds the model
        self._held = False  # queue, but run nothing (a reload waits for the old model's state)
        self._idle: asyncio.Event | None = None  # set when idle, once close() waits for it
        self._specs = [(t.name, t.dtype) for t in model.inputs]
        # Validated inputs of a model without variable inner dimensions always concatenate.
        self._uniform = all(d != -1 for t in model.inputs for d in t.shape[1:])
        self._outputs = [(t.name, t.dtype) for t in model.outputs]
        self.trainer = trainer
        self.train_scheduler: BatchScheduler[TrainJob] | None = None
        self._steps: deque[_Step] = deque()  # in flight, in step order
        self._yielded = False  # training waited once for an inference batch: it goes next
        self._priority: Priority = "inference"
        # WAL appends and truncations on one thread, in order; checkpoint writes on another, so
        # a large model's checkpoint never holds up the log.
        self._wal_io: ThreadPoolExecutor | None = None
        self._checkpoint_io: ThreadPoolExecutor | None = None
        self._checkpoints: set[asyncio.Task[None]] = set()
        self._train_failure: str | None = None
        # Idempotency keys of train requests queued or in flight, each with the requests that
        # repeat it meanwhile (answered with it, never applied themselves).
        self._keyed: dict[str, list[TrainJob]] = {}
        if trainer is not None:
            cfg = trainer.config
            self.train_scheduler = BatchScheduler(cfg.max_batch, 0.0, cfg.max_queue)
            self._priority = cfg.priority
            if trainer.wal is not None:
                self._wal_io = ThreadPoolExecutor(1, f"webtorch-{model.name}-wal")
            if trainer.durability != "none":
                self._checkpoint_io = ThreadPoolExecutor(1, f"webtorch-{model.name}-checkpoint")

    def submit(
        self,
        inputs: dict[str, InputData],
        rows: int,
        encode: Encoder,
        together: BatchEncoder | None = None,
    ) -> Pending:
        if self._closed:
            raise ServiceUnavailable(f"model {self.model.name!r} is shutting down")
        if rows > self.scheduler.max_batch:
            raise BadRequest(
                f"batch of {rows} rows exceeds model {self.model.name!r}'s max_batch "
                f"{self.scheduler.max_batch}"
            )
        job = Job(inputs, rows, encode, together)
        try:
            self.scheduler.add(job, rows, _clock())
        except QueueFull:
            raise ServiceUnavailable(f"model {self.model.name!r} queue is full") from None
        if not self._scheduled and not self._busy:
            self._scheduled = True
            self.loop.call_soon(self._run)
        return job

    def submit_train(
        self,
        request: TrainRequest,
        encode: TrainEncoder,
        together: TrainBatchEncoder | None = None,
    ) -> Pending:
        queue = self.train_scheduler
        if queue is None:
            raise NotFound(f"model {self.model.name!r} does not accept training")
        if self._closed:
            raise ServiceUnavailable(f"model {self.model.name!r} is shutting down")
        now = _clock()
        job = TrainJob(request, encode, now, together)
        key = request.key
        if key is not None and self._repeat(job, key):
            return job
        if self._train_failure is not None:
            raise ServiceUnavailable(self._train_failure)
        if request.rows > queue.max_batch:
            raise BadRequest(
                f"{request.rows} examples exceed model {self.model.name!r}'s train.max_batch "
                f"{queue.max_batch}"
            )
        try:
            queue.add(job, request.rows, now)
        except QueueFull:
            raise ServiceUnavailable(f"model {self.model.name!r} train queue is full") from None
        if key is not None:
            self._keyed[key] = []
        self._kick()
        return job

    def _repeat(self, job: TrainJob, key: str) -> bool:
        """Whether ``job`` repeats an idempotency key applied already (then it is answered as
        that request was) or queued or in flight (then it gets the same answer when that one
        does); never applied a second time."""
        trainer = self.trainer
        assert trainer is not None
        answer = trainer.answered(key)
        if answer is not None:
            job.resolve(self._recall(job, answer))
            return True
        followers = self._keyed.get(key)
        if followers is None:
            return False
        followers.append(job)
        return True

    def _recall(self, job: TrainJob, answer: Answer) -> Response:
        """A keyed request's answer again, in the form ``job`` asked for."""
        step, loss, error = answer
        if error is not None or loss is None:
            return self._refused(error)
        try:
            return job.encode(job.request, loss, step)
        except Exception as err:
            return _internal(err)

    def _refused(self, error: str | None) -> Response:
        return response_for_error(
            ModelFailed(f"model {self.model.name!r} could not train on this example: {error}")
        )

    def _answer_repeats(self, jobs: list[TrainJob]) -> None:
        """Answer the requests that repeated the keys of ``jobs``, now answered themselves."""
        trainer = self.trainer
        assert trainer is not None
        for job in jobs:
            key = job.request.key
            if key is None:
                continue
            followers = self._keyed.pop(key, None)
            if not followers:
                continue
            answer = trainer.answered(key)
            for follower in followers:
                if answer is not None:
                    follower.resolve(self._recall(follower, answer))
                elif job.response is not None:
                    follower.resolve(job.response)  # not applied (400, 503): the same error

    def hold(self) -> None:
        """Accept and queue requests but run nothing until :meth:`release`."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled and not self._busy:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def _run(self) -> None:
        """Start the next piece of work on the model, if it is free: an inference batch or the
        next train step."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or self._held:
            return
        # The scheduler's clock is perf_counter: uvloop's loop.time() has 1 ms resolution.
        now = _clock()
        steps = self._steps
        if steps and steps[0].prepared is not None and steps[0].logged:
            self._begin_apply(steps[0])  # finishing a step never waits for inference
            return
        training = self._training_ready()
        if training and self._train_first():
            self._yielded = False
            if steps:
                self._begin_prepare(steps[0])
            elif self.train_scheduler is not None and self.train_scheduler.growing():
                self._kick()  # one more loop turn: its poll adds the train requests arriving
            else:
                self._begin_group(now)
            return
        batch = self.scheduler.poll(now)
        if batch is None:
            if training:  # inference waits for its max_delay: training need not
                self._yielded = True
                self._kick()
                return
            wake = self.scheduler.wake_at()
            if wake is not None:
                self._timer = self.loop.call_later(max(0.0, wake - now), self._run)
            else:
                self._maybe_idle()
            return
        if training:
            self._yielded = True
        record_queue = self.stats.stages["queue"].record
        for entry in batch:
            record_queue(now - entry.arrived)
        jobs = [entry.item for entry in batch]
        self._busy = True
        if self._pool is None:
            self._complete(jobs, self._compute(jobs))
        else:
            running = self.loop.run_in_executor(self._pool, self._compute, jobs)
            running.add_done_callback(functools.partial(self._complete_thread, jobs))

    def _training_ready(self) -> bool:
        """Whether training can start work on the model now: computing the next step of the
        group in flight, or (none in flight) starting the next group."""
        if self._steps:
            head = self._steps[0]
            return not head.preparing and head.prepared is None
        queue = self.train_scheduler
        return queue is not None and bool(len(queue))

    def _cut(self, now: float) -> _Step | None:
        """The next micro-batch from the queue; None if every request in it was malformed."""
        trainer = self.trainer
        queue = self.train_scheduler
        assert trainer is not None and queue is not None
        micro = queue.poll(now)
        assert micro is not None
        queue.finish()  # the queue only cuts micro-batches; the executor orders their work
        jobs = [entry.item for entry in micro]
        try:
            return _Step(jobs, self._batch(trainer, jobs))
        except UncheckedRows:
            # Some request's JSON rows hold something other than numbers: check each request
            # on its own, answer the bad ones 400 and batch the others.
            good: list[TrainJob] = []
            for job in jobs:
                try:
                    settle(job.request, self.model.inputs, self.model.targets)
                except HTTPError as exc:
                    job.resolve(response_for_error(exc))
                    if self._keyed:
                        self._answer_repeats([job])
                else:
                    good.append(job)
            return _Step(good, self._batch(trainer, good)) if good else None

    def _batch(self, trainer: Trainer, jobs: list[TrainJob]) -> Batch:
        keys: list[str | None] | None = None
        if self._keyed:  # some request queued has an idempotency key: it goes into the log
            keys = [job.request.key for job in jobs]
            if not any(key is not None for key in keys):
                keys = None
        return trainer.batch(
            [(job.request.inputs, job.request.targets) for job in jobs],
            [job.request.rows for job in jobs],
            keys,
        )

    def _train_first(self) -> bool:
        """Whether a ready train step goes before waiting inference (see TrainConfig)."""
        if not len(self.scheduler) or self._yielded:
            return True
        if self._priority == "inference":
            return False
        if self._steps:
            return True  # a step in flight is older than anything queued behind it
        assert self.train_scheduler is not None
        return self.train_scheduler.queued()[0].arrived <= self.scheduler.queued()[0].arrived

    def _complete_thread(self, jobs: list[Job], fut: asyncio.Future[list[Response]]) -> None:
        exc = fut.exception()
        responses = fut.result() if exc is None else [_internal(exc)] * len(jobs)
        self._complete(jobs, responses)

    def _complete(self, jobs: list[Job], responses: list[Response]) -> None:
        for job, response in zip(jobs, responses, strict=True):
            job.resolve(response)
        self.stats.bound()
        self.scheduler.finish()
        self._busy = False
        self._kick()

    def _maybe_idle(self) -> None:
        if (
            self._idle is not None
            and not self._busy
            and not self._steps
            and not len(self.scheduler)
            and not (self.train_scheduler is not None and len(self.train_scheduler))
        ):
            self._idle.set()

    # -- training (see train/trainer.py) ---------------------------------------------------------

    def _begin_group(self, now: float) -> None:
        trainer = self.trainer
        queue = self.train_scheduler
        assert trainer is not None and queue is not None
        steps: list[_Step] = []
        while len(queue) and len(steps) < MAX_GROUP:
            step = self._cut(now)
            if step is not None:
                steps.append(step)
        if not steps:  # every request was malformed, and answered so
            self._kick()
            return
        self._steps.extend(steps)
        if trainer.wal is None:
            for step in steps:
                step.logged = True
        else:
            assert self._wal_io is not None
            records = [(step.batch.seq, trainer.encode(step.batch)) for step in steps]
            logged = self.loop.run_in_executor(self._wal_io, trainer.log, records)
            logged.add_done_callback(functools.partial(self._logged, steps))
        self._begin_prepare(steps[0])

    def _in_flight(self, step: _Step) -> bool:
        return any(s is step for s in self._steps)  # False once training failed

    def _logged(self, steps: list[_Step], fut: asyncio.Future[float]) -> None:
        if not self._in_flight(steps[-1]):
            return
        exc = fut.exception()
        if exc is not None:
            # The log's state on disk is unknown (after a failed fsync the kernel may have
            # dropped the pages): more steps could make replay diverge. Training stops until an
            # operator restarts the server; inference goes on.
            self._fail_training(f"the write-ahead log failed: {exc}", exc)
            return
        assert self.trainer is not None
        self.trainer.stats.log_seconds.observe(fut.result())
        for step in steps:
            step.logged = True
        self._kick()

    def _begin_prepare(self, step: _Step) -> None:
        trainer = self.trainer
        assert trainer is not None
        step.preparing = True
        self._on_model(
            functools.partial(trainer.prepare, step.batch),
            functools.partial(self._prepared, step),
        )

    def _prepared(self, step: _Step, result: Prepared | None, exc: BaseException | None) -> None:
        if not self._in_flight(step):
            return
        step.preparing = False
        if exc is not None or result is None:
            # prepare isolates bad requests itself: an error here is a step out of order.
            self._fail_training(f"computing a step failed: {exc}", exc)
            return
        step.prepared = result
        if step.logged:
            self._begin_apply(step)  # the model is free: step now, not after a loop turn
        else:
            self._kick()

    def _begin_apply(self, step: _Step) -> None:
        trainer = self.trainer
        assert trainer is not None and step.prepared is not None
        self._on_model(
            functools.partial(trainer.apply, step.prepared),
            functools.partial(self._applied, step),
        )

    def _on_model(
        self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``work`` holding the model, where compute runs; then ``done(result, error)`` on the
        loop with the model free again."""
        self._busy = True
        if self._pool is None:
            try:
                result = work()
            except Exception as exc:
                self._busy = False
                done(None, exc)
            else:
                self._busy = False
                done(result, None)
            return

        def finished(fut: asyncio.Future[Any]) -> None:
            self._busy = False
            exc = fut.exception()
            done(None if exc is not None else fut.result(), exc)

        self.loop.run_in_executor(self._pool, work).add_done_callback(finished)

    def _applied(self, step: _Step, result: StepResult | None, exc: BaseException | None) -> None:
        if exc is not None or result is None:
            # After a failed optimizer step the weights cannot be trusted to match the log.
            self._fail_training(f"the optimizer step failed: {exc}", exc)
            return
        assert self._steps[0] is step
        self._steps.popleft()
        if not self._answer_together(step.jobs, result):
            self._answer(step.jobs, result)
        if step.batch.keys is not None:
            self._answer_repeats(step.jobs)
        if result.snapshot is not None:
            self._write_checkpoint(*result.snapshot)
        self._kick()

    def _answer_together(self, jobs: list[TrainJob], result: StepResult) -> bool:
        """Answer a step's requests with one call when all share a batch encoder and none
        failed; False when they do not (then :meth:`_answer` does, request by request)."""
        together = _shared(job.together for job in jobs)
        if together is None:
            return False
        losses: list[float] = []
        for loss in result.losses:
            if loss is None:
                return False
            losses.append(loss)
        try:
            responses = together(losses, result.step)
        except Exception:  # a bug there must not lose the answers: encode one by one instead
            log.exception("batch encoding of train answers failed for model %s", self.model.name)
            return False
        if len(responses) != len(jobs):
            return False
        for job, response in zip(jobs, responses, strict=True):
            job.resolve(response)
        return True

    def _answer(self, jobs: list[TrainJob], result: StepResult) -> None:
        for job, loss, error in zip(jobs, result.losses, result.errors, strict=True):
            if error is not None:
                self.stats.errors += 1
                response = self._refused(error)
            else:
                assert loss is not None
                try:
                    response = job.encode(job.request, loss, result.step)
                except Exception as err:
                    response = _internal(err)
            job.resolve(response)

    def _fail_training(self, reason: str, exc: BaseException | None) -> None:
        self._train_failure = f"model {self.model.name!r}: training stopped: {reason}"
        log.error("%s", self._train_failure, exc_info=exc)
        response = response_for_error(ServiceUnavailable(self._train_failure))
        jobs = [job for step in self._steps for job in step.jobs]
        self._steps.clear()
        if self.train_scheduler is not None:
            jobs += [entry.item for entry in self.train_scheduler.drain()]
        for followers in self._keyed.values():
            jobs += followers
        self._keyed.clear()
        trainer = self.trainer
        if self._wal_io is not None and trainer is not None:
            # What was logged but not applied is answered 503 below: it must not be replayed
            # after a restart (a client retrying its 503 would be trained on twice). After the
            # log call in flight, on the same thread.
            cut = self.loop.run_in_executor(self._wal_io, trainer.discard_unapplied, trainer.seq)
            cut.add_done_callback(self._discarded)
        for job in jobs:
            job.resolve(response)
        self._kick()

    def _discarded(self, fut: asyncio.Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error(
                "model %s: could not cut the unapplied steps from the WAL: a restart may apply "
                "requests that were answered 503",
                self.model.name,
                exc_info=exc,
            )

    def _write_checkpoint(self, number: int, snap: Snapshot) -> None:
        task = self.loop.create_task(self._checkpoint(number, snap))
        self._checkpoints.add(task)
        task.add_done_callback(self._checkpoints.discard)

    async def _checkpoint(self, number: int, snap: Snapshot) -> None:
        """Write a checkpoint, then (once it is durable) let the WAL drop what it covers."""
        trainer = self.trainer
        assert trainer is not None and self._checkpoint_io is not None
        try:
            through = await self.loop.run_in_executor(
                self._checkpoint_io, trainer.write_checkpoint, number, snap
            )
            if self._wal_io is not None:
                done = await self.loop.run_in_executor(self._wal_io, trainer.forget_logged, through)
                await self.loop.run_in_executor(self._checkpoint_io, delete_segments, done)
        except Exception:
            # Training goes on: the WAL keeps everything since the last good checkpoint.
            log.exception("model %s: checkpoint at step %d failed", self.model.name, number)
        finally:
            trainer.checkpointing = False

    # -- compute (loop thread or worker thread) ---------------------------------------------------

    def _compute(self, jobs: list[Job]) -> list[Response]:
        """Run the jobs as few forward passes as their shapes allow; one response per job."""
        responses: list[Response | None] = [None] * len(jobs)
        for group in self._groups(jobs):
            self._run_group(jobs, group, responses)
        return [r if r is not None else _internal(RuntimeError("no response")) for r in responses]

    def _groups(self, jobs: list[Job]) -> list[list[int]]:
        if len(jobs) == 1 or self._uniform:
            return [list(range(len(jobs)))]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            key = tuple(np.shape(job.inputs[name])[1:] for name, _ in self._specs)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _run_group(
        self, jobs: list[Job], group: list[int], responses: list[Response | None]
    ) -> None:
        members = [jobs[i] for i in group]
        try:
            outputs = self._forward(members)
        except _UncheckedRows:
            # Some request's JSON rows hold something other than numbers: check each request on
            # its own, answer the bad ones 400 and run the others together.
            good: list[int] = []
            for i in group:
                try:
                    self._check_rows(jobs[i])
                except HTTPError as exc:
                    responses[i] = response_for_error(exc)
                else:
                    good.append(i)
            if good:
                self._run_group(jobs, good, responses)
            return
        except Exception as exc:
            if len(members) > 1:
                # One request's input broke the model: isolate it instead of failing the batch.
                for i in group:
                    self._run_group(jobs, [i], responses)
                return
            self.stats.errors += 1
            log.warning("model %s failed: %r", self.model.name, exc)
            responses[group[0]] = response_for_error(
                ModelFailed(f"model {self.model.name!r} could not process this input: {exc}")
            )
            return
        if len(members) > 1 and self._encode_together(members, group, outputs, responses):
            return
        record_encode = self.stats.stages["encode"].record
        items = list(outputs.items())
        single = items[0] if len(items) == 1 else None
        start = 0
        clock = _clock()
        for i, job in zip(group, members, strict=True):
            end = start + job.rows
            try:
                if single is not None:
                    sliced = {single[0]: single[1][start:end]}
                else:
                    sliced = {name: out[start:end] for name, out in items}
                responses[i] = job.encode(sliced)
            except HTTPError as exc:
                responses[i] = response_for_error(exc)
            except Exception as exc:
                responses[i] = _internal(exc)
            now = _clock()
            record_encode(now - clock)
            clock = now
            start = end

    def _encode_together(
        self,
        members: list[Job],
        group: list[int],
        outputs: dict[str, np.ndarray],
        responses: list[Response | None],
    ) -> bool:
        """Encode the group's responses in one call when all its jobs share a batch encoder;
        False when they do not or it declines. Each request's encode time is its share."""
        together = _shared(job.together for job in members)
        if together is None:
            return False
        t0 = _clock()
        try:
            encoded = together.encode_batch(outputs, [job.rows for job in members])
        except Exception:  # a bug there must not fail the batch: encode one by one instead
            log.exception("batch encoding failed for model %s", self.model.name)
            return False
        if encoded is None or len(encoded) != len(members):
            return False
        share = (_clock() - t0) / len(members)
        record_encode = self.stats.stages["encode"].record
        for i, response in zip(group, encoded, strict=True):
            responses[i] = response
            record_encode(share)
        return True

    def _forward(self, jobs: list[Job]) -> dict[str, np.ndarray]:
        model = self.model
        spec = model.spec
        device = model.device
        stats = self.stats
        rows = sum(job.rows for job in jobs)
        inputs: Tensors = {}
        for tensor in model.inputs:
            name, dt = tensor.name, tensor.dtype
            parts = [job.inputs[name] for job in jobs]
            array: np.ndarray
            if type(parts[0]) is list:
                array = _rows_array(parts, tensor)
            elif len(parts) == 1:
                array = cast(np.ndarray, parts[0])
            else:
                array = np.concatenate(parts)
            if dt.torch is None:  # BYTES: preprocess turns them into tensors
                inputs[name] = array
            else:
                inputs[name] = to_torch(array, dt).to(device, non_blocking=True)
        stages = stats.stages
        with torch.inference_mode():
            t0 = _clock()
            if spec.preprocess is not None:
                inputs = spec.preprocess(inputs)
            t1 = _clock()
            raw = model.network(*(inputs[name] for name, _ in self._specs))
            t2 = _clock()
            named = model._name_outputs(raw)
            if spec.postprocess is not None:
                named = spec.postprocess(named)
            outputs: dict[str, np.ndarray] = {}
            for name, dt in self._outputs:
                value = named.get(name)
                if value is None:
                    raise RuntimeError(f"the model produced no output {name!r}")
                if isinstance(value, torch.Tensor):
                    array = to_numpy(value, dt)
                else:
                    array = np.asarray(value)
                if array.ndim == 0 or array.shape[0] != rows:
                    raise RuntimeError(
                        f"output {name!r} has shape {list(array.shape)}, expected {rows} rows"
                    )
                outputs[name] = array
            t3 = _clock()
        stages["preprocess"].observe(t1 - t0)
        stages["network"].observe(t2 - t1)
        stages["postprocess"].observe(t3 - t2)
        stats.batch_rows.observe(rows)
        stats.batches += 1
        return outputs

    def _check_rows(self, job: Job) -> None:
        """Replace a job's unchecked JSON rows by checked arrays; BadRequest names a bad one."""
        for spec in self.model.inputs:
            data = job.inputs[spec.name]
            if type(data) is list:
                job.inputs[spec.name] = codecs.strict_array(spec, data)

    def warmup(self) -> None:
        """One forward pass on zeros before serving, so the first client does not pay for lazy
        initialisation (allocator, kernels: ~15 ms for XOR on CPU). Skipped when a shape is not
        fully known or the model rejects zeros; that is the model's business, not an error."""
        inputs: dict[str, InputData] = {}
        for spec in self.model.inputs:
            if spec.dtype.torch is None or any(d == -1 for d in spec.shape[1:]):
                return
            inputs[spec.name] = np.zeros((1, *spec.shape[1:]), dtype=spec.dtype.numpy)
        try:
            self._forward([Job(inputs, 1, _no_encode)])
        except Exception as exc:
            log.info("model %s: warm-up skipped: %r", self.model.name, exc)
        self.stats.reset()  # warm-up is not traffic

    async def close(self) -> None:
        """Refuse new work, wait for queued and running work to finish, then (training) write a
        final checkpoint and wait for every write."""
        self._closed = True
        if self._held:
            # Never released (its model failed to come up): what waits for it gets a 503.
            response = response_for_error(
                ServiceUnavailable(f"model {self.model.name!r} failed to load")
            )
            for queue in (self.scheduler, self.train_scheduler):
                if queue is not None:
                    for entry in queue.drain():
                        entry.item.resolve(response)
            for followers in self._keyed.values():
                for job in followers:
                    job.resolve(response)
            self._keyed.clear()
            self._held = False
        self._idle = asyncio.Event()
        self._maybe_idle()
        await self._idle.wait()
        trainer = self.trainer
        if self._checkpoints:
            await asyncio.gather(*self._checkpoints)
        if (
            trainer is not None
            and self._checkpoint_io is not None
            and self._train_failure is None
            and trainer.unsaved()
        ):
            await self._checkpoint(*trainer.snapshot())
        for pool in (self._wal_io, self._checkpoint_io):
            if pool is not None:
                pool.shutdown(wait=True)
        if trainer is not None:
            trainer.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class _UncheckedRows(Exception):
    """A batch's JSON rows did not convert cleanly: some request sent something not a number."""


def _rows_array(parts: list[InputData], spec: TensorSpec) -> np.ndarray:
    if any(type(part) is not list for part in parts):
        raise _UncheckedRows  # rows beside arrays: check the rows, then concatenate arrays
    array = codecs.rows_array(parts, spec)  # type: ignore[arg-type]
    if array is None:
        raise _UncheckedRows
    return array


def _shared(encoders: Iterator[_E | None]) -> _E | None:
    """The batch encoder all of a batch's jobs share; None if one has none or another."""
    first = next(encoders, None)
    if first is None:
        return None
    for encoder in encoders:
        if encoder is not first:
            return None
    return first


def _no_encode(outputs: dict[str, np.ndarray]) -> Response:
    return Response()


def _internal(exc: BaseException) -> Response:
    log.error("executor failure", exc_info=exc)
    return error_response(500, "internal server error")


__all__ = ["ComputeMode", "Executor", "Job", "ModelFailed", "TrainJob"]
