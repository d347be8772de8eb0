"""WebSocket as a transport: the handshake (screened by admission before it is accepted), the frames a
client sends, and a bounded writer that writes prepared frames straight to the socket.

`send()` never blocks and never writes: it appends a frame to the connection's queue and marks the
connection for the loop's flush (`_Flusher`): callbacks that write FLUSH_BATCH marked sockets each,
with the loop reading new input between them. At low load a publication leaves in the iteration it
was published in; under load everything queued for a socket by the time its turn comes goes out as
one `write`, with no timer and no added wait. A frame is framed as
a WebSocket message once for every socket of the same framing (frames.py): the hub hands all
subscribers the same payload, and each socket's queue holds the same bytes. When several frames are
queued, the native protocol sends them as one message (JSON replies joined by newlines, protobuf ones
concatenated, as the protocol allows; the client parses one message, not many); the adapters' protocols
and compressed sockets send one message per frame. When the socket does not take writes (the
transport's buffer is over its high-water mark) frames wait in the queue; past `send_buffer_bytes`
the client is cut off as slow (3008) and nobody else waits for it.

The socket is uvicorn's, through the gateway's protocol class (server.py, the `tsunagu.frames` ASGI
extension); reading stays ASGI's `receive`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.core.loop import Handler, serve
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.registry import DISCONNECTS
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.transports.frames import Framing
from tsunagu_ws_gateway.transports.server import FRAMES_EXTENSION

log = logging.getLogger("tsunagu.gateway.websocket")

# How long a closing connection may take to send what it has queued before it is dropped.
CLOSE_TIMEOUT = 5.0
# A client's close frame with one of these ends the connection on purpose (normal, going away: a tab
# closed); without a close frame (1006) or with another code the connection counts as lost.
CLIENT_CLOSE_CODES = frozenset({1000, 1001})


class FrameSocket(Protocol):
    """The socket under a WebSocket transport (server.py's `GatewayWebSocketProtocol`)."""

    on_resume: Callable[[], None]

    @property
    def paused(self) -> bool: ...

    @property
    def open(self) -> bool: ...

    def framing(self, binary: bool) -> Framing: ...

    def write(self, data: bytes) -> None: ...

    def close_with(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


# Sockets written per flush callback. Between two callbacks the loop reads what arrived, so the
# publications that come while a large fan-out is being written join the queues of the sockets not
# written yet and leave with them in one write (~2 per write at one publish in flight to 1,000
# subscribers, where one write per publication per socket made the send syscall 60 % of the CPU).
FLUSH_BATCH = 64


class Flushable(Protocol):
    """A transport the flusher writes: a WebSocket, or a streamed HTTP response (http_stream.py)."""

    def flush(self) -> None: ...

    def abort(self) -> None: ...


class _Flusher:
    """The connections with frames queued, written by callbacks of FLUSH_BATCH sockets each."""

    __slots__ = ("dirty", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: deque[Flushable] = deque()
        self.scheduled = False

    def add(self, transport: Flushable) -> None:
        self.dirty.append(transport)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        dirty = self.dirty
        pop = dirty.popleft
        for _ in range(min(len(dirty), FLUSH_BATCH)):
            transport = pop()
            try:
                transport.flush()
            except Exception:
                log.exception("writing to %r failed", transport)
                transport.abort()
        if dirty:
            self.loop.call_soon(self.run)
        else:
            self.scheduled = False


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = weakref.WeakKeyDictionary()


def flusher() -> _Flusher:
    loop = asyncio.get_running_loop()
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        flusher = _FLUSHERS[loop] = _Flusher(loop)
    return flusher


class WebSocketTransport:
    name = "websocket"
    __slots__ = (
        "client_closed",
        "closed",
        "closing",
        "first",
        "flusher",
        "framing",
        "joiner",
        "limit",
        "marked",
        "queue",
        "queued_bytes",
        "socket",
        "websocket",
    )

    def __init__(
        self, websocket: WebSocket, socket: FrameSocket, limit: int, *, binary: bool = False, joiner: bytes | None
    ) -> None:
        self.websocket = websocket
        self.socket = socket
        self.limit = limit
        self.framing = socket.framing(binary)
        # Frames queued together go out as one message joined with this (compressed frames cannot be
        # joined without compressing each socket's batch anew); None: one message per frame.
        self.joiner = joiner if not self.framing.compressed else None
        # Payloads when joining (the first one's prepared message beside them), else prepared messages.
        self.queue: list[bytes] = []
        self.first = b""
        self.queued_bytes = 0
        self.marked = False  # in the flusher's list for this iteration
        self.closing: codes.Disconnect | None = None
        self.client_closed = False
        self.closed = asyncio.get_running_loop().create_future()
        self.flusher = flusher()
        socket.on_resume = self._resumed

    def send(self, frame: bytes) -> None:
        if self.closing is not None:
            return
        queue = self.queue
        if self.joiner is None:
            queue.append(self.framing.frame(frame))
        else:
            if not queue:
                self.first = self.framing.frame(frame)
            queue.append(frame)
        self.queued_bytes += len(frame)
        if self.queued_bytes > self.limit:
            self.close(codes.SLOW)
            return
        if not self.marked:
            self.marked = True
            self.flusher.add(self)

    def flush(self) -> None:
        self.marked = False
        socket = self.socket
        if self.queue:
            if socket.paused:
                return  # `_resumed` brings it back
            queue, self.queue = self.queue, []
            self.queued_bytes = 0
            if len(queue) == 1:
                socket.write(self.first if self.joiner is not None else queue[0])
            elif self.joiner is not None:
                socket.write(self.framing.frame_once(self.joiner.join(queue)))
            else:
                socket.write(b"".join(queue))
        closing = self.closing
        if closing is not None and not self.closed.done():
            socket.close_with(closing.code, closing.reason)
            self.closed.set_result(None)

    def abort(self) -> None:
        self.socket.abort()

    def _resumed(self) -> None:
        if (self.queue or self.closing is not None) and not self.marked:
            self.marked = True
            self.flusher.add(self)

    def close(self, disconnect: codes.Disconnect) -> None:
        if self.closing is not None:
            return
        self.closing = disconnect
        DISCONNECTS.labels(str(disconnect.code)).inc()
        if disconnect is codes.SLOW:
            # Most likely the socket does not take writes: drop what is queued and the connection
            # rather than wait for a client that does not read.
            self.queue.clear()
            self.queued_bytes = 0
            self.socket.abort()
            if not self.closed.done():
                self.closed.set_result(None)
            return
        if not self.marked:
            self.marked = True
            self.flusher.add(self)

    async def received(self) -> AsyncIterator[bytes | str]:
        """The messages the client sends, until it goes or the connection is closing."""
        websocket = self.websocket
        while self.closing is None:
            try:
                message = await websocket.receive()
            except WebSocketDisconnect as exc:
                self.client_closed = exc.code in CLIENT_CLOSE_CODES
                return
            except RuntimeError:
                return
            if message["type"] == "websocket.disconnect":
                self.client_closed = message.get("code") in CLIENT_CLOSE_CODES
                return
            data = message.get("text")
            yield data if data is not None else (message.get("bytes") or b"")

    async def finish(self) -> None:
        """After the loop: let what is queued go out and the close frame after it, for a bounded time."""
        if self.closing is None:
            self.close(codes.CONNECTION_CLOSED)
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
        except TimeoutError:
            self.socket.abort()

    def __repr__(self) -> str:
        return f"<websocket transport, {len(self.queue)} queued>"


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
    transport_class: type[WebSocketTransport] | None = None,
) -> None:
    """One WebSocket connection of `protocol`, from handshake to close, through the socket loop
    (`transport_class`: a WebSocketTransport of the protocol's own, e.g. uni_websocket's)."""
    gateway: Gateway = websocket.app.state.gateway
    settings = gateway.settings
    socket: FrameSocket | None = websocket.scope.get("extensions", {}).get(FRAMES_EXTENSION)
    if socket is None:
        raise RuntimeError(
            "the gateway's WebSockets need its uvicorn protocol class: serve it with app.state.server_options"
        )
    peer = Peer.of(websocket.scope)
    transport = (transport_class or WebSocketTransport)(
        websocket, socket, settings.send_buffer_bytes, binary=binary, joiner=joiner
    )
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
    try:
        await serve(connection, handler, transport.received(), gateway.registry)
    finally:
        await transport.finish()
