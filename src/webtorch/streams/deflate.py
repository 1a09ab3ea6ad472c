"""``permessage-deflate`` (RFC 7692), optional (``streams.deflate``): wsproto's extension with
its inflation bounded. wsproto inflates each frame's payload whole, so a few kilobytes of
zeros could become gigabytes before any size check sees them; here a message inflates to at
most ``streams.max_message`` bytes, beyond which the connection closes with 1009."""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol


class BoundedDeflate(PerMessageDeflate):
    def __init__(self, max_message: int) -> None:
        super().__init__()
        self.max_message = max_message
        self._inflated = 0  # bytes of the message being received, inflated so far

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        decompressor = self._decompressor
        assert decompressor is not None
        budget = self.max_message - self._inflated
        try:
            out = decompressor.decompress(bytes(data), budget + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > budget or decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        self._inflated += len(out)
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if fin:
            self._inflated = 0
        return super().frame_inbound_complete(proto, fin)
