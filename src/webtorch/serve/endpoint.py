"""One served model's HTTP endpoint: decode a request, queue it on the model's executor, encode
its outputs (``oip.py`` routes requests here by model name)."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Final

from webtorch.errors import NotFound
from webtorch.http.messages import HandlerResult, Request, json_response
from webtorch.metrics import ModelStats
from webtorch.serve.executor import Executor
from webtorch.serve.model import LoadedModel
from webtorch.serve.oip import Auth, require_method
from webtorch.serve.wire.oip_json import OIPForm
from webtorch.serve.wire.short import ShortForm

if TYPE_CHECKING:  # the forms come from the model's training pipeline: no train/ import here
    from webtorch.serve.train_forward import RemoteTrainer
    from webtorch.train.forms import TrainForms, TrainRequest

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter


class ModelEndpoint:
    """One served model: decode a request, queue it on the executor, encode its outputs."""

    def __init__(
        self,
        model: LoadedModel,
        executor: Executor,
        stats: ModelStats,
        auth: Auth | None = None,
        remote: RemoteTrainer | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.stats = stats
        self.name = model.name
        self.version = model.spec.version
        self._inputs = {t.name: t for t in model.inputs}
        self._outputs = model.outputs
        self._record_decode = stats.stages["decode"].record
        self._short = ShortForm(
            model.inputs, model.outputs, model.name, max_rows=executor.scheduler.max_batch
        )
        self._oip = OIPForm(
            model.inputs,
            model.outputs,
            model.name,
            self.version,
            max_rows=executor.scheduler.max_batch,
        )
        self.auth = auth or Auth(None)
        # Another worker trains this model (server.workers > 1): train requests go there, once
        # this worker's gate let them through.
        self.remote = remote
        self.trainable = executor.trainer is not None or remote is not None
        training = executor.training
        self._train: TrainForms | None = None
        if self.trainable and training is not None:
            forms = training.forms()
            self._train = forms
            # Bound once: the pipeline answers a step's requests together when they share
            # one encoder, which it tells by identity.
            self._short_train = forms.encode_short_request
            self._short_batch = forms.encode_short_batch

    def predict(self, request: Request) -> HandlerResult:
        request.model = self.name  # for the access log
        if request.method != "POST":
            require_method(request, "POST")
        t0 = _clock()
        inputs, rows = self._short.decode(request.body, request.content_type)
        self._record_decode(_clock() - t0)
        return self.executor.submit(inputs, rows, self._short.encode, self._short)

    def infer(self, request: Request) -> HandlerResult:
        request.model = self.name
        if request.method != "POST":
            require_method(request, "POST")
        t0 = _clock()
        decoded = self._oip.decode(
            request.body, request.content_type, request.header(b"inference-header-content-length")
        )
        self._record_decode(_clock() - t0)
        return self.executor.submit(
            decoded.inputs, decoded.rows, functools.partial(self._oip.encode, decoded)
        )

    def check(self, request: Request) -> None:
        """Route.check of this model's predict, infer and train routes: what refuses a request
        before its body is read (the client waits for 100 Continue), as the handler would."""
        if request.path.endswith("/train"):
            self._train_gate(request, _OIP_TRAIN if request.path.startswith("/v2/") else _SHORT)
        elif request.method != "POST":
            require_method(request, "POST")

    def _train_gate(self, request: Request, methods: tuple[str, ...]) -> TrainForms | None:
        """What refuses a train request whatever its body, for the handlers and :meth:`check`
        alike: training off, then a POST's content type, sender and token (it changes the
        model: no cross-site sender), or another method's token and whether it is allowed."""
        forms = self._train
        if forms is None and self.remote is None:
            raise NotFound(
                f"model {self.name!r} does not accept training "
                f"(enable it with [models.{self.name}.train] enabled = true)"
            )
        if request.method == "POST":
            self.auth.check_change(request)
        else:
            self.auth.check(request)
            if request.method not in methods:
                require_method(request, *methods)
        return forms

    def train(self, request: Request) -> HandlerResult:
        """``POST /models/{m}/train`` (short form); ``GET`` answers the training status."""
        request.model = self.name
        forms = self._train_gate(request, _SHORT)
        if forms is None:
            assert self.remote is not None
            return self.remote.forward(request)
        if request.method != "POST":
            assert self.executor.trainer is not None
            return json_response(self.executor.trainer.status())
        decoded = _keyed(forms, forms.decode_short(request.body, request.content_type), request)
        return self.executor.submit_train(decoded, self._short_train, self._short_batch)

    def train_oip(self, request: Request) -> HandlerResult:
        request.model = self.name
        forms = self._train_gate(request, _OIP_TRAIN)
        if forms is None:
            assert self.remote is not None
            return self.remote.forward(request)
        decoded = forms.decode_oip(
            request.body, request.content_type, request.header(b"inference-header-content-length")
        )
        return self.executor.submit_train(_keyed(forms, decoded, request), forms.encode_oip)

    def metadata(self) -> dict[str, Any]:
        return self.model.metadata()


# The methods of the short-form train endpoint: POST trains, GET answers the training status;
# the OIP train endpoint only trains.
_SHORT: Final = ("POST", "GET")
_OIP_TRAIN: Final = ("POST",)


def _keyed(forms: TrainForms, decoded: TrainRequest, request: Request) -> TrainRequest:
    """``decoded`` with the request's Idempotency-Key (checked), if it has one."""
    key = request.header(b"idempotency-key")
    if key is not None:
        decoded.key = forms.idempotency_key(key)
    return decoded
