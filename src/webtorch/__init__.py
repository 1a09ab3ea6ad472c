"""WebTorch: one Python process that is both an HTTP server and a PyTorch runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webtorch.pipeline.spec import Pipeline, Reject, Stage, model_stage, stage
    from webtorch.serve.model import Model, Streaming, TensorSpec

__all__ = [
    "Model",
    "Pipeline",
    "Reject",
    "Stage",
    "Streaming",
    "TensorSpec",
    "__version__",
    "model_stage",
    "stage",
]
__version__ = "0.1.0"

_PIPELINE = ("Pipeline", "Reject", "Stage", "model_stage", "stage")


def __getattr__(name: str) -> Any:
    # Model and TensorSpec come with torch (~180 MiB resident, ~1 s to import): loaded when a
    # model file asks for them, so that a server that only proxies never pays for torch.
    if name in ("Model", "Streaming", "TensorSpec"):
        from webtorch.serve import model

        return getattr(model, name)
    # The pipeline API (no torch, no numpy: a process placement's workers import it).
    if name in _PIPELINE:
        from webtorch.pipeline import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'webtorch' has no attribute {name!r}")
