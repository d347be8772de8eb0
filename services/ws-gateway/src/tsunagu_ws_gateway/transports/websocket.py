"""WebSocket as a transport: the handshake (screened by admission before it is accepted), the frames a
client sends, and a bounded writer.

Each connection has one writer task and a bounded outbox. `send()` never blocks: frames queue up and the
writer sends what is queued either as one WebSocket message (the native protocol: JSON replies joined by
newlines, protobuf ones concatenated, as the protocol allows; a burst costs one write per client, not one
per publication) or one message per frame (the adapters' protocols). When a client does not read and its
outbox passes `send_buffer_bytes`, it is cut off as slow (3008) and nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.core.loop import Handler, serve
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.registry import DISCONNECTS
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.protocol import codes

log = logging.getLogger("tsunagu.gateway.websocket")

WRITER_CLOSE_TIMEOUT = 5.0


class WebSocketTransport:
    name = "websocket"

    def __init__(self, websocket: WebSocket, limit: int, *, binary: bool = False, joiner: bytes | None = None) -> None:
        self.websocket = websocket
        self.limit = limit
        self.binary = binary
        # Frames queued together go out as one message joined with this; None: one message per frame.
        self.joiner = joiner
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

    def _wake(self) -> None:
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
        self._wake()

    def start(self) -> None:
        self.reader = asyncio.current_task()
        self.writer = asyncio.create_task(self._write_loop(), name="ws-writer")

    async def _write_loop(self) -> None:
        websocket = self.websocket
        loop = asyncio.get_running_loop()
        while True:
            if not self.frames and self.closing is None:
                self._waiter = loop.create_future()
                await self._waiter
                continue
            if self.frames:
                batch, self.frames = self.frames, []
                self.queued_bytes = 0
                if self.joiner is not None:
                    batch = [self.joiner.join(batch)]
                for message in batch:
                    if self.binary:
                        await websocket.send_bytes(message)
                    else:
                        await websocket.send_text(message.decode())
            if self.closing is not None and not self.frames:
                await websocket.close(self.closing.code, self.closing.reason)
                return

    async def received(self) -> AsyncIterator[bytes | str]:
        """The messages the client sends, until it goes or the connection is closing."""
        websocket = self.websocket
        while self.closing is None:
            try:
                message = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text")
            yield data if data is not None else (message.get("bytes") or b"")

    async def finish(self) -> None:
        """After the loop: let the writer send what is queued and close, for a bounded time."""
        if self.closing is None:
            self.close(codes.CONNECTION_CLOSED)
        writer = self.writer
        if writer is None:
            return
        if not writer.done():
            try:
                await asyncio.wait_for(writer, WRITER_CLOSE_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError, Exception):
                writer.cancel()
        elif not writer.cancelled():
            with contextlib.suppress(Exception):
                writer.result()


async def deny(websocket: WebSocket, refused: Refused) -> None:
    """Refuse the handshake with an HTTP status (403 origin, 503 draining or full, 429 too many)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(refused.detail, refused.status))
    else:
        await websocket.close(code=1008, reason=refused.detail[:120])


async def serve_websocket(
    websocket: WebSocket,
    protocol: str,
    handler_of: Callable[[Connection], Handler],
    *,
    subprotocol: str | None = None,
    binary: bool = False,
    joiner: bytes | None = None,
) -> None:
    """One WebSocket connection of `protocol`, from handshake to close, through the socket loop."""
    gateway: Gateway = websocket.app.state.gateway
    settings = gateway.settings
    peer = Peer.of(websocket.scope)
    transport = WebSocketTransport(websocket, settings.send_buffer_bytes, binary=binary, joiner=joiner)
    connection = Connection(transport, peer, protocol, CommandRate(settings.commands_per_second))
    try:
        gateway.admission.screen(peer, protocol)
        gateway.registry.open(connection)
    except Refused as refused:
        log.info("refusing a %s handshake from %s: %s", protocol, peer.ip, refused.detail)
        await deny(websocket, refused)
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
        handler = handler_of(connection)
    except BaseException:
        gateway.registry.close(connection)
        raise
    transport.start()
    try:
        await serve(connection, handler, transport.received(), gateway.registry)
    finally:
        await transport.finish()
