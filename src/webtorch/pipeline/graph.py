"""A pipeline's stages as a graph, sans-IO: which stage takes whose rows, in which order, and,
for one request, which stages are ready once others are done. No event loop, no data: the
runner (``runner.py``) asks, and tests ask the same questions with nothing running.

A request's rows enter at the stages that take the request (the first stage, in a chain), go
from each stage to the stages that name it in ``after``, and the request is answered with the
rows of the pipeline's output stage. A :class:`Plan` is the part of the graph one kind of
request crosses: the whole pipeline (predict), one stage alone (a remote stage's endpoint), or
what feeds a model stage (training through the pipeline).
"""

from __future__ import annotations

import graphlib
from collections.abc import Iterable

from webtorch.pipeline.spec import Pipeline, Stage

REQUEST = ""  # the name of the request's own rows, as a stage input


class GraphError(ValueError):
    """The pipeline's stages do not form a graph that can run; the message names the stage."""


class Plan:
    """Stages one request crosses. ``inputs[s]``: the names whose rows make stage ``s``'s batch
    (REQUEST: the request's rows); ``joins[s]``: whether they are joined into ``{name: rows}``
    (a stage that names two or more) or taken as they are. ``result`` and ``result_join`` say
    what answers the request, the same way."""

    def __init__(
        self,
        stages: list[str],
        inputs: dict[str, tuple[str, ...]],
        joins: dict[str, bool],
        result: tuple[str, ...],
        result_join: bool,
    ) -> None:
        self.stages = stages  # in an order where each stage follows its inputs
        self.inputs = inputs
        self.joins = joins
        self.result = result
        self.result_join = result_join
        consumers: dict[str, list[str]] = {REQUEST: []}
        for name in stages:
            consumers.setdefault(name, [])
        for name in stages:
            for source in inputs[name]:
                consumers[source].append(name)
        self.consumers = {name: tuple(found) for name, found in consumers.items()}
        self._needs = {name: len(set(inputs[name])) for name in stages}

    def start(self) -> Progress:
        return Progress(self)


class Progress:
    """One request's way through a :class:`Plan`: tell it what is done, it says what is ready."""

    __slots__ = ("_left", "_waiting")

    def __init__(self, plan: Plan) -> None:
        self._waiting = dict(plan._needs)
        self._left = len(plan.stages)

    def done(self, plan: Plan, name: str) -> list[str]:
        """``name`` (REQUEST: the request arrived) has its rows: the stages now ready to run."""
        if name != REQUEST:
            self._left -= 1
        ready = []
        waiting = self._waiting
        for consumer in plan.consumers[name]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
        return ready

    @property
    def finished(self) -> bool:
        """Every stage of the plan is done (each one feeds the result)."""
        return self._left == 0


class Graph:
    """A pipeline's stages, checked: unique names, inputs that exist, no cycle, and every stage
    feeding the output."""

    def __init__(self, pipeline: Pipeline) -> None:
        stages: dict[str, Stage] = {}
        inputs: dict[str, tuple[str, ...]] = {}
        previous = REQUEST
        for stage in pipeline.stages:
            if stage.name in stages:
                raise GraphError(f"two stages are named {stage.name!r}")
            if "/" in stage.name or stage.name.strip() != stage.name:
                raise GraphError(f"stage name {stage.name!r}: no '/' or surrounding spaces")
            stages[stage.name] = stage
            inputs[stage.name] = stage.after if stage.after else (previous,)
            previous = stage.name
        for name, names in inputs.items():
            for source in names:
                if source == name:
                    raise GraphError(f"stage {name!r} takes its own rows")
                if source != REQUEST and source not in stages:
                    raise GraphError(
                        f"stage {name!r} takes from {source!r}, which is no stage "
                        f"(stages: {', '.join(stages)})"
                    )
            if len(set(names)) != len(names):
                raise GraphError(f"stage {name!r} names an input twice")
        sorter = graphlib.TopologicalSorter(
            {name: [s for s in names if s != REQUEST] for name, names in inputs.items()}
        )
        try:
            self.order = list(sorter.static_order())
        except graphlib.CycleError as exc:
            raise GraphError(f"the stages form a cycle: {' -> '.join(exc.args[1])}") from None
        if pipeline.output not in stages:
            raise GraphError(f"output {pipeline.output!r} is no stage")
        self.stages = stages
        self.inputs = inputs
        self.output = pipeline.output
        feeding = self.ancestors(self.output) | {self.output}
        idle = [name for name in self.order if name not in feeding]
        if idle:
            raise GraphError(
                f"stage(s) {', '.join(idle)} feed nothing that reaches the output "
                f"{self.output!r}: name them in a later stage's `after`, or remove them"
            )

    def ancestors(self, name: str) -> set[str]:
        """The stages whose rows reach ``name``."""
        found: set[str] = set()
        todo = [s for s in self.inputs[name] if s != REQUEST]
        while todo:
            source = todo.pop()
            if source not in found:
                found.add(source)
                todo.extend(s for s in self.inputs[source] if s != REQUEST)
        return found

    def _joined(self, name: str) -> bool:
        return len(self.inputs[name]) > 1

    def plan(self) -> Plan:
        """The whole pipeline: the request's rows in, the output stage's rows out."""
        return self._plan(self.order, (self.output,), False)

    def stage_plan(self, name: str) -> Plan:
        """``name`` alone, the request bringing its batch as the stage takes it (a join's as
        ``{name: rows}``): what a remote stage's server runs."""
        return Plan([name], {name: (REQUEST,)}, {name: False}, (name,), False)

    def feeding_plan(self, name: str) -> Plan:
        """What feeds ``name`` (a model stage, trained through the pipeline): its ancestors, and
        as the result the batch ``name`` would get."""
        needed = self.ancestors(name)
        return self._plan(
            [s for s in self.order if s in needed], self.inputs[name], self._joined(name)
        )

    def _plan(self, stages: Iterable[str], result: tuple[str, ...], join: bool) -> Plan:
        order = list(stages)
        return Plan(
            order,
            {name: self.inputs[name] for name in order},
            {name: self._joined(name) for name in order},
            result,
            join,
        )
