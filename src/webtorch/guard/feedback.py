"""Online adaptation: operators label requests the guard saw, and the detector learns from them.

``POST /guard/feedback`` (a management endpoint: on with ``server.management``, token-protected
when a token is set) takes labels of recent requests by their request id (``X-Request-Id``, as
the access log shows it)::

    {"labels": [{"request_id": "8534...01", "label": "attack"},
                {"request_id": "8534...02", "label": "benign"}]}

The guard remembers the last ``REMEMBERED`` requests it scored (their parts, cut to what the
detector reads, and their client's history then), so a label needs no copy of the request. Once
``batch`` labels are pending, a fine-tuning round runs in a worker thread, off the event loop:
a copy of the network trains for a few passes over the labelled requests mixed with recent
requests the detector was confidently sure were benign (so that correcting one false positive
does not teach it that everything is benign, nor one miss that everything is an attack); the
event loop then swaps the new weights in. The adapted weights are saved (safetensors) and are
what a restart loads.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from webtorch.errors import BadRequest
from webtorch.files import write_private
from webtorch.guard.detector import GuardNet, load_net, save
from webtorch.guard.features import BODY_PREFIX, RequestView
from webtorch.guard.scorer import Scorer

log = logging.getLogger("webtorch.guard")

REMEMBERED = 10_000  # recent scored requests that can be labelled
# A request whose target and headers are larger than this is not remembered (it cannot be
# labelled): REMEMBERED of them stay within REMEMBERED x this many bytes, whatever clients send.
REMEMBER_LIMIT = 8 * 1024
CALM = 0.05  # a remembered request scored below this on both heads counts as benign
LABELS = {"attack": 1.0, "benign": 0.0}


@dataclass(frozen=True, slots=True)
class Seen:
    view: RequestView
    client: tuple[float, ...]
    score: float


class Feedback:
    """Remembers scored requests; collects labels; fine-tunes the detector in the background."""

    def __init__(
        self,
        scorer: Scorer,
        weights: Path,
        save_to: Path,
        batch: int = 8,
        epochs: int = 60,
        learning_rate: float = 3e-3,
        seed: int = 0,
    ) -> None:
        self.scorer = scorer
        self.weights = weights  # the network the first round starts from
        self.save_to = save_to
        self.batch = batch
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.rng = random.Random(seed)
        self.seen: OrderedDict[bytes, Seen] = OrderedDict()
        self.pending: list[tuple[Seen, float]] = []
        self.labelled: list[tuple[Seen, float]] = []  # every label so far: each round replays all
        self.rounds = 0
        self.training = False
        self._net: GuardNet | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the request path ---------------------------------------------------------------------

    def remember(
        self, request_id: bytes, view: RequestView, client: list[float], score: float
    ) -> None:
        if not request_id:
            return
        size = len(view.path) + len(view.query) + sum(len(n) + len(v) for n, v in view.headers)
        if size > REMEMBER_LIMIT:
            return
        if len(view.body) > BODY_PREFIX:
            # Keep what the detector reads, not a whole upload.
            view = RequestView(
                view.method, view.path, view.query, view.headers, view.body[:BODY_PREFIX]
            )
        seen = self.seen
        seen[request_id] = Seen(view, tuple(client), score)
        if len(seen) > REMEMBERED:
            seen.popitem(last=False)

    # -- the endpoint -------------------------------------------------------------------------

    def label(self, body: bytes) -> dict[str, Any]:
        """Parse and queue labels; start a round when enough are pending. Unknown ids are
        reported, not fatal: the request may have been forgotten already."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"feedback must be JSON: {exc}") from None
        labels = doc.get("labels") if isinstance(doc, dict) else None
        if not isinstance(labels, list) or not labels:
            raise BadRequest('feedback needs {"labels": [{"request_id": ..., "label": ...}]}')
        accepted, unknown = 0, []
        for i, item in enumerate(labels):
            if not isinstance(item, dict):
                raise BadRequest(f"labels[{i}]: expected an object")
            rid, label = item.get("request_id"), item.get("label")
            if not isinstance(rid, str) or not rid:
                raise BadRequest(f"labels[{i}].request_id: expected a request id string")
            if label not in LABELS:
                raise BadRequest(f"labels[{i}].label: expected one of {sorted(LABELS)}")
            seen = self.seen.get(rid.encode("latin-1", "replace"))
            if seen is None:
                unknown.append(rid)
                continue
            self.pending.append((seen, LABELS[label]))
            accepted += 1
        started = self.maybe_train()
        return {
            "accepted": accepted,
            "unknown": unknown,
            "pending": len(self.pending),
            "training": self.training,
            "started_round": started,
            "rounds": self.rounds,
        }

    # -- adaptation ---------------------------------------------------------------------------

    def maybe_train(self) -> bool:
        if self.training or len(self.pending) < self.batch:
            return False
        self.labelled += self.pending
        self.pending = []
        calm = [s for s in self.seen.values() if s.score < CALM]
        replay = self.rng.sample(calm, min(len(calm), 4 * len(self.labelled)))
        self.training = True
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="webtorch-guard-train")
        future = loop.run_in_executor(self._pool, self._fit, list(self.labelled), replay)
        self._task = asyncio.ensure_future(self._swap(future))
        return True

    def _fit(
        self, labelled: Sequence[tuple[Seen, float]], replay: Sequence[Seen]
    ) -> dict[str, Any]:
        """Runs in the worker thread: torch, away from the event loop."""
        from webtorch.guard.train import Example, encode_all, fit

        net = self._net if self._net is not None else load_net(self.weights)
        # The labels are the injection head's (it reads content, not client history).
        examples = [Example(s.view, s.client, y, 0.0) for s, y in labelled]
        examples += [Example(s.view, s.client, 0.0, 0.0) for s in replay]
        # The labelled requests count as much as the replay together: a label is a correction.
        weight = max(1, len(replay) // max(len(labelled), 1))
        data = encode_all(examples[: len(labelled)]) * weight + encode_all(
            examples[len(labelled) :]
        )
        net = fit(
            data, net, epochs=self.epochs, batch_size=16, lr=self.learning_rate, seed=self.rounds
        )
        self._net = net
        meta = {"rounds": str(self.rounds + 1), "labels": str(len(labelled))}
        # 0600 in a 0700 directory: the weights are learned from the requests clients sent.
        write_private(self.save_to, lambda temp: save(net, temp, meta))
        return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}

    async def _swap(self, future: asyncio.Future[dict[str, Any]]) -> None:
        try:
            weights = await future
        except Exception:
            log.exception("guard: adapting the detector failed; the old weights stay")
        else:
            self.scorer.load(weights)
            self.rounds += 1
            log.info(
                "guard: detector adapted from %d labels (round %d)", len(self.labelled), self.rounds
            )
        finally:
            self.training = False
            self._task = None
        self.maybe_train()

    async def wait(self) -> None:
        """Until the current round (if any) is done: for tests and shutdown."""
        while self._task is not None:
            await self._task

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
