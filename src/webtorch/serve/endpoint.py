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
    from webtorch.train.forms import TrainForms

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter


class ModelEndpoint:
    """One served model: decode a request, queue it on the executor, encode its outputs."""

    def __init__(
        self, model: LoadedModel, executor: Executor, stats: ModelStats, auth: Auth | None = None
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
        self.trainable = executor.trainer is not None
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
            self._train_forms(request)  # trains at all
            methods: tuple[str, ...] = ("POST",) if request.path.startswith("/v2/") else _SHORT
            if request.method == "POST":
                self.auth.check_change(request)  # content type, sender, token
            else:
                self.auth.check(request)
        else:
            methods = ("POST",)
        if request.method not in methods:
            require_method(request, *methods)

    def _train_forms(self, request: Request) -> TrainForms:
        if self._train is None:
            raise NotFound(
                f"model {self.name!r} does not accept training "
                f"(enable it with [models.{self.name}.train] enabled = true)"
            )
        return self._train

    def train(self, request: Request) -> HandlerResult:
        """``POST /models/{m}/train`` (short form); ``GET`` answers the training status."""
        request.model = self.name
        forms = self._train_forms(request)
        if request.method != "POST":
            self.auth.check(request)
            require_method(request, "POST", "GET")
            assert self.executor.trainer is not None
            return json_response(self.executor.trainer.status())
        self.auth.check_change(request)  # training changes the model: no cross-site sender
        decoded = forms.decode_short(request.body, request.content_type)
        key = request.header(b"idempotency-key")
        if key is not None:
            decoded.key = forms.idempotency_key(key)
        return self.executor.submit_train(decoded, self._short_train, self._short_batch)

    def train_oip(self, request: Request) -> HandlerResult:
        request.model = self.name
        forms = self._train_forms(request)
        if request.method != "POST":
            self.auth.check(request)
            require_method(request, "POST")
        self.auth.check_change(request)
        decoded = forms.decode_oip(
            request.body, request.content_type, request.header(b"inference-header-content-length")
        )
        key = request.header(b"idempotency-key")
        if key is not None:
            decoded.key = forms.idempotency_key(key)
        return self.executor.submit_train(decoded, forms.encode_oip)

    def metadata(self) -> dict[str, Any]:
        return self.model.metadata()


# The methods of the short-form train endpoint: POST trains, GET answers the training status.
_SHORT: Final = ("POST", "GET")
