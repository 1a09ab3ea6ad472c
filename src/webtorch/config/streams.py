"""``[streams]``: WebSocket (RFC 6455) on the server: the model streams
(``GET /v2/models/{m}/stream``) and WebSocket routes through the proxy. Absent: the server
answers an ``Upgrade: websocket`` request as plain HTTP, as before."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from webtorch.config.base import Strict


class StreamsConfig(Strict):
    """Limits of WebSocket connections and of the per-stream state the server keeps."""

    # A frame / a whole (reassembled) message larger than this closes the connection with
    # 1009 (message too big).
    max_frame: Annotated[int, Field(gt=0)] = 1 << 20
    # permessage-deflate (RFC 7692) when a client offers it: fewer bytes on the wire for more
    # CPU per message; inflation is bounded by max_message (streams/deflate.py).
    deflate: bool = False
    max_message: Annotated[int, Field(gt=0)] = 1 << 20
    # No message for this long: closed with 1001. Silence for ping_interval sends a ping; no
    # pong within ping_timeout: closed with 1011 (the peer is gone without a FIN).
    idle_timeout: Annotated[float, Field(gt=0)] = 300.0
    ping_interval: Annotated[float, Field(gt=0)] = 20.0
    ping_timeout: Annotated[float, Field(gt=0)] = 20.0
    # Our close frame sent, the peer's not back after this long: the socket is dropped.
    close_timeout: Annotated[float, Field(gt=0)] = 5.0
    # The write buffer's high-water mark: above it, the connection stops reading its client
    # (a client that does not read its answers cannot make the server buffer without bound).
    write_buffer: Annotated[int, Field(gt=0)] = 256 * 1024
    # WebSocket connections open at once (beyond: 503 to the upgrade).
    max_connections: Annotated[int, Field(gt=0)] = 10_000
    # Model streams whose state is kept at once, and the bytes that state may take (beyond
    # either: 503 to a new stream's upgrade).
    max_streams: Annotated[int, Field(gt=0)] = 10_000
    max_state_bytes: Annotated[int, Field(gt=0)] = 256 << 20
    # A stream's state outlives its connection this long (a client reconnecting with
    # ?stream=ID resumes it); then it is dropped.
    expiry: Annotated[float, Field(gt=0)] = 60.0
    # Items of one stream received and not yet answered; beyond, its connection stops reading
    # until answers catch up.
    max_pending: Annotated[int, Field(gt=0)] = 64
    # A label may come after its item (``{"for": ID, "label": ...}``): the inputs of each
    # stream's last this many items are kept for it (of a model that trains).
    label_window: Annotated[int, Field(ge=0)] = 256
