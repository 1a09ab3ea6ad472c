"""The configured pipelines: their files imported and checked against the config (at
construction, before any socket opens), then their runners and routes made on the loop.

``webtorch serve pipeline.toml --stages featurize`` serves only the named stages (their
``/v2/pipelines/{p}/stages/{s}/infer`` endpoints) and the models they need: a stage server.
Without ``--stages`` every stage runs here, except those whose settings name a ``remote``
upstream group: their batches go to that group's servers, through the ``remote`` placement
factory the app passes in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from webtorch.config import Config, PipelineConfig, StageConfig
from webtorch.errors import ConfigError
from webtorch.http.router import Route, Router
from webtorch.metrics import Metrics
from webtorch.pipeline.endpoint import PipelineEndpoint
from webtorch.pipeline.graph import Graph, GraphError
from webtorch.pipeline.models import ModelPlacement
from webtorch.pipeline.placement import PlacementFactory, StageSite, local
from webtorch.pipeline.runner import PipelineRunner, Runner, StageRunner
from webtorch.pipeline.served import ServedPipeline
from webtorch.pipeline.spec import PipelineLoadError, import_pipeline_file
from webtorch.serve.oip import Auth

if TYPE_CHECKING:
    from webtorch.serve.endpoint import ModelEndpoint

# Settings that shape a function stage's own queue and pool; a model stage has the model's.
_LOCAL_KEYS = {"placement", "workers", "max_batch", "max_delay", "max_queue"}


class Pipelines:
    def __init__(self, config: Config, metrics: Metrics, only: set[str] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.only = only
        self.served: dict[str, ServedPipeline] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        known: set[str] = set()
        for name, pc in config.pipelines.items():
            served = self._load(name, pc)
            known.update(served.graph.stages)
            self.served[name] = served
        if only is not None:
            unknown = sorted(only - known)
            if unknown:
                raise ConfigError(
                    f"--stages: no pipeline has stage(s) {', '.join(unknown)} "
                    f"(stages: {', '.join(sorted(known)) or 'none'})"
                )

    def _load(self, name: str, pc: PipelineConfig) -> ServedPipeline:
        where = f"pipelines.{name}"
        try:
            pipeline = import_pipeline_file(self.config.resolve(pc.path))
        except PipelineLoadError as exc:
            raise ConfigError(f"{where}.path: {exc}") from None
        try:
            graph = Graph(pipeline)
        except GraphError as exc:
            raise ConfigError(f"{where}: {self.config.resolve(pc.path)}: {exc}") from None
        for configured in pc.stages:
            if configured not in graph.stages:
                raise ConfigError(
                    f"{where}.stages.{configured}: the pipeline file defines no stage "
                    f"{configured!r} "
                    f"(stages: {', '.join(graph.stages)})"
                )
        here: set[str] = set()
        remote: set[str] = set()
        for stage_name, stage in graph.stages.items():
            settings = pc.stages.get(stage_name) or StageConfig()
            if stage.model is not None:
                if stage.model not in self.config.models:
                    raise ConfigError(
                        f"{where}: stage {stage_name!r} is model {stage.model!r}, which is not "
                        "in [models]"
                    )
                own = sorted(settings.model_fields_set & _LOCAL_KEYS)
                if own and settings.remote is None:
                    raise ConfigError(
                        f"{where}.stages.{stage_name}: {', '.join(own)}: a model stage batches "
                        f"and runs as [models.{stage.model}] says"
                    )
            if self.only is not None:
                if stage_name in self.only:
                    here.add(stage_name)
            elif settings.remote is not None:
                remote.add(stage_name)
            else:
                here.add(stage_name)
        return ServedPipeline(name, pc, pipeline, graph, here, remote)

    def needed_models(self) -> set[str]:
        """The models the stages served here go through."""
        return {
            stage.model
            for served in self.served.values()
            for name, stage in served.graph.stages.items()
            if stage.model is not None and name in served.here
        }

    # -- on the loop -----------------------------------------------------------------------------

    def install(
        self,
        loop: asyncio.AbstractEventLoop,
        router: Router,
        endpoints: Mapping[str, ModelEndpoint],
        auth: Auth,
        remote: PlacementFactory | None = None,
    ) -> None:
        """Make every pipeline's runner and add its routes (``remote``: the placement factory
        of stages placed on an upstream group)."""
        self._loop = loop
        for served in self.served.values():
            runners: dict[str, Runner] = {}
            for name in served.graph.order:  # in order: the metrics and dashboard list them so
                if name in served.here | served.remote:
                    runners[name] = self._runner(served, name, loop, endpoints, remote)
            served.runner = PipelineRunner(served.name, runners, loop, served.config.timeout)
            graph = served.graph
            if served.whole:
                served.plans["predict"] = graph.plan()
            for name in served.here:
                served.plans[f"stage:{name}"] = graph.stage_plan(name)
            limits = [served.config.max_records]
            limits += [r.max_batch for r in runners.values()]
            served.max_records = min(limits)
            endpoint = PipelineEndpoint(served, endpoints, auth)
            for path, handler in endpoint.routes():
                router.remove(path)
                router.add(Route(path, handler, path, check=endpoint.check))

    def _runner(
        self,
        served: ServedPipeline,
        name: str,
        loop: asyncio.AbstractEventLoop,
        endpoints: Mapping[str, ModelEndpoint],
        remote: PlacementFactory | None,
    ) -> Runner:
        stage = served.graph.stages[name]
        settings = served.settings(name)
        stats = self.metrics.stage(served.name, name)
        site = StageSite(
            served.name, self.config.resolve(served.config.path), stage, settings, stats, loop
        )
        if name in served.remote:
            if remote is None:
                raise ConfigError(
                    f"pipelines.{served.name}.stages.{name}.remote: remote placement is not "
                    "available in this build"
                )
            placement = remote(site)
        elif stage.model is not None:
            # The model's executor batches and queues too: this queue is only as deep as the
            # model's, and cut at its max_batch.
            model = ModelPlacement(stage, endpoints)
            executor = model.endpoint().executor
            return StageRunner(
                stage,
                model,
                stats,
                loop,
                max_batch=executor.scheduler.max_batch,
                max_queue=executor.scheduler.max_queue,
            )
        else:
            placement = local(site)
        return StageRunner(
            stage,
            placement,
            stats,
            loop,
            max_batch=settings.max_batch,
            max_delay=settings.max_delay,
            max_queue=settings.max_queue,
        )

    async def start(self) -> None:
        """Start every placement (process pools spawn their workers and import the file)."""
        for served in self.served.values():
            if served.runner is not None:
                await served.runner.start()

    async def close(self) -> None:
        for served in self.served.values():
            if served.runner is not None:
                await served.runner.close()
