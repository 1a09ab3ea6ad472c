"""``ctx.model(name)``: a model this server serves, for plugins. A prediction is one job on the
model's executor, batched with every other request to it (HTTP, pipelines, other plugins); a
train call is one train request through its trainer (WAL, checkpoints), as POST /train is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from webtorch.errors import ServiceUnavailable
from webtorch.http.messages import Response
from webtorch.plugins.calls import settle
from webtorch.plugins.context import ModelSource

if TYPE_CHECKING:  # torch comes with them: a server without models never loads it for plugins
    from webtorch.serve.endpoint import ModelEndpoint
    from webtorch.serve.model import TensorSpec
    from webtorch.serve.wire.tensors import InputData

_DONE = Response(200, b"")


class ModelAnswer(Exception):
    """The model answered with an error (its status and body): a full queue, a bad input."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"the model answered {status}: {body[:200]!r}")
        self.status = status


class ModelHandle:
    """One served model, as a plugin calls it."""

    def __init__(self, endpoint: ModelEndpoint) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name

    async def predict(self, inputs: Any) -> dict[str, np.ndarray]:
        """The model's outputs (name -> rows) for ``inputs``: rows of its one input, or a mapping
        of its input names to rows."""
        executor = self.endpoint.executor
        arrays = _arrays(inputs, self.endpoint.model.inputs, self.name)
        rows = len(next(iter(arrays.values())))
        kept: list[dict[str, np.ndarray]] = []

        def encode(outputs: dict[str, np.ndarray]) -> Response:
            kept.append(outputs)
            return _DONE

        response = await settle(executor.submit(arrays, rows, encode))
        if not kept:
            raise ModelAnswer(response.status, response.body)
        return kept[0]

    async def train(self, inputs: Any, targets: Any) -> float:
        """One train request (rows of inputs and targets) through the model's trainer: logged
        to its WAL, batched into a step with the others; the step's loss."""
        from webtorch.train.forms import TrainRequest

        model = self.endpoint.model
        arrays = _arrays(inputs, model.inputs, self.name)
        wanted = _arrays(targets, model.targets, self.name)
        rows = len(next(iter(arrays.values())))
        losses: list[float] = []

        def encode(request: TrainRequest, loss: float, step: int) -> Response:
            losses.append(loss)
            return _DONE

        job = self.endpoint.executor.submit_train(TrainRequest(arrays, wanted, rows), encode)
        response = await settle(job)
        if not losses:
            raise ModelAnswer(response.status, response.body)
        return losses[0]


def _arrays(data: Any, specs: list[TensorSpec], model: str) -> dict[str, InputData]:
    if not isinstance(data, Mapping):
        if len(specs) != 1:
            names = [s.name for s in specs]
            raise ValueError(f"model {model!r} takes {names}: pass a mapping of them")
        data = {specs[0].name: data}
    arrays: dict[str, InputData] = {}
    for spec in specs:
        if spec.name not in data:
            raise ValueError(f"model {model!r} takes {spec.name!r}")
        column = data[spec.name]
        if hasattr(column, "detach"):  # a torch tensor
            column = column.detach().cpu().numpy()
        arrays[spec.name] = np.ascontiguousarray(np.asarray(column, dtype=spec.dtype.numpy))
    return arrays


def model_source(endpoints: Mapping[str, ModelEndpoint]) -> ModelSource:
    """``ctx.model`` over the repository's endpoints (looked up per call: a reload or the
    repository API replaces them)."""

    def model(name: str) -> ModelHandle:
        endpoint = endpoints.get(name)
        if endpoint is None:
            raise ServiceUnavailable(f"model {name!r} is not loaded")
        return ModelHandle(endpoint)

    return model
