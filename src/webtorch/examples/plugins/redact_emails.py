"""Redacts e-mail addresses in JSON response bodies: a response transformer for
``[[plugins]]`` (docs/PLUGINS.md).

A JSON body is kept until its end (up to ``max_bytes``; a larger one passes unchanged), then
every address in it becomes ``"[redacted]"``'s text. Other bodies pass through chunk by chunk.

    [[plugins]]
    path = "examples/plugins/redact_emails.py"
    [plugins.settings]
    max_bytes = 1048576
    replacement = "[redacted]"
"""

from __future__ import annotations

import re

from webtorch.plugins import Context, Host, Response

# Local part, @, a domain with a dot: what an address in a JSON string looks like (quotes,
# backslashes and spaces end it).
EMAIL = re.compile(rb"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


class RedactEmails:
    def __init__(self) -> None:
        self.max_bytes = 1 << 20
        self.replacement = b"[redacted]"

    def startup(self, host: Host) -> None:
        self.max_bytes = int(host.settings.get("max_bytes", self.max_bytes))
        self.replacement = str(host.settings.get("replacement", "[redacted]")).encode()

    def response(self, ctx: Context, response: Response) -> None:
        ctype = response.content_type
        if ctype is None:
            for name, value in response.headers:
                if name.lower() == b"content-type":
                    ctype = value
        media = (ctype or b"").split(b";", 1)[0].strip().lower()
        ctx.state["redact"] = media == b"application/json" or media.endswith(b"+json")

    def response_body(self, ctx: Context, chunk: bytes, end: bool) -> bytes:
        if not ctx.state.get("redact"):
            return chunk
        kept: list[bytes] = ctx.state.setdefault("redact_kept", [])
        kept.append(chunk)
        size = ctx.state["redact_size"] = ctx.state.get("redact_size", 0) + len(chunk)
        if size > self.max_bytes:  # too large to hold: what was kept goes out unchanged
            ctx.state["redact"] = False
            return b"".join(kept)
        if not end:
            return b""
        return EMAIL.sub(self.replacement, b"".join(kept))


plugin = RedactEmails()
