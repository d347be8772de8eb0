"""The socket side of the native protocol: read frames into a session, write its frames out.

Each connection has one writer task and a bounded outbox. `send()` never blocks: frames queue up
and the writer sends everything queued as one WebSocket message (JSON: a text message, replies
separated by newlines; protobuf: a binary message of length-delimited replies one after the other,
as the protocol allows), so a burst costs one write per client, not one per publication. When a
client does not read and its outbox passes the limit, it is cut off as slow (3008) and nobody
else waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from tsunagu_ws_gateway.certificates import certificate_grant
from tsunagu_ws_gateway.hub import DISCONNECTS
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import ProtocolError
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.protocol.protobuf_frames import PROTOBUF
from tsunagu_ws_gateway.session import ClientSession, Gateway

log = logging.getLogger("tsunagu.gateway.websocket")

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
WRITER_CLOSE_TIMEOUT = 5.0


class SocketTransport:
    def __init__(self, websocket: WebSocket, limit: int, codec: Codec = JSON) -> None:
        self.websocket = websocket
        self.limit = limit
        self.separator = codec.separator
        self.binary = codec.binary
        self.frames: list[bytes] = []
        self.queued_bytes = 0
        # The idle writer waits on this future; a plain future is cheaper to wake than an
        # asyncio.Event, and `send()` runs once per subscriber per publication.
        self._waiter: asyncio.Future[None] | None = None
        self.closing: codes.Disconnect | None = None
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        if self.closing is not None:
            return
        self.frames.append(frame)
        self.queued_bytes += len(frame)
        if self.queued_bytes > self.limit:
            self.close(codes.SLOW)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, disconnect: codes.Disconnect) -> None:
        if self.closing is not None:
            return
        self.closing = disconnect
        DISCONNECTS.labels(str(disconnect.code)).inc()
        if disconnect is codes.SLOW:
            # The writer is most likely stuck on a full socket: drop what is queued and cut the
            # connection instead of waiting for a client that does not read.
            self.frames.clear()
            self.queued_bytes = 0
            for task in (self.writer, self.reader):
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
        self.wake()

    async def write_loop(self) -> None:
        websocket = self.websocket
        loop = asyncio.get_running_loop()
        while True:
            if not self.frames and self.closing is None:
                self._waiter = loop.create_future()
                await self._waiter
                continue
            if self.frames:
                batch = self.separator.join(self.frames)
                self.frames.clear()
                self.queued_bytes = 0
                if self.binary:
                    await websocket.send_bytes(batch)
                else:
                    await websocket.send_text(batch.decode())
            if self.closing is not None and not self.frames:
                await websocket.close(self.closing.code, self.closing.reason)
                return


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    if not allowed:
        return True
    origin = websocket.headers.get("origin")
    return origin is None or origin in allowed


async def native_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    settings = gateway.settings
    if gateway.node.draining or not origin_allowed(websocket, settings.allowed_origins):
        await websocket.close(code=1008)  # before accept: the handshake is refused with 403
        return
    if PROTOBUF_SUBPROTOCOL in websocket.scope.get("subprotocols", []):
        codec: Codec = PROTOBUF
        await websocket.accept(subprotocol=PROTOBUF_SUBPROTOCOL)
    else:
        codec = JSON
        await websocket.accept()
    transport = SocketTransport(websocket, settings.send_buffer_bytes, codec)
    transport.reader = asyncio.current_task()
    transport.writer = asyncio.create_task(transport.write_loop(), name="ws-writer")
    session = ClientSession(
        gateway, transport, codec=codec, certificate_grant=certificate_grant(settings, websocket.scope)
    )
    try:
        while transport.closing is None:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if len(data) > settings.max_frame_bytes:
                transport.close(codes.MESSAGE_SIZE_LIMIT)
                break
            try:
                await session.handle_frame(data)
            except ProtocolError as exc:
                log.info("closing client %s: %s (%s)", session.id, exc.disconnect.reason, exc)
                transport.close(exc.disconnect)
    except asyncio.CancelledError:
        if transport.closing is not codes.SLOW:
            raise
    except WebSocketDisconnect:
        pass
    finally:
        await session.close(transport.closing or codes.CONNECTION_CLOSED)
        if transport.closing is None:
            transport.closing = codes.CONNECTION_CLOSED
            transport.wake()
        writer = transport.writer
        if writer is not None and not writer.done():
            try:
                await asyncio.wait_for(writer, WRITER_CLOSE_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError, Exception):
                writer.cancel()
        elif writer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                writer.result()
