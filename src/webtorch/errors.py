"""One exception hierarchy, mapped to HTTP statuses at one boundary (``http.messages``).

Everything a client can cause is a :class:`HTTPError` subclass carrying its status and a message
that names the problem; anything else reaching the boundary is a bug and becomes a logged 500.
"""

from __future__ import annotations


class WebTorchError(Exception):
    """Base of every error WebTorch raises on purpose."""


class ConfigError(WebTorchError):
    """A configuration or model file is invalid; the message names the key and the file."""


class ModelLoadError(WebTorchError):
    """A model file could not be loaded (import error, missing ``model``, bad device...)."""


class HTTPError(WebTorchError):
    """An error answered to the client with ``status`` and ``{"error": message}``.

    Subclasses live here, not in the compiled modules (webtorch/compiled.py): there, a class
    attribute such as ``status`` would become an instance default that the base class's
    ``status`` shadows.
    """

    status = 500

    def __init__(self, message: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or []


class BadRequest(HTTPError):
    status = 400


class Unauthorized(HTTPError):
    status = 401


class Forbidden(HTTPError):
    status = 403


class NotFound(HTTPError):
    status = 404


class MethodNotAllowed(HTTPError):
    status = 405

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message, headers=[(b"allow", ", ".join(allowed).encode())])


class RequestTimeout(HTTPError):
    status = 408


class Conflict(HTTPError):
    status = 409


class ExpectationFailed(HTTPError):
    status = 417


class ModelFailed(HTTPError):
    """The model raised on this request's input after validation passed."""

    status = 422


class VersionNotSupported(HTTPError):
    status = 505


class FeatureNotImplemented(HTTPError):
    """What the request needs the server does not do (a transfer coding it cannot decode)."""

    status = 501


class PayloadTooLarge(HTTPError):
    status = 413


class URITooLong(HTTPError):
    status = 414


class UnsupportedMediaType(HTTPError):
    status = 415


class HeaderFieldsTooLarge(HTTPError):
    status = 431


class ServiceUnavailable(HTTPError):
    status = 503
