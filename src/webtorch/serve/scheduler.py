"""Which work a model runs next, sans-IO: queues, the training step in flight and ``now`` in, one
decision out.

One executor per model serialises all work on it (``executor.py``); when the model is free it
asks :meth:`Scheduler.next` what to do and does exactly that. The scheduler holds the two queues
(:class:`BatchScheduler`: inference requests, and train requests cut into micro-batches) and the
priority between them; the training pipeline (``train/pipeline.py``) tells it where the step at
the head of its work stands. It never touches a clock, a loop or a thread, so every ordering rule
is tested with plain calls and a made-up ``now`` (tests/serve/test_scheduler.py).

The rules, in order:

1. A step computed and logged is applied first: finishing a step never waits for inference.
2. Training that can start (the next step of the group in flight, or a new group from the queue)
   goes before waiting inference under priority ``"fifo"`` when it is older, under
   ``"inference"`` never, except that training which yielded once to an inference batch goes
   next (it never starves), and when no inference waits at all.
3. A new group waits one more loop turn while its queue still grows below ``train.max_batch``
   (:meth:`BatchScheduler.growing`): the answers of the last step are coming back as new
   requests, and a step's torch cost hardly depends on its rows.
4. Otherwise inference: a batch if one is due; training, if ready, goes right after it.
5. Nothing due: a timer for inference's ``max_delay``, or idle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Generic, Literal, TypeVar

from webtorch.serve.batcher import BatchScheduler, Queued

J = TypeVar("J")  # an inference job
T = TypeVar("T")  # a train job
_E = TypeVar("_E")

Priority = Literal["inference", "fifo"]

# Where the training step at the head of the pipeline stands (the caller's answer to "what can
# training do with the model now?").
NO_STEP: Final = 0  # no group in flight (a new one may start from the queue)
HEAD_READY: Final = 1  # computed and logged: apply it
HEAD_WAITING: Final = 2  # neither computing nor computed: compute it
HEAD_BUSY: Final = 3  # computing, or computed and waiting for its log write

# Decisions.
IDLE: Final = 0  # nothing to do until something arrives
TIMER: Final = 1  # nothing now: ask again at :attr:`Scheduler.wake` (inference's max_delay)
INFER: Final = 2  # run the inference batch in :attr:`Scheduler.batch`
APPLY: Final = 3  # apply the head step (optimizer step, then answers)
PREPARE: Final = 4  # compute the head step's gradients
GROUP: Final = 5  # cut a new group of micro-batches from the train queue, log it, compute
AGAIN: Final = 6  # ask again on the next loop turn (the train queue grows; or inference waits
# for its max_delay while training need not)


class Scheduler(Generic[J, T]):
    """Decides the next piece of work on one model. Not thread-safe: the loop's."""

    def __init__(
        self,
        inference: BatchScheduler[J],
        training: BatchScheduler[T] | None = None,
        priority: Priority = "inference",
    ) -> None:
        self.inference = inference
        self.training = training
        self.priority = priority
        self.yielded = False  # training waited once for an inference batch: it goes next
        self.batch: list[Queued[J]] | None = None  # the batch of the last INFER
        self.wake = 0.0  # when to ask again after TIMER

    def next(self, now: float, head: int) -> int:
        """The next work, given where the head step stands (``NO_STEP``, ``HEAD_...``)."""
        self.batch = None
        if head == HEAD_READY:
            return APPLY
        training = self._training_ready(head)
        if training and self._train_first(head):
            self.yielded = False
            if head != NO_STEP:
                return PREPARE
            assert self.training is not None
            if self.training.growing():
                return AGAIN  # one more loop turn: its poll adds the train requests arriving
            return GROUP
        batch = self.inference.poll(now)
        if batch is None:
            if training:  # inference waits for its max_delay: training need not
                self.yielded = True
                return AGAIN
            wake = self.inference.wake_at()
            if wake is None:
                return IDLE
            self.wake = wake
            return TIMER
        if training:
            self.yielded = True
        self.batch = batch
        return INFER

    def _training_ready(self, head: int) -> bool:
        """Whether training can start work on the model now: computing the next step of the
        group in flight, or (none in flight) starting the next group."""
        if head != NO_STEP:
            return head == HEAD_WAITING
        queue = self.training
        return queue is not None and bool(len(queue))

    def _train_first(self, head: int) -> bool:
        """Whether a ready train step goes before waiting inference (see TrainConfig)."""
        inference = self.inference
        if not len(inference) or self.yielded:
            return True
        if self.priority == "inference":
            return False
        if head != NO_STEP:
            return True  # a step in flight is older than anything queued behind it
        assert self.training is not None
        return self.training.oldest() <= inference.oldest()

    def pending(self) -> bool:
        """Whether either queue holds anything."""
        training = self.training
        return bool(len(self.inference)) or (training is not None and bool(len(training)))


def shared(encoders: Iterator[_E | None]) -> _E | None:
    """The batch encoder all of a batch's jobs share; None if one has none or another."""
    first = next(encoders, None)
    if first is None:
        return None
    for encoder in encoders:
        if encoder is not first:
            return None
    return first


__all__ = ["Priority", "Scheduler", "shared"]
