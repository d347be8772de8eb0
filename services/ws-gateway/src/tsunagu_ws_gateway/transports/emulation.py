"""A long HTTP response that carries a bidirectional session: Centrifugo's `http_stream` and `sse`
transports, whose client sends its commands as separate `POST /emulation` requests (core/emulation.py).

The writing is the unidirectional streams' (http_stream.py): frames queued, written by the flusher, the
client cut off as slow past `send_buffer_bytes`. What differs:
- framing as Centrifugo's `handler_http_stream.go`: a JSON reply is one line (`\\n` after it), a protobuf
  reply goes as it is (the codec already prefixed it with its varint length); SSE: one `data:` event
  per reply, JSON only;
- the disconnect push is the native protocol's (`{"push": {"disconnect": ...}}`), not the uni one;
- `received` yields the frames the client sends: the connect request the stream opened with, then every
  emulation request's, in the order they reached this node, so the one socket loop (core/loop.py) reads
  an emulated connection exactly as it reads a WebSocket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.emulation_frames import disconnect_reply
from tsunagu_ws_gateway.transports.http_stream import HttpStreamTransport

# Commands waiting for the socket loop, per connection: past this an emulation request is refused (429)
# rather than queued without bound behind a session that does not keep up.
MAX_PENDING_FRAMES = 64


class EmulatedStream(HttpStreamTransport):
    __slots__ = ("binary", "inbound")

    def __init__(self, *args: Any, first: bytes, binary: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.binary = binary
        self.inbound: asyncio.Queue[bytes] = asyncio.Queue()
        self.inbound.put_nowait(first)

    def push(self, frame: bytes) -> bool:
        """A frame from an emulation request, for the socket loop; False when the stream takes no more
        (it is closing, or too much is waiting)."""
        if self.closing is not None or self.ended.done() or self.inbound.qsize() >= MAX_PENDING_FRAMES:
            return False
        self.inbound.put_nowait(frame)
        return True

    def _chunk(self, frame: bytes) -> bytes:
        if self.binary:
            return frame
        return super()._chunk(frame)

    def _disconnect_frame(self, disconnect: codes.Disconnect) -> bytes:
        return disconnect_reply(disconnect, binary=self.binary)

    async def received(self) -> AsyncIterator[bytes | str]:
        receiving: asyncio.Future[Message] = asyncio.ensure_future(self.receive())
        getting: asyncio.Future[bytes] = asyncio.ensure_future(self.inbound.get())
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {receiving, getting, self.ended}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if self.ended.done():
                    return
                if receiving.done():
                    if receiving.result()["type"] == "http.disconnect":
                        return
                    receiving = asyncio.ensure_future(self.receive())
                if getting.done():
                    frame = getting.result()
                    getting = asyncio.ensure_future(self.inbound.get())
                    yield frame
        finally:
            receiving.cancel()
            getting.cancel()
