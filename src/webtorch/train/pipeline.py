"""The training pipeline: train requests in, micro-batches computed, logged, applied, answered.

The executor (``serve/executor.py``) serialises all work on a model, so no inference ever sees a
half-updated model and no two steps race; its scheduler (``serve/scheduler.py``) decides when
training gets the model. This is what training does with it, through the executor's
:class:`Host` (run on the model, ask for another scheduling turn):

- When no step is in flight, the queued train requests become a group of micro-batches of up to
  ``train.max_batch`` rows each (usually one: every request that arrived while the previous step
  ran): :meth:`TrainPipeline.begin_group`.
- With a WAL the group is written and fsynced on an I/O thread (group commit: one fsync for all
  of it) while the model computes the first micro-batch's gradients, so the disk's latency hides
  behind the compute (:meth:`Trainer.prepare`, :meth:`Trainer.log`).
- Each micro-batch's optimizer step follows once it is computed and logged, in log order, and
  only then are its requests answered (:meth:`Trainer.apply`).
- A checkpoint, when due, is written on a thread of its own, so a large model's checkpoint never
  holds up the log; once durable, the WAL drops what it covers.
- A train request repeating the idempotency key of one applied already is answered as that one
  was (:meth:`Trainer.answered`); one repeating a key queued or in flight waits for its answer.
  Neither is applied again.
- A failing log, computation or optimizer step stops training (every waiting request gets a 503,
  and what was logged but not applied is cut from the log); inference goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, Protocol

from webtorch.errors import BadRequest, HTTPError, ModelFailed, ServiceUnavailable
from webtorch.http.messages import Pending, Response, error_response, response_for_error
from webtorch.metrics import ModelStats
from webtorch.serve.batcher import BatchScheduler, QueueFull
from webtorch.serve.model import LoadedModel
from webtorch.serve.scheduler import HEAD_BUSY, HEAD_READY, HEAD_WAITING, NO_STEP, shared
from webtorch.train.forms import TrainForms, TrainRequest, UncheckedRows, settle
from webtorch.train.wal import delete_segments

if TYPE_CHECKING:  # the trainer builds this pipeline (Trainer.pipeline): no import at runtime
    from webtorch.train.batch import Answer, Batch, Prepared, StepResult
    from webtorch.train.checkpoint import Snapshot
    from webtorch.train.trainer import Trainer

log: Final = logging.getLogger("webtorch.serve")

TrainEncoder = Callable[[TrainRequest, float, int], Response]
# The responses of a whole step's requests at once, from their losses and the step number (see
# ``forms.encode_short_batch``).
TrainBatchEncoder = Callable[[list[float], int], list[Response]]

# Micro-batches logged with one fsync, at most (more than one only when more than train.max_batch
# rows are queued): bounds a group's memory and latency.
MAX_GROUP: Final = 256


class Host(Protocol):
    """What the pipeline needs of the executor that owns the model."""

    loop: asyncio.AbstractEventLoop
    model: LoadedModel
    stats: ModelStats

    def kick(self) -> None:
        """Schedule another look at what runs next (on a later loop turn)."""

    def applied(self, step: int) -> None:
        """A step was applied and the model is free: before its requests are answered (the
        executor publishes the weights to the other workers, if there are any)."""

    def on_model(
        self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``work`` holding the model; then ``done(result, error)`` with the model free."""


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
        # Pending's fields, set here rather than through super().__init__(): a call saved per
        # request.
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


class TrainPipeline:
    """One model's training, driven by its executor (``host``)."""

    def __init__(self, trainer: Trainer, host: Host) -> None:
        self.trainer = trainer
        self.host = host
        self.loop = host.loop
        self.model = host.model
        cfg = trainer.config
        self.queue: BatchScheduler[TrainJob] = BatchScheduler(cfg.max_batch, 0.0, cfg.max_queue)
        self.priority = cfg.priority
        self._steps: deque[_Step] = deque()  # in flight, in step order
        # WAL appends and truncations on one thread, in order; checkpoint writes on another, so
        # a large model's checkpoint never holds up the log.
        name = self.model.name
        self._wal_io: ThreadPoolExecutor | None = None
        self._checkpoint_io: ThreadPoolExecutor | None = None
        if trainer.wal is not None:
            self._wal_io = ThreadPoolExecutor(1, f"webtorch-{name}-wal")
        if trainer.durability != "none":
            self._checkpoint_io = ThreadPoolExecutor(1, f"webtorch-{name}-checkpoint")
        self._checkpoints: set[asyncio.Task[None]] = set()
        self._failure: str | None = None
        # Idempotency keys of train requests queued or in flight, each with the requests that
        # repeat it meanwhile (answered with it, never applied themselves).
        self._keyed: dict[str, list[TrainJob]] = {}

    def forms(self) -> TrainForms:
        """The wire forms of this model's train requests, for its endpoint."""
        return TrainForms(self.model, max_rows=self.queue.max_batch)

    # -- requests ----------------------------------------------------------------------------------

    def submit(
        self,
        request: TrainRequest,
        encode: TrainEncoder,
        together: TrainBatchEncoder | None,
        now: float,
    ) -> Pending:
        """Queue a train request (the host checked that it accepts work); its Pending."""
        queue = self.queue
        job = TrainJob(request, encode, now, together)
        key = request.key
        if key is not None and self._repeat(job, key):
            return job
        if self._failure is not None:
            raise ServiceUnavailable(self._failure)
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
        self.host.kick()
        return job

    def _repeat(self, job: TrainJob, key: str) -> bool:
        """Whether ``job`` repeats an idempotency key applied already (then it is answered as
        that request was) or queued or in flight (then it gets the same answer when that one
        does); never applied a second time."""
        answer = self.trainer.answered(key)
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

    # -- what the scheduler asks -------------------------------------------------------------------

    def head(self) -> int:
        """Where the step at the head of the group in flight stands (``serve/scheduler.py``)."""
        steps = self._steps
        if not steps:
            return NO_STEP
        step = steps[0]
        if step.prepared is not None:
            return HEAD_READY if step.logged else HEAD_BUSY
        return HEAD_BUSY if step.preparing else HEAD_WAITING

    def in_flight(self) -> bool:
        return bool(self._steps)

    # -- a group: cut, log, compute, apply -------------------------------------------------------

    def begin_group(self, now: float) -> None:
        trainer = self.trainer
        queue = self.queue
        steps: list[_Step] = []
        while len(queue) and len(steps) < MAX_GROUP:
            step = self._cut(now)
            if step is not None:
                steps.append(step)
        if not steps:  # every request was malformed, and answered so
            self.host.kick()
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

    def _cut(self, now: float) -> _Step | None:
        """The next micro-batch from the queue; None if every request in it was malformed."""
        queue = self.queue
        micro = queue.poll(now)
        assert micro is not None
        queue.finish()  # the queue only cuts micro-batches; the pipeline orders their work
        jobs = [entry.item for entry in micro]
        try:
            return _Step(jobs, self._batch(jobs))
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
            return _Step(good, self._batch(good)) if good else None
        except Exception as exc:
            # A request past its endpoint's checks that the batch cannot hold (a plugin's
            # arrays of another shape than the model's, say): add the requests one by one to
            # find those that do not fit (numbering nothing), answer them 400 and step with the
            # others. One request must not leave the others unanswered or stop the executor.
            log.warning("model %s: a train batch did not form (%r)", self.model.name, exc)
            good = []
            for job in jobs:
                try:
                    settle(job.request, self.model.inputs, self.model.targets)
                    self.trainer.tensors(
                        [(j.request.inputs, j.request.targets) for j in (*good, job)]
                    )
                except Exception as bad:
                    error = (
                        bad
                        if isinstance(bad, HTTPError)
                        else BadRequest(
                            f"train request does not fit model {self.model.name!r}: {bad}"
                        )
                    )
                    job.resolve(response_for_error(error))
                    if self._keyed:
                        self._answer_repeats([job])
                else:
                    good.append(job)
            return _Step(good, self._batch(good)) if good else None

    def _batch(self, jobs: list[TrainJob]) -> Batch:
        keys: list[str | None] | None = None
        if self._keyed:  # some request queued has an idempotency key: it goes into the log
            keys = [job.request.key for job in jobs]
            if not any(key is not None for key in keys):
                keys = None
        return self.trainer.batch(
            [(job.request.inputs, job.request.targets) for job in jobs],
            [job.request.rows for job in jobs],
            keys,
        )

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
            self._fail(f"the write-ahead log failed: {exc}", exc)
            return
        self.trainer.stats.log_seconds.observe(fut.result())
        for step in steps:
            step.logged = True
        self.host.kick()

    def prepare_head(self) -> None:
        self._begin_prepare(self._steps[0])

    def _begin_prepare(self, step: _Step) -> None:
        step.preparing = True
        self.host.on_model(
            functools.partial(self.trainer.prepare, step.batch),
            functools.partial(self._prepared, step),
        )

    def _prepared(self, step: _Step, result: Prepared | None, exc: BaseException | None) -> None:
        if not self._in_flight(step):
            return
        step.preparing = False
        if exc is not None or result is None:
            # prepare isolates bad requests itself: an error here is a step out of order.
            self._fail(f"computing a step failed: {exc}", exc)
            return
        step.prepared = result
        if step.logged:
            self._begin_apply(step)  # the model is free: step now, not after a loop turn
        else:
            self.host.kick()

    def apply_head(self) -> None:
        self._begin_apply(self._steps[0])

    def _begin_apply(self, step: _Step) -> None:
        assert step.prepared is not None
        self.host.on_model(
            functools.partial(self.trainer.apply, step.prepared),
            functools.partial(self._applied, step),
        )

    def _applied(self, step: _Step, result: StepResult | None, exc: BaseException | None) -> None:
        if exc is not None or result is None:
            # After a failed optimizer step the weights cannot be trusted to match the log.
            self._fail(f"the optimizer step failed: {exc}", exc)
            return
        assert self._steps[0] is step
        self._steps.popleft()
        self.host.applied(result.step)  # other workers predict with it before anyone hears
        if not self._answer_together(step.jobs, result):
            self._answer(step.jobs, result)
        if step.batch.keys is not None:
            self._answer_repeats(step.jobs)
        if result.snapshot is not None:
            self._write_checkpoint(*result.snapshot)
        self.host.kick()

    # -- answers -----------------------------------------------------------------------------------

    def _answer_together(self, jobs: list[TrainJob], result: StepResult) -> bool:
        """Answer a step's requests with one call when all share a batch encoder and none
        failed; False when they do not (then :meth:`_answer` does, request by request)."""
        together = shared(job.together for job in jobs)
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
                self.host.stats.errors += 1
                response = self._refused(error)
            else:
                assert loss is not None
                try:
                    response = job.encode(job.request, loss, result.step)
                except Exception as err:
                    response = _internal(err)
            job.resolve(response)

    # -- failure -----------------------------------------------------------------------------

    def _fail(self, reason: str, exc: BaseException | None) -> None:
        self._failure = f"model {self.model.name!r}: training stopped: {reason}"
        log.error("%s", self._failure, exc_info=exc)
        response = response_for_error(ServiceUnavailable(self._failure))
        jobs = [job for step in self._steps for job in step.jobs]
        self._steps.clear()
        jobs += [entry.item for entry in self.queue.drain()]
        for followers in self._keyed.values():
            jobs += followers
        self._keyed.clear()
        trainer = self.trainer
        if self._wal_io is not None:
            # What was logged but not applied is answered 503 below: it must not be replayed
            # after a restart (a client retrying its 503 would be trained on twice). After the
            # log call in flight, on the same thread.
            cut = self.loop.run_in_executor(self._wal_io, trainer.discard_unapplied, trainer.seq)
            cut.add_done_callback(self._discarded)
        for job in jobs:
            job.resolve(response)
        self.host.kick()

    def _discarded(self, fut: asyncio.Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error(
                "model %s: could not cut the unapplied steps from the WAL: a restart may apply "
                "requests that were answered 503",
                self.model.name,
                exc_info=exc,
            )

    def refuse_queued(self, response: Response) -> None:
        """Answer everything queued with ``response`` (the model never came up)."""
        for entry in self.queue.drain():
            entry.item.resolve(response)
        for followers in self._keyed.values():
            for job in followers:
                job.resolve(response)
        self._keyed.clear()

    # -- checkpoints and shutdown --------------------------------------------------------------

    def _write_checkpoint(self, number: int, snap: Snapshot) -> None:
        task = self.loop.create_task(self._checkpoint(number, snap))
        self._checkpoints.add(task)
        task.add_done_callback(self._checkpoints.discard)

    async def _checkpoint(self, number: int, snap: Snapshot) -> None:
        """Write a checkpoint, then (once it is durable) let the WAL drop what it covers."""
        trainer = self.trainer
        assert self._checkpoint_io is not None
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

    async def close(self) -> None:
        """Once the executor is idle: wait for every checkpoint write, write a final one, and
        close the trainer."""
        trainer = self.trainer
        if self._checkpoints:
            await asyncio.gather(*self._checkpoints)
        if self._checkpoint_io is not None and self._failure is None and trainer.unsaved():
            await self._checkpoint(*trainer.snapshot())
        for pool in (self._wal_io, self._checkpoint_io):
            if pool is not None:
                pool.shutdown(wait=True)
        trainer.close()


def _internal(exc: BaseException) -> Response:
    log.error("executor failure", exc_info=exc)
    return error_response(500, "internal server error")


__all__ = ["MAX_GROUP", "Host", "TrainJob", "TrainPipeline"]
