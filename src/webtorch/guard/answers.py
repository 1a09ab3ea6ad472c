"""What the guard answers a refused request: 403 for a block, 429 with ``Retry-After`` for a
throttle, each with a JSON error that says why, as every WebTorch error does."""

from __future__ import annotations

from webtorch.guard.core import BLOCK, Decision, retry_after_header
from webtorch.http.messages import Response, error_response

_MESSAGES = {
    "deny_list": "this address is not allowed here",
    "banned": "this client is banned for a while after an earlier blocked request",
    "rate_limit": "too many requests from this client; slow down",
    "new_keys": "too many new client keys from this address; slow down",
    "surge": "the server is under a surge of traffic from new clients; slow down",
    "connections": "too many connections from this client",
    "injection": "the request looks like an attack (injection) and was blocked",
    "body_budget": "the request body is longer than the guard inspects (guard.body_scan_bytes)",
    "abuse": "this client's traffic looks abusive",
}


def refusal(decision: Decision) -> Response:
    message = _MESSAGES.get(decision.reason, "refused by the guard")
    if decision.action == BLOCK:
        return error_response(403, message)
    return error_response(
        429, message, [(b"retry-after", retry_after_header(decision.retry_after))]
    )
