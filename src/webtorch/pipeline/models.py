"""A model stage's placement: its batches go to the model's executor as one job each.

The stage batches like any other (its queue, cut at the model's ``max_batch``), and each batch
is one job on the model's executor, which merges it with the model's other work (direct
requests, other pipelines) and serialises it with training: the model's dynamic batching,
training priority and WAL are the model's. The executor answers a job through its encoder; the
encoder here keeps the output rows instead of encoding a response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import orjson

from webtorch.errors import HTTPError, ServiceUnavailable
from webtorch.http.messages import Response
from webtorch.pipeline.batch import Joined, StageError, rows_of, to_form
from webtorch.pipeline.placement import Done
from webtorch.pipeline.spec import Stage
from webtorch.serve.wire.tensors import InputData

if TYPE_CHECKING:
    from webtorch.serve.endpoint import ModelEndpoint


class ModelAnswer(HTTPError):
    """The executor answered a batch with an error (its status and message, e.g. 422 when
    the model raised on an input, 503 when its queue is full)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ModelPlacement:
    """Runs a model stage's batches on the model's executor (one job per batch)."""

    kind = "model"
    concurrency = 1  # while the executor runs a batch, the stage's next one gathers here

    def __init__(self, stage: Stage, endpoints: Mapping[str, ModelEndpoint]) -> None:
        assert stage.model is not None
        self.name = stage.name
        self.model = stage.model
        self.endpoints = endpoints  # looked up per batch: a reload replaces the endpoint

    def endpoint(self) -> ModelEndpoint:
        endpoint = self.endpoints.get(self.model)
        if endpoint is None:
            raise ServiceUnavailable(f"stage {self.name!r}: model {self.model!r} is not loaded")
        return endpoint

    @property
    def max_batch(self) -> int:
        return self.endpoint().executor.scheduler.max_batch

    def inputs(self, batch: Any, endpoint: ModelEndpoint) -> dict[str, InputData]:
        """Rows as the model's input arrays, by the model's input names (one column into a
        one-input model goes by position, whatever its name)."""
        columns = to_form(batch, "tensors", self.name)
        if isinstance(columns, Joined):
            raise StageError(f"stage {self.name!r}: a model stage cannot be a join")
        specs = endpoint.model.inputs
        arrays: dict[str, InputData] = {}
        for spec in specs:
            column = columns.get(spec.name)
            if column is None and len(specs) == 1 and len(columns) == 1:
                column = next(iter(columns.values()))
            if column is None:
                raise StageError(
                    f"stage {self.name!r}: model {self.model!r} takes {spec.name!r}; "
                    f"the rows have {sorted(columns)}"
                )
            arrays[spec.name] = _array(column, spec.dtype.numpy)
        return arrays

    def run(self, batch: Any, done: Done) -> None:
        try:
            endpoint = self.endpoint()
            arrays = self.inputs(batch, endpoint)
            capture = _Capture()
            job = endpoint.executor.submit(arrays, rows_of(batch, self.name), capture.encode)
        except Exception as exc:
            done(None, exc)
            return
        job.subscribe(_answered, (capture, done))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"placement": self.kind, "model": self.model}


class _Capture:
    """Keeps a job's output rows (the executor hands its encoder the job's slice)."""

    __slots__ = ("outputs",)

    def __init__(self) -> None:
        self.outputs: dict[str, np.ndarray] | None = None

    def encode(self, outputs: dict[str, np.ndarray]) -> Response:
        self.outputs = outputs
        return _CAPTURED


_CAPTURED: Final = Response(200, b"")


def _answered(arg: tuple[_Capture, Done], response: Response) -> None:
    capture, done = arg
    if capture.outputs is None or response.status != 200:
        done(None, ModelAnswer(response.status, _error_text(response)))
    else:
        done(capture.outputs, None)


def _array(column: Any, dtype: np.dtype[Any]) -> np.ndarray:
    if hasattr(column, "detach"):  # a torch tensor
        column = column.detach().cpu().numpy()
    array = np.asarray(column)
    if array.dtype != dtype:
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


def _error_text(response: Response) -> str:
    try:
        message = orjson.loads(response.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    return str(message) if message else f"the model answered {response.status}"
