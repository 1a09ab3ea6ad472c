"""The per-model executor: the I/O shell that runs what :class:`Scheduler` decides.

One executor per model serialises all work on it (inference and training), so no two forward or
optimizer steps ever race and no inference sees a half-updated model. When the model is free the
executor asks its scheduler (``scheduler.py``, sans-IO) what runs next and does that: an inference
batch, or a piece of the training pipeline's work (``train/pipeline.py``: compute a step, apply
one, start a group), or a timer, or nothing.

Inference requests are queued as numpy arrays with an ``encode`` callback; a batch concatenates
them, runs preprocess -> network -> postprocess once, splits the outputs and encodes each
request's response, resolving its Pending. Handlers return that Pending, so a request costs no
asyncio task.

Where compute runs is ``mode``: ``"loop"`` runs batches on the event loop thread, scheduled with
``call_soon`` so that every request already readable on a socket joins the batch first; ``"thread"``
runs them on one worker thread while the loop keeps accepting. For small models the loop is faster
(no thread hop, no GIL ping-pong); BENCHMARKS.md has the numbers behind the default.

The executor imports nothing from ``train/``: the trainer it is given builds the pipeline
(:meth:`Trainer.pipeline`), so serve/ and train/ form no import cycle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

import numpy as np
import torch

from webtorch.errors import BadRequest, HTTPError, ModelFailed, NotFound, ServiceUnavailable
from webtorch.http.messages import Pending, Response, error_response, response_for_error
from webtorch.metrics import ModelStats
from webtorch.serve.batcher import BatchScheduler, Queued, QueueFull
from webtorch.serve.datatypes import to_numpy, to_torch
from webtorch.serve.model import LoadedModel, Tensors, TensorSpec
from webtorch.serve.scheduler import (
    AGAIN,
    APPLY,
    GROUP,
    INFER,
    NO_STEP,
    PREPARE,
    TIMER,
    Priority,
    Scheduler,
    shared,
)
from webtorch.serve.wire import tensors as codecs
from webtorch.serve.wire.tensors import InputData
from webtorch.vocab import MAX_BATCH_ROWS, MAX_QUEUED_ROWS

if TYPE_CHECKING:  # built by the trainer (see above): train/ is never imported at runtime here
    from webtorch.serve.versions import Publisher, Subscriber
    from webtorch.train.forms import TrainForms, TrainRequest
    from webtorch.train.pipeline import TrainBatchEncoder, TrainEncoder
    from webtorch.train.trainer import Trainer

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter

log: Final = logging.getLogger("webtorch.serve")

ComputeMode = Literal["loop", "thread"]
Encoder = Callable[[dict[str, np.ndarray]], Response]


class BatchEncoder(Protocol):
    """Encodes the responses of several requests at once (see ``ShortForm.encode_batch``):
    given the batch's outputs and each request's row count, one response per request, or None
    where it cannot, and the requests are then encoded one by one."""

    def encode_batch(
        self, outputs: dict[str, np.ndarray], counts: list[int]
    ) -> list[Response] | None: ...


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


class Training(Protocol):
    """The training pipeline, as the executor drives it (``train/pipeline.py``)."""

    queue: BatchScheduler[Any]  # train requests, cut into micro-batches
    priority: Priority

    def forms(self) -> TrainForms: ...
    def head(self) -> int: ...
    def in_flight(self) -> bool: ...
    def begin_group(self, now: float) -> None: ...
    def prepare_head(self) -> None: ...
    def apply_head(self) -> None: ...
    def submit(
        self,
        request: TrainRequest,
        encode: TrainEncoder,
        together: TrainBatchEncoder | None,
        now: float,
    ) -> Pending: ...
    def refuse_queued(self, response: Response) -> None: ...
    async def close(self) -> None: ...


class Executor:
    def __init__(
        self,
        model: LoadedModel,
        stats: ModelStats,
        *,
        max_batch: int = MAX_BATCH_ROWS,
        max_delay: float = 0.0,
        max_queue: int = MAX_QUEUED_ROWS,
        mode: ComputeMode = "loop",
        loop: asyncio.AbstractEventLoop | None = None,
        trainer: Trainer | None = None,
        publisher: Publisher | None = None,
        subscriber: Subscriber | None = None,
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
        self.training: Training | None = None
        self.plan: Scheduler[Job, Any] = Scheduler(self.scheduler)
        if trainer is not None:
            training = trainer.pipeline(self)
            self.training = training
            self.plan = Scheduler(self.scheduler, training.queue, training.priority)
        # server.workers > 1 and the model trains: its weights as numbered versions (the
        # trainer's step), published by the trainer worker's executor after each step, before
        # its answers, and taken by the others' when a batch starts (serve/versions.py).
        self.publisher = publisher
        self.subscriber = subscriber
        self.version = -1  # the version the last batch ran (-1: not versioned)
        if publisher is not None:
            assert trainer is not None
            publisher.publish(trainer.step)

    @property
    def train_scheduler(self) -> BatchScheduler[Any] | None:
        """The train queue (None: the model does not train)."""
        training = self.training
        return training.queue if training is not None else None

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
        training = self.training
        if training is None:
            raise NotFound(f"model {self.model.name!r} does not accept training")
        if self._closed:
            raise ServiceUnavailable(f"model {self.model.name!r} is shutting down")
        return training.submit(request, encode, together, _clock())

    def hold(self) -> None:
        """Accept and queue requests but run nothing until :meth:`release`."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self.kick()

    def kick(self) -> None:
        """Look at what runs next on a later loop turn (once, however often asked)."""
        if not self._scheduled and not self._busy:
            self._scheduled = True
            self.loop.call_soon(self._run)

    def applied(self, step: int) -> None:
        """The training pipeline applied a step (the model is free, its answers not yet sent):
        publish the weights to the other workers first, so that an answer naming step N is
        never followed by a prediction there with fewer."""
        publisher = self.publisher
        if publisher is not None and step != publisher.version:
            publisher.publish(step)

    def _run(self) -> None:
        """Start the next piece of work on the model, if it is free: what the scheduler says."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or self._held:
            return
        # The scheduler's clock is perf_counter: uvloop's loop.time() has 1 ms resolution.
        now = _clock()
        training = self.training
        decision = self.plan.next(now, training.head() if training is not None else NO_STEP)
        if decision == INFER:
            batch = self.plan.batch
            assert batch is not None
            self._infer(batch, now)
        elif decision == AGAIN:
            self.kick()
        elif decision == TIMER:
            self._timer = self.loop.call_later(max(0.0, self.plan.wake - now), self._run)
        elif training is not None and decision == APPLY:
            training.apply_head()
        elif training is not None and decision == PREPARE:
            training.prepare_head()
        elif training is not None and decision == GROUP:
            training.begin_group(now)
        else:
            self._maybe_idle()

    def _infer(self, batch: list[Queued[Job]], now: float) -> None:
        record_queue = self.stats.stages["queue"].record
        for entry in batch:
            record_queue(now - entry.arrived)
        jobs = [entry.item for entry in batch]
        versioned = self.publisher is not None or self.subscriber is not None
        if versioned and not self._take_version(jobs):
            return
        self._busy = True
        if self._pool is None:
            self._complete(jobs, self._compute(jobs))
        else:
            running = self.loop.run_in_executor(self._pool, self._compute, jobs)
            running.add_done_callback(functools.partial(self._complete_thread, jobs))

    def _complete_thread(self, jobs: list[Job], fut: asyncio.Future[list[Response]]) -> None:
        exc = fut.exception()
        responses = fut.result() if exc is None else [_internal(exc)] * len(jobs)
        self._complete(jobs, responses)

    def _take_version(self, jobs: list[Job]) -> bool:
        """The weights this batch runs: the newest version (another worker's, taken now,
        before the batch, so that none of its answers mixes two). False when there is none yet
        (the trainer worker has not published): the batch is answered 503."""
        subscriber = self.subscriber
        if subscriber is None:
            self.version = self.publisher.version if self.publisher is not None else -1
            return True
        if subscriber.refresh():
            self.version = subscriber.version
            return True
        response = response_for_error(
            ServiceUnavailable(
                f"model {self.model.name!r}: waiting for its trainer's first weights",
            )
        )
        response.headers = ((b"retry-after", b"1"),)
        for job in jobs:
            job.resolve(response)
        self.scheduler.finish()
        self.kick()
        return False

    def _complete(self, jobs: list[Job], responses: list[Response]) -> None:
        if self.version >= 0:
            # Which version answered (a header only with versions: a single server has none).
            header = (b"webtorch-model-version", b"%d" % self.version)
            for response in responses:
                headers = response.headers
                if not headers or headers[-1] is not header:  # one response for several jobs
                    response.headers = (*headers, header)
        for job, response in zip(jobs, responses, strict=True):
            job.resolve(response)
        self.stats.bound()
        self.scheduler.finish()
        self._busy = False
        self.kick()

    def _maybe_idle(self) -> None:
        if (
            self._idle is not None
            and not self._busy
            and not (self.training is not None and self.training.in_flight())
            and not self.plan.pending()
        ):
            self._idle.set()

    def on_model(
        self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``work`` holding the model, where compute runs; then ``done(result, error)`` on the
        loop with the model free again (the training pipeline's phases)."""
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
        together = shared(job.together for job in members)
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
        training = self.training
        if self._held:
            # Never released (its model failed to come up): what waits for it gets a 503.
            response = response_for_error(
                ServiceUnavailable(f"model {self.model.name!r} failed to load")
            )
            for entry in self.scheduler.drain():
                entry.item.resolve(response)
            if training is not None:
                training.refuse_queued(response)
            self._held = False
        self._idle = asyncio.Event()
        self._maybe_idle()
        await self._idle.wait()
        if training is not None:
            await training.close()
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


def _no_encode(outputs: dict[str, np.ndarray]) -> Response:
    return Response()


def _internal(exc: BaseException) -> Response:
    log.error("executor failure", exc_info=exc)
    return error_response(500, "internal server error")


__all__ = ["ComputeMode", "Executor", "Job", "ModelFailed"]
