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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, cast

import numpy as np
import torch

from webtorch.errors import BadRequest, HTTPError, ServiceUnavailable
from webtorch.http.messages import Pending, Response, error_response, response_for_error
from webtorch.observe.metrics import ModelStats
from webtorch.serve import codecs
from webtorch.serve.batcher import BatchScheduler, QueueFull
from webtorch.serve.codecs import InputData
from webtorch.serve.datatypes import to_numpy, to_torch
from webtorch.serve.model import LoadedModel, Tensors, TensorSpec

log = logging.getLogger("webtorch.serve")

ComputeMode = Literal["loop", "thread"]
Encoder = Callable[[dict[str, np.ndarray]], Response]


class Job(Pending):
    """One request's work, and the Pending its handler returned: one allocation per request."""

    __slots__ = ("encode", "inputs", "rows")

    def __init__(self, inputs: dict[str, InputData], rows: int, encode: Encoder) -> None:
        # Pending's fields, set here rather than through super().__init__(): a call saved per
        # request on the hot path.
        self.response = None
        self._callback = None
        self._arg = None
        self.inputs = inputs
        self.rows = rows
        self.encode = encode


class ModelFailed(HTTPError):
    """The model raised on this request's input after validation passed."""

    status = 422


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
        self._idle: asyncio.Event | None = None  # set when idle, once close() waits for it
        self._specs = [(t.name, t.dtype) for t in model.inputs]
        # Validated inputs of a model without variable inner dimensions always concatenate.
        self._uniform = all(d != -1 for t in model.inputs for d in t.shape[1:])
        self._outputs = [(t.name, t.dtype) for t in model.outputs]

    def submit(self, inputs: dict[str, InputData], rows: int, encode: Encoder) -> Pending:
        if self._closed:
            raise ServiceUnavailable(f"model {self.model.name!r} is shutting down")
        if rows > self.scheduler.max_batch:
            raise BadRequest(
                f"batch of {rows} rows exceeds model {self.model.name!r}'s max_batch "
                f"{self.scheduler.max_batch}"
            )
        job = Job(inputs, rows, encode)
        try:
            self.scheduler.add(job, rows, time.perf_counter())
        except QueueFull:
            raise ServiceUnavailable(f"model {self.model.name!r} queue is full") from None
        if not self._scheduled and not self.scheduler.busy:
            self._scheduled = True
            self.loop.call_soon(self._run)
        return job

    def _run(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The scheduler's clock is perf_counter: uvloop's loop.time() has 1 ms resolution.
        now = time.perf_counter()
        batch = self.scheduler.poll(now)
        if batch is None:
            wake = self.scheduler.wake_at()
            if wake is not None:
                self._timer = self.loop.call_later(max(0.0, wake - now), self._run)
            return
        record_queue = self.stats.stages["queue"].record
        for entry in batch:
            record_queue(now - entry.arrived)
        jobs = [entry.item for entry in batch]
        if self._pool is None:
            self._complete(jobs, self._compute(jobs))
        else:
            running = self.loop.run_in_executor(self._pool, self._compute, jobs)
            running.add_done_callback(functools.partial(self._complete_thread, jobs))

    def _complete_thread(self, jobs: list[Job], fut: asyncio.Future[list[Response]]) -> None:
        exc = fut.exception()
        responses = fut.result() if exc is None else [_internal(exc)] * len(jobs)
        self._complete(jobs, responses)

    def _complete(self, jobs: list[Job], responses: list[Response]) -> None:
        for job, response in zip(jobs, responses, strict=True):
            job.resolve(response)
        self.stats.bound()
        self.scheduler.finish()
        if len(self.scheduler):
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self._run)
        elif self._idle is not None:
            self._idle.set()

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
        record_encode = self.stats.stages["encode"].record
        items = list(outputs.items())
        single = items[0] if len(items) == 1 else None
        start = 0
        clock = time.perf_counter()
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
            now = time.perf_counter()
            record_encode(now - clock)
            clock = now
            start = end

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
            t0 = time.perf_counter()
            if spec.preprocess is not None:
                inputs = spec.preprocess(inputs)
            t1 = time.perf_counter()
            raw = model.network(*(inputs[name] for name, _ in self._specs))
            t2 = time.perf_counter()
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
            t3 = time.perf_counter()
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
        """Refuse new work and wait for queued and running batches to finish."""
        self._closed = True
        if self.scheduler.busy or len(self.scheduler):
            self._idle = asyncio.Event()
            await self._idle.wait()
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
