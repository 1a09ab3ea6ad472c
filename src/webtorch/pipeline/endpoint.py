"""A pipeline's HTTP endpoints (paths: ``config.pipeline_paths``):

- ``POST /pipelines/{p}/predict``: records as users have them (``wire.decode_records``),
  answered ``{"outputs": [...]}``;
- ``POST /v2/pipelines/{p}/infer``: Open Inference Protocol tensors in and out;
- ``POST /pipelines/{p}/train``: records and ``targets``: the records pass the stages that feed
  the pipeline's trainable model stage, then train that model through its training pipeline
  (WAL, Idempotency-Key, answered after the step), as ``POST /models/{m}/train`` would;
- ``POST /v2/pipelines/{p}/train``: the same in OIP form (``inputs`` as for infer, ``targets``
  named like the model's);
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

import numpy as np

from webtorch.errors import BadRequest, NotFound, ServiceUnavailable
from webtorch.http.messages import HandlerResult, Pending, Request, Response, json_response
from webtorch.pipeline import wire
from webtorch.pipeline.batch import StageError, to_form
from webtorch.pipeline.models import ModelPlacement
from webtorch.pipeline.runner import Call
from webtorch.pipeline.served import ServedPipeline, describe
from webtorch.serve.oip import Auth, require_method
from webtorch.serve.train_forward import RemoteTrainer
from webtorch.serve.wire.oip_json import oip_document, oip_tensors, request_id
from webtorch.serve.wire.tensors import strict_array
from webtorch.train.forms import TrainForms, TrainRequest, idempotency_key

if TYPE_CHECKING:
    from webtorch.serve.endpoint import ModelEndpoint
    from webtorch.train.pipeline import TrainEncoder


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
                (f"/v2/pipelines/{name}/train", self.train_oip),
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

    def _call(self, request: Request, plan: str, value: Any, rows: int, finish: Any) -> Pending:
        request.model = self.name  # the access log's model field: the pipeline served
        return self.runner.submit(self.served.plans[plan], value, rows, finish, request).pending

    def predict(self, request: Request) -> HandlerResult:
        require_method(request, "POST")
        records, _ = wire.decode_records(
            request.body, request.content_type, request.raw_content_type, self.limits
        )
        value = records if self._takes == "records" else self._columns(records)
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
        # A caller's batch is the stage's: up to its max_batch rows (not max_records).
        max_rows = self.runner.stages[stage].max_batch

        def handler(request: Request) -> HandlerResult:
            require_method(request, "POST")
            request.model = self.name
            started = time.perf_counter()
            batch, rows = wire.decode_stage_batch(
                request.body, request.header(b"inference-header-content-length"), max_rows
            )
            decoded = time.perf_counter() - started
            answer = functools.partial(_answer_stage, decoded)
            return self.runner.submit(plan, batch, rows, answer, request, True).pending

        return handler

    def _train_stage(self, request: Request) -> tuple[ModelPlacement, TrainForms] | RemoteTrainer:
        """The model stage a train request trains, after the checks any train request gets
        whatever its body (training on, CSRF, token); or, when another worker trains that model
        (``server.workers > 1``), the way to that worker, which serves the whole request: it
        runs the same stages up to the model, so cleaning and featurizing stay with the WAL
        that logs their output."""
        trained: list[tuple[ModelPlacement, TrainForms]] = []
        elsewhere: list[RemoteTrainer] = []
        for name in self._trained:
            runner = self.runner.stages.get(name)
            model = runner.placement if runner is not None else None
            if isinstance(model, ModelPlacement):
                endpoint = self.endpoints.get(model.model)
                if endpoint is not None and endpoint.executor.training is not None:
                    trained.append((model, endpoint.executor.training.forms()))
                elif endpoint is not None and endpoint.remote is not None:
                    elsewhere.append(endpoint.remote)
        if len(trained) + len(elsewhere) != 1:
            raise NotFound(
                f"pipeline {self.name!r} has "
                + ("no model stage that trains here" if not trained else "several that train")
                + " (enable it with [models.NAME.train] enabled = true)"
            )
        if request.method != "POST":
            self.auth.check(request)
            require_method(request, "POST")
        self.auth.check_change(request)
        return trained[0] if trained else elsewhere[0]

    def train(self, request: Request) -> HandlerResult:
        """``POST /pipelines/{p}/train``: records and ``targets`` (JSON numbers), answered
        ``{"loss", "step"}`` as ``/models/{m}/train`` is."""
        found = self._train_stage(request)
        if isinstance(found, RemoteTrainer):
            return found.forward(request)
        stage, forms = found
        records, targets = wire.decode_records(
            request.body, request.content_type, request.raw_content_type, self.limits, train=True
        )
        specs = stage.endpoint().model.targets
        if len(specs) == 1:
            target_arrays = {specs[0].name: strict_array(specs[0], targets, "target")}
        elif isinstance(targets, dict):
            missing = [s.name for s in specs if s.name not in targets]
            if missing:
                raise BadRequest(f"targets need {', '.join(missing)}")
            target_arrays = {s.name: strict_array(s, targets[s.name], "target") for s in specs}
        else:
            raise BadRequest(f"targets: an object keyed by {', '.join(s.name for s in specs)}")
        value = records if self._takes == "records" else self._columns(records)
        return self._train(
            request, stage, value, len(records), target_arrays, None, forms.encode_short_request
        )

    def train_oip(self, request: Request) -> HandlerResult:
        """``POST /v2/pipelines/{p}/train``: ``inputs`` as for infer (BYTES elements: raw
        records), ``targets`` named like the model's (JSON or binary data, after the inputs')."""
        found = self._train_stage(request)
        if isinstance(found, RemoteTrainer):
            return found.forward(request)
        stage, _ = found
        header = request.header(b"inference-header-content-length")
        body = request.body
        doc, offset = oip_document(body, request.content_type, header)
        req_id = request_id(doc)
        binary = header is not None
        max_rows = self.limits.max_records
        arrays, rows, offset = wire.oip_arrays(
            doc, "inputs", body, offset, binary, f"pipeline {self.name}", max_rows
        )
        specs = {t.name: t for t in stage.endpoint().model.targets}
        targets, offset = oip_tensors(
            doc, "targets", specs, stage.model, body, offset, binary, max_rows
        )
        wire.claimed(body, offset)
        missing = [name for name in specs if name not in targets]
        if missing:
            raise BadRequest(f"targets need {', '.join(missing)}")
        head = {"pipeline_name": self.name, "model_name": stage.model}

        def encode(train_request: TrainRequest, loss: float, step: int) -> Response:
            answer: dict[str, Any] = {**head, "loss": loss, "step": step}
            if req_id is not None:
                answer["id"] = req_id
            return json_response(answer)

        value = wire.oip_value(arrays, self._takes)
        return self._train(request, stage, value, rows, dict(targets), req_id, encode)

    def _train(
        self,
        request: Request,
        stage: ModelPlacement,
        value: Any,
        rows: int,
        targets: dict[str, np.ndarray],
        req_id: str | None,
        encode: TrainEncoder,
    ) -> HandlerResult:
        """Run the records through the stages that feed ``stage``'s model, then train it
        through its training pipeline (WAL, idempotency, answered after the step)."""
        for name, array in targets.items():
            if len(array) != rows:
                raise BadRequest(f"{rows} records but {len(array)} rows of target {name!r}")
        raw_key = request.header(b"idempotency-key")
        key = idempotency_key(raw_key) if raw_key is not None else None
        plan_key = f"train:{stage.name}"
        plan = self.served.plans.get(plan_key)
        if plan is None:
            plan = self.served.plans[plan_key] = self.served.graph.feeding_plan(stage.name)
        native = {
            name: np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
            for name, array in targets.items()
        }

        def finish(call: Call, result: Any) -> Pending:
            live = stage.endpoint()
            inputs = stage.inputs(result, live)
            train_request = TrainRequest(dict(inputs), dict(native), rows, req_id)
            train_request.key = key
            if live.executor.training is None:
                raise ServiceUnavailable(f"model {stage.model!r} no longer trains")
            return live.executor.submit_train(train_request, encode)

        request.model = self.name
        return self.runner.submit(plan, value, rows, finish, request).pending

    def _columns(self, records: list[Any]) -> Any:
        """Records as the first stage's tensors; 400 naming why they are not."""
        try:
            return to_form(records, "tensors")
        except StageError as exc:
            raise BadRequest(f"the records cannot be the first stage's tensors: {exc}") from None

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
