"""A learned plugin: a small torch model predicts each request's cost from its headers, the
expensive ones go to a dedicated upstream, and the model trains itself from what the requests
really cost (``log``): labels from outcomes (docs/PLUGINS.md).

The model is a served one (``cost_model.py`` as ``[models.cost]``, training enabled), so a
prediction is batched with every other request to it and every example goes through its
trainer's WAL: a restart resumes from what it learned.

    [models.cost]
    path = "examples/plugins/cost_model.py"
    [models.cost.train]
    enabled = true

    [[plugins]]
    path = "examples/plugins/learned_cost.py"
    routes = ["/api"]
    [plugins.settings]
    model = "cost"
    expensive_upstream = "127.0.0.1:9002"   # one of the route's upstream group
    threshold_ms = 200
    train_every = 1.0                        # seconds between training rounds (every())
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from webtorch.plugins import Context, Host, every
from webtorch.vocab import Upstream

FEATURES = 32  # cost_model.FEATURES
BATCH = 64  # examples per train request
KEPT = 4096  # examples waiting at most (the oldest go first)


def features(ctx: Context) -> list[float]:
    """The hashing trick over what is known before the request is sent: its method, the first
    two segments of its path, each header's name (and the value of a few), the body's size."""
    x = [0.0] * FEATURES
    tokens = [f"m:{ctx.method}"]
    segments = ctx.path.split("/")[1:3]
    tokens += [f"p{i}:{s}" for i, s in enumerate(segments)]
    for name, value in ctx.headers:
        tokens.append(f"h:{name.decode('latin-1')}")
        if name in (b"accept", b"x-report", b"content-type"):
            tokens.append(f"v:{name.decode('latin-1')}={value[:64].decode('latin-1')}")
    for token in tokens:
        x[1 + zlib.crc32(token.encode()) % (FEATURES - 1)] += 1.0
    length = ctx.request.body_length() or 0
    x[0] = math.log1p(length) / 10
    return x


class LearnedCost:
    def __init__(self) -> None:
        self.model = "cost"
        self.expensive = ""
        self.threshold = math.log1p(200.0)
        self.examples: list[tuple[list[float], float]] = []
        self.host: Host | None = None
        self.rounds = 0

    def startup(self, host: Host) -> None:
        settings = host.settings
        self.host = host
        self.model = str(settings.get("model", "cost"))
        self.expensive = str(settings["expensive_upstream"])
        self.threshold = math.log1p(float(settings.get("threshold_ms", 200)))
        host.model(self.model)  # fails the start now if the model is not served

    async def request(self, ctx: Context) -> None:
        x = features(ctx)
        outputs = await ctx.model(self.model).predict([x])
        ctx.state["cost_x"] = x
        ctx.state["cost_log_ms"] = float(outputs["y"][0, 0])

    def pick(self, ctx: Context, candidates: list[Upstream]) -> Any:
        predicted = ctx.state.get("cost_log_ms")
        if predicted is None:
            return None
        dedicated = [u for u in candidates if u.address == self.expensive]
        if predicted >= self.threshold:
            return dedicated[0] if dedicated else None
        others = [u for u in candidates if u.address != self.expensive]
        return others or None  # the dedicated one only when nothing else is left

    def log(self, ctx: Context) -> None:
        x = ctx.state.get("cost_x")
        if x is None or not ctx.upstream or ctx.status >= 500:
            return  # a failure's time says nothing about the cost of the request
        self.examples.append((x, math.log1p(ctx.seconds * 1000)))
        if len(self.examples) > KEPT:
            del self.examples[: len(self.examples) - KEPT]

    @every(1.0)
    async def train(self) -> None:
        """A round: what log gathered, a batch at a time, through the model's trainer."""
        assert self.host is not None
        model = self.host.model(self.model)
        while self.examples:
            batch, self.examples = self.examples[:BATCH], self.examples[BATCH:]
            await model.train([x for x, _ in batch], [[y] for _, y in batch])
        self.rounds += 1


plugin = LearnedCost()
