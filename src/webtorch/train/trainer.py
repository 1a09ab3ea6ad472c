"""The trainer: one model's optimizer, step counter and durable state.

A training micro-batch (the requests merged into one optimizer step) goes through two phases on
the model, which the pipeline (``train/pipeline.py``) drives and the executor
(``serve/executor.py``) schedules:

1. :meth:`Trainer.prepare`: forward, loss and backward. Gradients are ready, weights untouched.
   Meanwhile, with ``durability = "wal"``, the batch is appended to the write-ahead log and fsynced
   on an I/O thread (:meth:`Trainer.encode`, :meth:`Trainer.log`), so the disk's latency hides
   behind the compute.
2. :meth:`Trainer.apply`, once both are done: ``optimizer.step()``. Only then are the batch's
   requests answered.

So an acknowledged example is in the log, and recovery replays logged micro-batches through the
same two phases in the same order, which reproduces the weights bit for bit on CPU. A logged
micro-batch may hold a request that breaks the model; ``prepare`` isolates it by a rule that
depends only on the batch (each request alone, then the good ones together), so replay makes the
same decision. Checkpoints (weights, optimizer state, the micro-batch they include, the counters
and the remembered idempotency answers) bound the replay and let old log segments go: those
before the oldest kept checkpoint. Without a WAL (``"checkpoint"``), a crash loses the steps since
the last checkpoint; ``"none"`` persists nothing.

Micro-batches are numbered by ``seq``, their position in the log. ``step`` counts optimizer
steps: a micro-batch whose every request was refused takes a seq (it was logged before that was
known) but no step.

A request with an idempotency key is applied once: its key goes into the micro-batch's log record,
and :meth:`Trainer.apply` remembers its answer (the newest ``train.idempotency_keys`` of them),
which replay rebuilds, so a retry after a restart finds it too (:meth:`Trainer.answered`).

What drives it on a server (queues, the WAL's thread, checkpoints' thread, answers) is
``train/pipeline.py``; what passes between the two is in ``train/batch.py``, and the shortcuts
through torch that the step takes are in ``train/fastpath.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from webtorch.config import TrainConfig
from webtorch.errors import ModelLoadError
from webtorch.metrics import TrainStats
from webtorch.serve.datatypes import to_torch
from webtorch.serve.model import LoadedModel, Tensors
from webtorch.serve.wire.tensors import InputData
from webtorch.train import checkpoint as ckpt
from webtorch.train.batch import (
    INPUT,
    TARGET,
    Answer,
    Batch,
    Prepared,
    StepResult,
    concatenate,
    from_record,
    load_answers,
    per_request,
    record_tensors,
    select,
)
from webtorch.train.fastpath import (
    GLOBAL_POST_HOOKS,
    GLOBAL_PRE_HOOKS,
    NUMPY_FLOATS,
    RUN_BACKWARD,
    bare_step,
    finite,
    profiler_enabled,
)
from webtorch.train.wal import WalCorrupt, WriteAheadLog, encode_record

if TYPE_CHECKING:
    from webtorch.train.pipeline import Host, TrainPipeline

log: Final = logging.getLogger("webtorch.train")

# Checkpoint metadata: the counters a restart must not lose, and the remembered answers.
STEPS_META: Final = "steps"
EXAMPLES_META: Final = "examples"
ANSWERS_META: Final = "idempotency"
# Characters of a remembered error answer: the answers go into checkpoint metadata, which
# safetensors caps at 100 MB (100,000 keys of 128 characters plus this fit well within it).
MAX_ERROR_KEPT: Final = 200


class Trainer:
    def __init__(
        self,
        model: LoadedModel,
        config: TrainConfig,
        state_dir: Path,
        stats: TrainStats | None = None,
    ) -> None:
        spec = model.spec
        if spec.loss is None or spec.optimizer is None:
            raise ModelLoadError(
                f"model {model.name}: training is enabled but {model.source} defines no "
                "`loss` and `optimizer`"
            )
        self.model = model
        self.config = config
        self.loss_fn: Callable[[Tensors, Tensors], torch.Tensor] = spec.loss
        self.optimizer = spec.optimizer(model.network.parameters())
        self._bare_step = bare_step(self.optimizer)
        self._parameters = tuple(p for p in model.network.parameters() if p.requires_grad)
        self._cpu = model.device.type == "cpu"
        # On CPU the autograd engine runs backward in the calling thread: see _gradients.
        self._run_backward = RUN_BACKWARD if self._cpu else None
        self._one = torch.ones(())  # d loss / d loss, for the engine
        # Hooks that run when a gradient is accumulated (registered by the model file, which
        # runs before this) need loss.backward(): see _gradients.
        self._accumulate = any(
            getattr(p, "_post_accumulate_grad_hooks", None) for p in self._parameters
        )
        modules = list(model.network.modules())
        overridden = any(type(m).train is not nn.Module.train for m in modules)
        self._plain_modules: list[nn.Module] | None = None if overridden else modules
        # ``seq``: the last micro-batch applied, i.e. the position in the WAL (a micro-batch whose
        # every request was refused still takes a seq: it was logged before that was known).
        # ``step``: the optimizer steps taken, what answers and the status show.
        self.seq = 0
        self.step = 0
        self._checkpoint_seq = 0  # the seq of the newest checkpoint
        # Idempotency keys of the latest keyed requests, oldest first, with their answers:
        # bounded by train.idempotency_keys, kept in checkpoints and rebuilt by WAL replay.
        self._answers: dict[str, Answer] = {}
        self._max_keys = config.idempotency_keys
        self.stats = stats if stats is not None else TrainStats()
        self.durability = config.durability
        self.state_dir = state_dir
        self.checkpoint_dir = state_dir / "checkpoints"
        self.wal = WriteAheadLog(state_dir / "wal") if self.durability == "wal" else None
        self._inputs = [(t.name, t.dtype) for t in model.inputs]
        # Where each tensor of a micro-batch comes from: (0: inputs, 1: targets), name, key.
        self._layout = [(0, t.name, INPUT + t.name, t) for t in model.inputs] + [
            (1, t.name, TARGET + t.name, t) for t in model.targets
        ]
        self._targets = [(t.name, t.dtype) for t in model.targets]
        self._outputs = [t.name for t in model.outputs]
        self._row_losses: Callable[[Tensors, Tensors], torch.Tensor] | None = vmap(self._row_loss)
        self._checkpointed_at = time.monotonic()
        self._next_seq = 1
        self.checkpointing = False

    def pipeline(self, host: Host) -> TrainPipeline:
        """What drives this trainer on ``host``, the model's executor. Built here so that the
        executor (serve/) never imports train/: it gets its trainer from the layer above."""
        from webtorch.train.pipeline import TrainPipeline

        return TrainPipeline(self, host)

    # -- start-up ----------------------------------------------------------------------------------

    def recover(self) -> None:
        """Load the newest valid checkpoint, then replay the WAL records after it, in order."""
        if self.durability == "none":
            return
        checkpoint = ckpt.load_latest(self.checkpoint_dir, set_aside=True)
        # The counters start from the checkpoint's (the stats object outlives a reload).
        self.stats.examples = self.stats.steps = self.stats.checkpoint_step = 0
        if checkpoint is not None:
            ckpt.apply(checkpoint, self.model.network, self.optimizer)
            self._restore(checkpoint)
            self.stats.checkpoint_time = checkpoint.path.stat().st_mtime
            log.info("model %s: checkpoint at step %d loaded", self.model.name, self.step)
        self._next_seq = self.seq + 1
        if self.wal is None:
            return
        replayed = 0
        try:
            records = self.wal.recover()
        except WalCorrupt as exc:
            raise ModelLoadError(
                f"model {self.model.name}: the write-ahead log is damaged ({exc}); acknowledged "
                "training would be lost by going on: restore it, or move it aside to start from "
                "the newest checkpoint"
            ) from exc
        for record in records:
            if record.seq <= self.seq:
                continue  # already in the checkpoint
            if record.seq != self.seq + 1:
                raise ModelLoadError(
                    f"model {self.model.name}: the WAL in {self.state_dir} starts at micro-batch "
                    f"{record.seq} but the newest usable checkpoint holds {self.seq}: "
                    "micro-batches in between are missing"
                )
            self.train_step(from_record(record.seq, record.tensors), replay=True)
            replayed += 1
        self._next_seq = self.seq + 1
        self.stats.replayed = replayed
        if replayed:
            log.info(
                "model %s: replayed %d step(s) from the WAL, now at step %d",
                self.model.name,
                replayed,
                self.step,
            )

    # -- the two phases --------------------------------------------------------------------------

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """The position, counters and remembered answers a checkpoint holds."""
        extra = checkpoint.extra
        try:
            # Checkpoints written before these entries existed: no refused micro-batches known.
            step = int(extra.get(STEPS_META, checkpoint.step))
            examples = int(extra.get(EXAMPLES_META, 0))
            answers = load_answers(extra.get(ANSWERS_META))
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"model {self.model.name}: checkpoint {checkpoint.path} has unreadable "
                f"counters: {exc}"
            ) from exc
        self.seq = self._checkpoint_seq = checkpoint.step
        self.step = self.stats.steps = self.stats.checkpoint_step = step
        self.stats.examples = examples
        self._answers = {}
        self._remember_all(answers)

    def answered(self, key: str) -> Answer | None:
        """The answer of an applied request with idempotency key ``key``, if remembered."""
        return self._answers.get(key)

    def batch(
        self,
        requests: Sequence[tuple[Mapping[str, InputData], Mapping[str, InputData]]],
        rows: list[int],
        keys: list[str | None] | None = None,
    ) -> Batch:
        """Concatenate requests' (inputs, targets) into the next micro-batch, numbered. Raises
        :class:`UncheckedRows` if some request's JSON rows are not all numbers (see
        ``forms.settle``); nothing is numbered then."""
        tensors = self.tensors(requests)
        seq = self._next_seq
        self._next_seq += 1
        return Batch(tensors, rows, seq, keys)

    def tensors(
        self, requests: Sequence[tuple[Mapping[str, InputData], Mapping[str, InputData]]]
    ) -> dict[str, np.ndarray]:
        """The micro-batch's tensors (what :meth:`batch` numbers), or what stops them forming
        (UncheckedRows; ValueError for arrays of shapes that do not concatenate)."""
        tensors: dict[str, np.ndarray] = {}
        for index, name, key, spec in self._layout:
            tensors[key] = concatenate([request[index][name] for request in requests], spec)
        return tensors

    def encode(self, batch: Batch) -> bytes:
        """The batch's WAL record, with each request's row count (loop thread: Python work stays
        off the I/O thread)."""
        return encode_record(batch.seq, record_tensors(batch))

    def log(self, records: Sequence[tuple[int, bytes]]) -> float:
        """Append records (seq, bytes) to the WAL and make them durable with one fsync (I/O
        thread). Returns the seconds it took (recorded by the caller, on the loop thread)."""
        assert self.wal is not None
        t0 = time.perf_counter()
        for seq, record in records:
            self.wal.append_encoded(seq, record)
        self.wal.sync()
        return time.perf_counter() - t0

    def train_step(self, batch: Batch, *, replay: bool = False) -> StepResult:
        """Both phases at once: what replay and the modes without a WAL do."""
        return self.apply(self.prepare(batch), replay=replay)

    def prepare(self, batch: Batch) -> Prepared:
        """Forward, loss and backward on ``batch`` (step ``batch.seq``), holding the model.

        A request that breaks the model (forward, loss or backward raises, or the loss or the
        gradients are not finite) is excluded by a deterministic rule: if the batch fails, each
        request is tried alone and the step is taken on the ones that pass; if each passes alone
        but not together, none is applied.
        """
        if batch.seq != self.seq + 1:
            raise RuntimeError(f"micro-batch {batch.seq} out of order: the model is at {self.seq}")
        started = time.perf_counter()
        rows = batch.rows
        count = len(rows)
        errors: list[str | None] = [None] * count
        try:
            good = list(range(count))
            losses = self._compute(batch.tensors, rows)
        except Exception as exc:
            good = []
            if count == 1:
                errors[0] = _describe(exc)
            else:
                for i in range(count):
                    try:
                        self._compute(select(batch.tensors, rows, [i]), [rows[i]])
                    except Exception as alone:
                        errors[i] = _describe(alone)
                    else:
                        good.append(i)
                if len(good) == count:
                    errors = [_describe(exc)] * count
                    good = []
            losses = (
                self._compute(select(batch.tensors, rows, good), [rows[i] for i in good])
                if good
                else []
            )
        return Prepared(batch, good, losses, errors, time.perf_counter() - started)

    def apply(self, prepared: Prepared, *, replay: bool = False) -> StepResult:
        """The optimizer step of a prepared batch. When no request was good there is nothing to
        step: ``seq`` (the WAL position) advances, ``step`` (optimizer steps) does not."""
        batch = prepared.batch
        if batch.seq != self.seq + 1:
            raise RuntimeError(f"micro-batch {batch.seq} out of order: the model is at {self.seq}")
        started = time.perf_counter()
        losses: list[float | None] = [None] * len(batch.rows)
        if prepared.good:
            self._optimizer_step()
            for i, value in zip(prepared.good, prepared.losses, strict=True):
                losses[i] = value
            self.stats.examples += sum(batch.rows[i] for i in prepared.good)
            self.step += 1
            self.stats.steps += 1
        self.seq = batch.seq
        if batch.keys is not None:
            self._remember(batch.keys, losses, prepared.errors)
        stats = self.stats
        stats.step_rows.record(sum(batch.rows))
        stats.step_seconds.record(prepared.seconds + time.perf_counter() - started)
        snapshot = None
        if not replay and self.checkpoint_due(time.monotonic()):
            snapshot = self.snapshot()
        return StepResult(self.step, losses, prepared.errors, snapshot)

    def _remember(
        self, keys: list[str | None], losses: list[float | None], errors: list[str | None]
    ) -> None:
        step = self.step
        self._remember_all(
            (key, (step, loss, None if error is None else error[:MAX_ERROR_KEPT]))
            for key, loss, error in zip(keys, losses, errors, strict=True)
            if key is not None
        )

    def _remember_all(self, answers: Iterable[tuple[str, Answer]]) -> None:
        """Remember answers by key, evicting the oldest beyond train.idempotency_keys."""
        remembered = self._answers
        limit = self._max_keys
        for key, answer in answers:
            if key in remembered:
                continue  # the first answer is the one a retry gets
            remembered[key] = answer
            if len(remembered) > limit:
                del remembered[next(iter(remembered))]

    def _optimizer_step(self) -> None:
        """``optimizer.step()``, without torch.optim's wrapper where it would do nothing: the
        wrapper opens a profiler scope and walks four hook tables, ~27 us of a ~60 us step of a
        small model between backward passes here (its code falls out of cache), ~0.5 us per
        request of a micro-batch. With a hook registered or the profiler on, the wrapper runs."""
        bare = self._bare_step
        optimizer = self.optimizer
        if (
            bare is None
            or "step" in optimizer.__dict__  # replaced on the instance (an LR scheduler's counter)
            or optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks
            or GLOBAL_PRE_HOOKS
            or GLOBAL_POST_HOOKS
            or profiler_enabled()
        ):
            optimizer.step()
        else:
            bare(optimizer)

    def _compute(self, tensors: Mapping[str, np.ndarray], rows: list[int]) -> list[float]:
        """Forward, loss and backward: gradients ready, weights untouched. Returns each
        request's own loss."""
        network = self.model.network
        inputs = self._tensors(tensors, INPUT, self._inputs)
        targets = self._tensors(tensors, TARGET, self._targets)
        spec = self.model.spec
        self._set_training(True)
        try:
            if spec.preprocess is not None:
                inputs = spec.preprocess(inputs)
            raw = network(*(inputs[name] for name, _ in self._inputs))
            outputs = self.model._name_outputs(raw)
            loss = self.loss_fn(outputs, targets)
            per_row = None
            if isinstance(loss, torch.Tensor) and loss.dim() == 1 and len(loss) == sum(rows):
                # One loss per row: the step minimises their mean, and each request's own loss
                # comes for free (a scalar loss costs a vmap call per step to get them).
                per_row = loss.detach()
                loss = loss.mean()
            elif not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("the model's loss must return a scalar or one value per row")
            value = float(loss.detach())
            if not math.isfinite(value):
                # One example with huge or invalid values would turn every weight into NaN:
                # refuse the step (here, or below for the gradients); train_step then finds the
                # example(s) to blame.
                raise FloatingPointError(f"the loss is {value}")
            self._gradients(loss)
        finally:
            self._set_training(False)
        self.stats.loss = value
        if len(rows) == 1:
            return [value]
        if per_row is not None:
            if self._cpu and per_row.dtype in NUMPY_FLOATS:
                return per_request(per_row.numpy(), rows)  # tolist() gives the same floats
            return per_request(per_row.double().cpu().numpy(), rows)
        with torch.no_grad():
            detached = {name: outputs[name].detach() for name in self._outputs if name in outputs}
            return self._request_losses(detached, targets, rows)

    def _gradients(self, loss: torch.Tensor) -> None:
        """Backward: each parameter's ``.grad`` set to its gradient (None where the loss does not
        reach it), or FloatingPointError, leaving them as they were, if any is not finite.

        ``torch.autograd.grad`` and assignment rather than ``zero_grad`` + ``loss.backward()``:
        the same gradients bit for bit (a gradient reaching a leaf once is what AccumulateGrad
        would store), for ~60 us less per step on a small model here (``backward``'s Python
        wrapper, ``zero_grad``'s profiler scope, and AccumulateGrad nodes), about 1 us per
        request of a micro-batch. Parameters with post-accumulate-grad hooks need AccumulateGrad
        to run: then ``backward`` it is.

        On CPU, the engine's ``run_backward`` directly, as ``torch.autograd.grad`` ends up
        calling it: the wrapper's argument normalisation, ``ones_like`` for the seed and a copy
        of the contextvars context stashed for device threads (which a CPU backward does not
        use) cost ~35 us of the ~170 us a small model's backward takes here.
        """
        parameters = self._parameters
        run_backward = self._run_backward
        if self._accumulate:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            grads: Sequence[torch.Tensor | None] = [p.grad for p in parameters]
            assign = False
        elif run_backward is not None:
            one = self._one
            if one.dtype is not loss.dtype or loss.dim() != 0:
                one = torch.ones_like(loss)
            # (outputs, their gradients, keep graph, create graph, inputs, allow unused,
            # accumulate into .grad)
            grads = run_backward((loss,), (one,), False, False, parameters, True, False)
            assign = True
        else:
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            assign = True
        present = [g for g in grads if g is not None]
        if present and not finite(present, self._cpu):
            raise FloatingPointError("the gradients are not finite")
        if assign:
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint_due(self, now: float) -> bool:
        if (
            self.durability == "none"
            or self.seq == self._checkpoint_seq
            or self.checkpointing  # one at a time: a snapshot of a large model is large
        ):
            return False
        cfg = self.config
        by_steps = (
            cfg.checkpoint_every_steps > 0
            and self.seq - self._checkpoint_seq >= cfg.checkpoint_every_steps
        )
        by_time = (
            cfg.checkpoint_every_seconds > 0
            and now - self._checkpointed_at >= cfg.checkpoint_every_seconds
        )
        return by_steps or by_time

    def unsaved(self) -> bool:
        """Whether micro-batches were applied since the newest checkpoint."""
        return self.seq != self._checkpoint_seq

    def snapshot(self) -> tuple[int, ckpt.Snapshot]:
        """A copy of the state at this micro-batch (model busy), with the counters and the
        remembered answers; written later by :meth:`write_checkpoint`."""
        self._checkpointed_at = time.monotonic()
        self._checkpoint_seq = self.seq  # no second snapshot of this micro-batch is due
        self.stats.checkpoint_step = self.step
        self.checkpointing = True  # until the executor has written it
        snap = ckpt.snapshot(self.model.network, self.optimizer)
        snap.extra[STEPS_META] = str(self.step)
        snap.extra[EXAMPLES_META] = str(self.stats.examples)
        if self._answers:
            snap.extra[ANSWERS_META] = json.dumps(
                [[key, *answer] for key, answer in self._answers.items()]
            )
        return self.seq, snap

    def write_checkpoint(self, seq: int, snap: ckpt.Snapshot) -> int:
        """Write a checkpoint atomically and prune old ones (checkpoint thread: a large model's
        checkpoint takes a while, and the WAL must not wait for it). Returns the micro-batch
        through which the WAL is no longer needed (for :meth:`forget_logged`)."""
        path = ckpt.write_checkpoint(self.checkpoint_dir, seq, snap, {"model": self.model.name})
        self.stats.checkpoint_time = time.time()
        ckpt.prune(self.checkpoint_dir, self.config.keep_checkpoints)
        log.debug("model %s: checkpoint %s", self.model.name, path)
        # Every kept checkpoint is a fallback should the newer ones be damaged, but only with
        # the log after it: the WAL is kept from the oldest one on. Until keep_checkpoints
        # exist, the fallback is the initial weights, and the whole log is kept.
        kept = ckpt.steps(self.checkpoint_dir)
        return kept[0] if len(kept) >= self.config.keep_checkpoints else 0

    def forget_logged(self, seq: int) -> list[Path]:
        """Let go of the WAL segments holding only micro-batches through ``seq`` (WAL thread);
        returns them for :func:`~webtorch.train.wal.delete_segments` (checkpoint thread)."""
        assert self.wal is not None
        self.wal.rotate()
        return self.wal.detach_through(seq)

    def discard_unapplied(self, seq: int) -> None:
        """Cut the micro-batches after ``seq`` from the WAL (WAL thread): training stopped with
        them logged but not applied, and their requests answered with an error."""
        if self.wal is not None:
            self.wal.discard_after(seq)

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "step": self.step,
            "examples": self.stats.examples,
            "loss": None if self.stats.loss != self.stats.loss else self.stats.loss,
            "durability": self.durability,
            "checkpoint_step": self.stats.checkpoint_step,
            "replayed_steps": self.stats.replayed,
        }

    def _set_training(self, mode: bool) -> None:
        """``network.train(mode)``, cheaply: Module.train walks the tree through Module's slow
        ``__setattr__`` (~10% of a small step). Flags are set directly unless some module
        overrides ``train`` itself (e.g. to keep batch norm frozen); then its override runs."""
        modules = self._plain_modules
        if modules is None:
            self.model.network.train(mode)
            return
        for module in modules:
            module.__dict__["training"] = mode

    # -- helpers -----------------------------------------------------------------------------------

    def _tensors(
        self, tensors: Mapping[str, np.ndarray], prefix: str, specs: list[tuple[str, Any]]
    ) -> Tensors:
        out: Tensors = {}
        device = self.model.device
        cpu = self._cpu  # device.type is a call into torch each time
        for name, dt in specs:
            tensor = to_torch(tensors[prefix + name], dt)
            out[name] = tensor if cpu else tensor.to(device, non_blocking=True)
        return out

    def _row_loss(self, outputs: Tensors, targets: Tensors) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in outputs.items()}
        return self.loss_fn(one, {k: v.unsqueeze(0) for k, v in targets.items()})

    def _request_losses(self, outputs: Tensors, targets: Tensors, rows: list[int]) -> list[float]:
        """Each request's loss on its own rows. One vectorised call (``vmap`` of the loss over
        rows, then a mean per request: exact for a loss that averages over rows) where the loss
        allows it, else one loss call per request."""
        if self._row_losses is not None:
            try:
                per_row = self._row_losses(outputs, targets).reshape(-1).double().cpu().numpy()
            except Exception as exc:  # a loss vmap cannot trace: .item(), data-dependent flow
                log.info("model %s: per-row loss not vectorisable (%r)", self.model.name, exc)
                self._row_losses = None
            else:
                return per_request(per_row, rows)
        losses: list[float] = []
        start = 0
        for count in rows:
            part = slice(start, start + count)
            sliced_out = {k: v[part] for k, v in outputs.items()}
            sliced_tgt = {k: v[part] for k, v in targets.items()}
            losses.append(float(self.loss_fn(sliced_out, sliced_tgt)))
            start += count
        return losses


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
