"""One configured pipeline as this server serves it, and its description (``GET
/v2/pipelines/{p}``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from webtorch.config import PipelineConfig, StageConfig
from webtorch.pipeline.graph import REQUEST, Graph, Plan
from webtorch.pipeline.runner import PipelineRunner, StageRunner
from webtorch.pipeline.spec import Pipeline


@dataclass
class ServedPipeline:
    """One pipeline: its file's stages, their graph and settings, and (once started) its
    runner and plans."""

    name: str
    config: PipelineConfig
    pipeline: Pipeline
    graph: Graph
    here: set[str]  # stages that run on this server
    remote: set[str]  # stages whose batches go to a remote group
    runner: PipelineRunner | None = None
    plans: dict[str, Plan] = field(default_factory=dict)
    max_records: int = 0

    @property
    def whole(self) -> bool:
        """Every stage runs here or remotely: the pipeline's own endpoints are served."""
        return self.here | self.remote == set(self.graph.stages)

    def settings(self, stage: str) -> StageConfig:
        return self.config.stages.get(stage) or StageConfig()


def describe(served: ServedPipeline) -> dict[str, Any]:
    """``GET /v2/pipelines/{p}``: the stages, what each takes, where each runs."""
    stages = []
    runners = served.runner.stages if served.runner is not None else {}
    for name in served.graph.order:
        stage = served.graph.stages[name]
        settings = served.settings(name)
        entry: dict[str, Any] = {
            "name": name,
            "kind": "model" if stage.model is not None else "function",
            "takes": stage.takes,
            "after": ["request" if s == REQUEST else s for s in served.graph.inputs[name]],
        }
        if stage.model is not None:
            entry["model"] = stage.model
        runner = runners.get(name)
        if name in served.remote:
            entry["runs"] = "remote"
            entry["remote"] = settings.remote
        elif name in served.here:
            entry["runs"] = "here"
        else:
            entry["runs"] = "elsewhere"
        if isinstance(runner, StageRunner):
            entry.update(runner.placement.describe())
            entry["max_batch"] = runner.max_batch
            entry["max_delay"] = runner.queue.max_delay
        stages.append(entry)
    return {
        "name": served.name,
        "output": served.graph.output,
        "max_records": served.max_records,
        "stages": stages,
    }
