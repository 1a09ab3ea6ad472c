"""The pipeline graph, sans-IO: order, plans and a request's progress, with nothing running."""

from __future__ import annotations

import pytest

import webtorch
from webtorch.pipeline.graph import REQUEST, Graph, GraphError
from webtorch.pipeline.spec import Pipeline, Stage, model_stage, stage


def fn(batch: object) -> object:
    return batch


def chain(*names: str) -> Pipeline:
    return Pipeline([Stage(n, fn) for n in names])


def test_the_user_api_is_exported_lazily_from_webtorch() -> None:
    assert webtorch.stage is stage and webtorch.model_stage is model_stage
    assert webtorch.Pipeline is Pipeline and webtorch.Stage is Stage
    assert webtorch.Reject("x") == webtorch.Reject("x")


def test_a_chain_runs_in_order_each_stage_taking_the_previous() -> None:
    graph = Graph(chain("a", "b", "c"))
    assert graph.order == ["a", "b", "c"]
    assert graph.inputs == {"a": (REQUEST,), "b": ("a",), "c": ("b",)}
    assert graph.output == "c"


def test_decorator_forms_and_plain_functions() -> None:
    @stage(takes="tensors", name="scaled")
    def scale(batch: object) -> object:
        return batch

    pipeline = Pipeline([fn, scale, model_stage("net")])
    assert [s.name for s in pipeline.stages] == ["fn", "scaled", "net"]
    assert pipeline.stages[1].takes == "tensors"
    assert pipeline.stages[2].model == "net" and pipeline.stages[2].fn is None
    assert scale([1]) == [1]  # a decorated stage stays callable


def test_progress_through_a_fan_out_and_join() -> None:
    pipeline = Pipeline(
        [
            Stage("clean", fn),
            Stage("left", fn, after=("clean",)),
            Stage("right", fn, after=("clean",)),
            Stage("join", fn, after=("left", "right")),
        ]
    )
    graph = Graph(pipeline)
    plan = graph.plan()
    assert plan.joins["join"] and not plan.joins["left"]
    progress = plan.start()
    assert progress.done(plan, REQUEST) == ["clean"]
    assert sorted(progress.done(plan, "clean")) == ["left", "right"]
    assert progress.done(plan, "right") == []  # the join waits for both
    assert progress.done(plan, "left") == ["join"]
    assert not progress.finished
    assert progress.done(plan, "join") == []
    assert progress.finished


def test_stage_and_feeding_plans() -> None:
    graph = Graph(Pipeline([Stage("clean", fn), Stage("feat", fn), model_stage("net")]))
    alone = graph.stage_plan("feat")
    assert alone.stages == ["feat"] and alone.inputs == {"feat": (REQUEST,)}
    feeding = graph.feeding_plan("net")
    assert feeding.stages == ["clean", "feat"] and feeding.result == ("feat",)
    first = Graph(Pipeline([model_stage("net"), Stage("label", fn)])).feeding_plan("net")
    assert first.stages == [] and first.result == (REQUEST,)
    assert first.start().finished  # nothing to run: the request's rows train the model


@pytest.mark.parametrize(
    ("stages", "output", "message"),
    [
        ([Stage("a", fn), Stage("a", fn)], None, "two stages are named 'a'"),
        ([Stage("a", fn, after=("zz",))], None, "takes from 'zz', which is no stage"),
        ([Stage("a", fn, after=("b",)), Stage("b", fn, after=("a",))], None, "cycle"),
        ([Stage("a", fn, after=("a",))], None, "takes its own rows"),
        ([Stage("a", fn), Stage("b", fn)], "a", "stage(s) b feed nothing"),
        ([Stage("a", fn)], "nope", "output 'nope' is no stage"),
        ([Stage("a/b", fn)], None, "no '/'"),
    ],
)
def test_graph_errors_name_the_stage(stages: list[Stage], output: str | None, message: str) -> None:
    with pytest.raises(GraphError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Graph(Pipeline(stages, output=output))


def test_stage_definition_errors() -> None:
    with pytest.raises(ValueError, match="takes must be"):
        Stage("a", fn, takes="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a function or a model"):
        Stage("a")
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([])
