"""The user-facing Model API and the loader that turns a model file into a ready network.

A model file is plain Python that defines ``model = webtorch.Model(...)``: the network, its input
and output tensors, optional pre/post-processing stages and, for training, loss and optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from webtorch.errors import ModelLoadError
from webtorch.serve.datatypes import Datatype, datatype
from webtorch.userfiles import UserFileError, import_user_file

Tensors = dict[str, Any]  # name -> torch.Tensor (or a numpy object array for BYTES inputs)
Stage = Callable[[Tensors], Tensors]


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of the model's interface. ``shape`` uses -1 for variable dimensions; the
    first dimension is the batch dimension along which concurrent requests are merged."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        datatype(self.datatype)  # raises on an unknown name
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.shape:
            raise ValueError(f"tensor {self.name!r}: shape needs a batch dimension")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: dimensions are positive or -1")

    @property
    def dtype(self) -> Datatype:
        return datatype(self.datatype)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Streaming:
    """How a model serves streams (``GET /v2/models/{name}/stream``, a WebSocket): one item per
    message, the items of many streams batched into one forward pass, each stream's state kept
    by WebTorch between its items (as Triton's sequence batcher keeps it).

    ``item`` names the input that one item fills (one row of it). With ``state = (input,
    output)`` the model is recurrent: the ``output`` row an item produced is fed back as
    ``input`` with that stream's next item (zeros for its first), so that each answer depends
    on the whole stream (a GRU's hidden state). With ``window = K``, ``item``'s rows are the
    last K items (shape ``(-1, K, ...)``): WebTorch keeps each stream's last K, and answers
    every ``every``-th item once K are in (answers per window); otherwise every item is
    answered. The answer carries the model's outputs but the state's.
    """

    item: str
    state: tuple[str, str] | None = None
    window: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        if self.window < 0 or self.every < 1:
            raise ValueError("Streaming: window >= 0 and every >= 1")
        if self.state is not None and self.window:
            raise ValueError("Streaming: a recurrent state or a window, not both")


@dataclass
class Model:
    """What a model file defines. ``network`` is a module or a zero-argument factory of one.

    The pipeline for a batch is ``postprocess(network(*preprocess(inputs)))``: ``preprocess`` gets
    and returns a dict of tensors keyed by input name (the network is called with them in the
    order of ``inputs``); ``postprocess`` gets and returns a dict keyed by output name. They are
    the one-stage case of pipelines (``webtorch.pipeline``): a ``@webtorch.stage(takes="tensors")``
    function serves as either, run inside the model's batch; a pipeline
    ``[pre, model_stage(name), post]`` gives the same functions queues and placements of their own.
    ``loss(outputs, targets)`` and ``optimizer(parameters)`` are for training: ``outputs`` are
    the network's named outputs (postprocess is for serving and is not applied), ``targets`` the
    request's target tensors, described by ``targets`` (default: the same specs as ``outputs``).
    The loss returns one value per row (shape ``[rows]``; the step minimises their mean and each
    request is answered its own loss at no extra cost) or a scalar averaged over rows (then each
    request's loss costs a ``torch.func.vmap`` call per step).
    """

    network: nn.Module | Callable[[], nn.Module]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocess: Stage | None = None
    postprocess: Stage | None = None
    loss: Callable[[Tensors, Tensors], torch.Tensor] | None = None
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    targets: list[TensorSpec] | None = None
    version: str = "1"
    platform: str = "pytorch"
    extra: dict[str, Any] = field(default_factory=dict)
    # Served as streams too (see Streaming); None: requests only.
    stream: Streaming | None = None

    def __post_init__(self) -> None:
        for group in (self.inputs, self.outputs, self.targets or []):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate tensor names in {names}")
        if not self.inputs or not self.outputs:
            raise ValueError("a model needs at least one input and one output")
        stream = self.stream
        if stream is not None:
            inputs = {t.name: t for t in self.inputs}
            if stream.item not in inputs:
                raise ValueError(f"stream: no input named {stream.item!r}")
            if stream.state is not None:
                if stream.state[0] not in inputs or stream.state[0] == stream.item:
                    raise ValueError(f"stream: state {stream.state[0]!r} is not another input")
                if stream.state[1] not in {t.name for t in self.outputs}:
                    raise ValueError(f"stream: state {stream.state[1]!r} is not an output")
            if stream.window and inputs[stream.item].shape[1:2] != (stream.window,):
                raise ValueError(
                    f"stream: input {stream.item!r} must have shape (-1, {stream.window}, ...)"
                )
            others = set(inputs) - {stream.item, *(stream.state or ())}
            if others:
                raise ValueError(f"stream: inputs {sorted(others)} are neither item nor state")


@dataclass
class LoadedModel:
    """A model file's ``Model`` with its network built, on its device, weights loaded."""

    name: str
    spec: Model
    network: nn.Module
    device: torch.device
    source: Path
    weights: Path | None

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.spec.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.spec.outputs

    @property
    def targets(self) -> list[TensorSpec]:
        return self.spec.targets if self.spec.targets is not None else self.spec.outputs

    def forward(self, inputs: Tensors) -> Tensors:
        """Run preprocess -> network -> postprocess on one batch (already on ``device``)."""
        spec = self.spec
        if spec.preprocess is not None:
            inputs = spec.preprocess(inputs)
        raw = self.network(*(inputs[t.name] for t in spec.inputs))
        outputs = self._name_outputs(raw)
        if spec.postprocess is not None:
            outputs = spec.postprocess(outputs)
        return outputs

    def _name_outputs(self, raw: Any) -> Tensors:
        names = [t.name for t in self.spec.outputs]
        if isinstance(raw, torch.Tensor):
            return {names[0]: raw}
        if isinstance(raw, Mapping):
            return dict(raw)
        if isinstance(raw, tuple | list):
            return dict(zip(names, raw, strict=False))
        raise TypeError(f"model {self.name}: network returned {type(raw).__name__}")

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.spec.version],
            "platform": self.spec.platform,
            "inputs": [t.metadata() for t in self.spec.inputs],
            "outputs": [t.metadata() for t in self.spec.outputs],
        }


def resolve_device(requested: str) -> torch.device:
    """The torch device for ``requested``; a clear error when CUDA is asked for and absent."""
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {requested!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {requested!r} is configured but CUDA is not available on this machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {requested!r} is configured but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type not in ("cpu", "mps"):
        raise ModelLoadError(f"unsupported device {requested!r} (use cpu or cuda[:N])")
    return device


def import_model_file(path: Path) -> Model:
    """Execute a model file and return its ``model``."""
    try:
        module = import_user_file(path, "model file")
    except UserFileError as exc:
        raise ModelLoadError(str(exc)) from exc
    model = getattr(module, "model", None)
    if not isinstance(model, Model):
        raise ModelLoadError(f"model file {path} must define `model = webtorch.Model(...)`")
    return model


def load_model(
    name: str, path: Path, device: str = "cpu", weights: Path | Literal[False] | None = None
) -> LoadedModel:
    """Import ``path``, build its network on ``device`` and load weights from safetensors.

    ``weights`` defaults to the file beside the model with the ``.safetensors`` suffix, used only
    if it exists; an explicitly configured weights file must exist; ``False`` keeps the network's
    own initialisation.
    """
    target = resolve_device(device)
    spec = import_model_file(path)
    network = spec.network if isinstance(spec.network, nn.Module) else spec.network()
    if not isinstance(network, nn.Module):
        raise ModelLoadError(f"model {name}: network must be a torch.nn.Module")
    if weights is False:
        weights = None
    elif weights is None:
        default = path.with_suffix(".safetensors")
        weights = default if default.is_file() else None
    elif not weights.is_file():
        raise ModelLoadError(f"model {name}: weights file {weights} does not exist")
    if weights is not None:
        load_weights(network, weights, name)
    network.to(target)
    network.eval()
    return LoadedModel(name, spec, network, target, path, weights)


def load_weights(network: nn.Module, weights: Path, name: str) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
        network.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"model {name}: cannot load weights {weights}: {exc}") from exc
