"""WebTorch: one Python process that is both an HTTP server and a PyTorch runtime."""

from webtorch.serve.model import Model, TensorSpec

__all__ = ["Model", "TensorSpec", "__version__"]
__version__ = "0.1.0"
