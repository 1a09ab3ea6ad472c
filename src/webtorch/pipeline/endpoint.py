"""A pipeline's HTTP endpoints (paths: ``config.pipeline_paths``):

- ``POST /pipelines/{p}/predict``: records as users have them (``wire.decode_records``),
  answered ``{"outputs": [...]}``;
- ``POST /v2/pipelines/{p}/infer``: Open Inference Protocol tensors in and out;
- ``POST /pipelines/{p}/train``: records and ``targets``: the records pass the stages that feed
  the pipeline's trainable model stage, then train that model through its training pipeline
  (WAL, Idempotency-Key, answered after the step), as ``POST /models/{m}/train`` would;
- ``POST /v2/pipelines/{p}/stages/{s}/infer``: one stage's batch in the stage wire form (what
  a remote stage's placement sends);
- ``GET /v2/pipelines/{p}``: the stages, what each takes and where each runs.

Every answer carries ``Server-Timing`` with each stage's time (runner.py adds it).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from webtorch.errors import BadRequest, NotFound, ServiceUnavailable
from webtorch.http.messages import HandlerResult, Pending, Request, Response, json_response
from webtorch.pipeline import wire
from webtorch.pipeline.batch import to_form
from webtorch.pipeline.runner import Call, ModelStage
from webtorch.pipeline.served import ServedPipeline, describe
from webtorch.serve.oip import Auth, require_method
from webtorch.serve.wire.tensors import strict_array
from webtorch.train.forms import TrainForms, TrainRequest, idempotency_key

if TYPE_CHECKING:
    from webtorch.serve.endpoint import ModelEndpoint


class PipelineEndpoint:
    def __init__(
        self, served: ServedPipeline, endpoints: Mapping[str, ModelEndpoint], auth: Auth
    ) -> None:
        assert served.runner is not None
        self.served = served
        self.name = served.name
        self.runner = served.runner
        self.endpoints = endpoints
        self.auth = auth
        self.limits = wire.Limits(served.max_records, served.config.max_record_bytes)
        graph = served.graph
        self._first = [s for s in graph.order if graph.inputs[s] == ("",)]
        # The first stages' form: what the request's rows are given as.
        self._takes = (
            "records" if all(graph.stages[s].takes == "records" for s in self._first) else "tensors"
        )
        # Training goes to the pipeline's model stage that trains (if one does).
        self._trained = [
            name
            for name in graph.order
            if graph.stages[name].model is not None and name in served.here | served.remote
        ]

    def routes(self) -> list[tuple[str, Callable[[Request], HandlerResult]]]:
        name = self.name
        routes: list[tuple[str, Callable[[Request], HandlerResult]]] = [
            (f"/v2/pipelines/{name}", self.metadata)
        ]
        if "predict" in self.served.plans:
            routes += [
                (f"/pipelines/{name}/predict", self.predict),
                (f"/v2/pipelines/{name}/infer", self.infer),
                (f"/pipelines/{name}/train", self.train),
            ]
        for stage in sorted(self.served.here):
            routes.append((f"/v2/pipelines/{name}/stages/{stage}/infer", self._stage(stage)))
        return routes

    def check(self, request: Request) -> None:
        """Route.check: what refuses a request before its body is read."""
        if request.path.endswith("/train"):
            self._train_stage(request)
        elif request.path == f"/v2/pipelines/{self.name}":
            require_method(request, "GET")
        else:
            require_method(request, "POST")

    def _call(self, request: Request, plan: str, value: Any, rows: int, finish: Any) -> Call:
        request.model = self.name  # the access log's model field: the pipeline served
        return self.runner.submit(self.served.plans[plan], value, rows, finish, request)

    def predict(self, request: Request) -> HandlerResult:
        require_method(request, "POST")
        records, _ = wire.decode_records(
            request.body, request.content_type, request.raw_content_type, self.limits
        )
        value = records if self._takes == "records" else to_form(records, "tensors")
        return self._call(request, "predict", value, len(records), _answer_records)

    def infer(self, request: Request) -> HandlerResult:
        require_method(request, "POST")
        header = request.header(b"inference-header-content-length")
        arrays, rows, req_id = wire.decode_oip_inputs(
            request.body,
            request.content_type,
            header,
            f"pipeline {self.name}",
            self.limits.max_records,
        )
        binary = header is not None

        def finish(call: Call, result: Any) -> Response:
            return wire.encode_oip(result, self.name, req_id, binary)

        return self._call(request, "predict", wire.oip_value(arrays, self._takes), rows, finish)

    def _stage(self, stage: str) -> Callable[[Request], HandlerResult]:
        plan = self.served.plans[f"stage:{stage}"]

        # A remote placement sends up to the stage's max_batch rows (the same file's settings),
        # which may exceed the pipeline's max_records, the bound on a user's request.
        max_rows = max(self.limits.max_records, self.runner.stages[stage].max_batch)

        def handler(request: Request) -> HandlerResult:
            require_method(request, "POST")
            request.model = self.name
            started = time.perf_counter()
            batch, rows = wire.decode_stage_batch(
                request.body, request.header(b"inference-header-content-length"), max_rows
            )
            decoded = time.perf_counter() - started
            answer = functools.partial(_answer_stage, decoded)
            return self.runner.submit(plan, batch, rows, answer, request, True)

        return handler

    def _train_stage(self, request: Request) -> tuple[ModelStage, TrainForms]:
        """The model stage a train request trains, after the checks any train request gets
        whatever its body (training on, CSRF, token)."""
        trained = []
        for name in self._trained:
            runner = self.runner.stages.get(name)
            if isinstance(runner, ModelStage):
                endpoint = self.endpoints.get(runner.model)
                if endpoint is not None and endpoint.executor.training is not None:
                    trained.append((runner, endpoint.executor.training.forms()))
        if len(trained) != 1:
            raise NotFound(
                f"pipeline {self.name!r} has "
                + ("no model stage that trains here" if not trained else "several that train")
                + " (enable it with [models.NAME.train] enabled = true)"
            )
        if request.method != "POST":
            self.auth.check(request)
            require_method(request, "POST")
        self.auth.check_change(request)
        return trained[0]

    def train(self, request: Request) -> HandlerResult:
        stage, forms = self._train_stage(request)
        records, targets = wire.decode_records(
            request.body, request.content_type, request.raw_content_type, self.limits, train=True
        )
        rows = len(records)
        endpoint = stage.endpoint()
        specs = endpoint.model.targets
        if len(specs) == 1:
            target_arrays = {specs[0].name: strict_array(specs[0], targets, "target")}
        elif isinstance(targets, dict):
            missing = [s.name for s in specs if s.name not in targets]
            if missing:
                raise BadRequest(f"targets need {', '.join(missing)}")
            target_arrays = {s.name: strict_array(s, targets[s.name], "target") for s in specs}
        else:
            raise BadRequest(f"targets: an object keyed by {', '.join(s.name for s in specs)}")
        for name, array in target_arrays.items():
            if len(array) != rows:
                raise BadRequest(f"{rows} records but {len(array)} rows of target {name!r}")
        raw_key = request.header(b"idempotency-key")
        key = idempotency_key(raw_key) if raw_key is not None else None
        plan_key = f"train:{stage.name}"
        plan = self.served.plans.get(plan_key)
        if plan is None:
            plan = self.served.plans[plan_key] = self.served.graph.feeding_plan(stage.name)

        def finish(call: Call, result: Any) -> Pending:
            live = stage.endpoint()
            inputs = stage.inputs(result, live)
            train_request = TrainRequest(dict(inputs), dict(target_arrays), rows)
            train_request.key = key
            if live.executor.training is None:
                raise ServiceUnavailable(f"model {stage.model!r} no longer trains")
            return live.executor.submit_train(train_request, forms.encode_short_request)

        value = records if self._takes == "records" else to_form(records, "tensors")
        request.model = self.name
        return self.runner.submit(plan, value, rows, finish, request)

    def metadata(self, request: Request) -> HandlerResult:
        require_method(request, "GET")
        return json_response(describe(self.served))


def _answer_records(call: Call, result: Any) -> Response:
    return wire.encode_records(to_form(result, "records"))


def _answer_stage(decoded: float, call: Call, result: Any) -> Response:
    # The wire's cost on this side too, for the caller's boundary timings (remote.py): its
    # batch decoded, its answer encoded; the stages' own entries are added by the runner.
    started = time.perf_counter()
    response = wire.stage_response(result)
    encoded = time.perf_counter() - started
    timing = b"decode;dur=%.3f, encode;dur=%.3f" % (decoded * 1000, encoded * 1000)
    response.headers = [*response.headers, (b"server-timing", timing)]
    return response
