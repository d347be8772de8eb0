"""The gateway's uvicorn WebSocket protocol: uvicorn's sans-I/O one (websockets' `ServerProtocol`), plus
a way for the gateway's transports to write prepared frames straight to the socket.

Sending a message through ASGI costs Starlette's `send`, the middleware stack's wrappers and uvicorn's
`send` (an await, a dict, framing the message for this one socket) per message and per subscriber.
This class puts itself in the scope as the `tsunagu.frames` extension (`FrameSocket` below), and the
WebSocket transport (websocket.py) writes bytes framed once per message (frames.py) to the asyncio
transport, with the same flow control uvicorn uses (`pause_writing`/`resume_writing`). Everything
else, the handshake, reading, pings and ASGI's own `send` (still used by the libraries that serve
their sockets themselves: strawberry, engine.io), is uvicorn's.

permessage-deflate is negotiated with `server_no_context_takeover`: each message is compressed on its
own, so one compressed frame serves every subscriber that negotiated the same window. A context kept
across messages would make every frame depend on what that one client received before, and each
delivery would cost a compression of its own (the profile of the stage benchmarks showed deflate at
13-17 % of the gateway's CPU with uvicorn's default, context takeover). The client's own direction
keeps its context, within `client_max_window_bits` (TSUNAGU_GATEWAY_WS_DEFLATE_WINDOW_BITS, both ways):
that window is the one compression state kept per connection (docs/protocol.md#compression).

`GatewayHttpProtocol` is uvicorn's HTTP protocol with two additions for the unidirectional streams
(http_stream.py): a server that stops calls the hook a response still streaming put in its scope
(`tsunagu.on_shutdown`), so they end with a shutdown push at once (uvicorn itself only waits for them
to end, for the whole shutdown grace, then cuts them without a word; WebSockets it closes itself, with
1012); and `abort_http` drops a request's connection with what it has buffered, for a client that
does not read (closing would wait for the buffer to drain, which it never does).

`tsunagu serve` and `tsunagu_core.testing.serving` use both through `app.state.server_options`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.server import ServerProtocol

from tsunagu_ws_gateway.transports.frames import COMPRESS_SETTINGS, Framing, framing_for

FRAMES_EXTENSION = "tsunagu.frames"
# A callable a streaming response puts in its scope: called when the server begins to stop.
SHUTDOWN_HOOK = "tsunagu.on_shutdown"
# The window size we compress with and let clients compress with, as uvicorn offers it (the default of
# TSUNAGU_GATEWAY_WS_DEFLATE_WINDOW_BITS).
DEFLATE_WINDOW_BITS = 12


def _ignore() -> None:
    return


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    deflate_window_bits = DEFLATE_WINDOW_BITS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        extensions = []
        if self.config.ws_per_message_deflate:
            bits = self.deflate_window_bits
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    server_max_window_bits=bits,
                    client_max_window_bits=bits,
                    compress_settings=dict(COMPRESS_SETTINGS),
                    # The client's direction keeps its context (a decompressor per connection): its window is
                    # what bounds it, so a client that does not let us set it (no `client_max_window_bits` in
                    # its offer; it may then use 15 bits, a 32 KiB window) is not compressed at all.
                    require_client_max_window_bits=True,
                )
            ]
        self.conn = ServerProtocol(
            extensions=extensions, max_size=self.config.ws_max_size, logger=logging.getLogger("uvicorn.error")
        )
        # Called when the transport takes writes again after pausing them.
        self.on_resume: Callable[[], None] = _ignore

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: it sees the extension from its first step.
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][FRAMES_EXTENSION] = self

    def resume_writing(self) -> None:
        super().resume_writing()
        self.on_resume()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_resume()  # nothing will be written now: let a closing transport finish at once

    # what the gateway's transports use (FrameSocket)

    @property
    def paused(self) -> bool:
        """The asyncio transport's buffer is over its high-water mark: hold writes until `on_resume`."""
        return not self.writable.is_set()

    @property
    def open(self) -> bool:
        """Past the handshake's 101 and before any close: frames may be written."""
        return self.handshake_complete and not (self.close_sent or self.disconnected or self.transport.is_closing())

    def framing(self, binary: bool) -> Framing:
        return framing_for(binary, self.conn.extensions)

    def write(self, data: bytes) -> None:
        """Bytes of whole frames, framed by a `Framing` of this socket."""
        if self.open:
            self.transport.write(data)

    def close_with(self, code: int, reason: str) -> None:
        """The closing handshake, as uvicorn's `websocket.close` starts it, without an await."""
        if not self.open:
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def abort(self) -> None:
        """Drop the connection and what it has buffered (a client that does not read)."""
        self.transport.abort()


_PROTOCOLS: dict[int, type[GatewayWebSocketProtocol]] = {}


def websocket_protocol(window_bits: int) -> type[GatewayWebSocketProtocol]:
    """The protocol class that negotiates permessage-deflate windows of `window_bits` (uvicorn makes a
    protocol per connection from a class and its config, which has no such option)."""
    if window_bits == DEFLATE_WINDOW_BITS:
        return GatewayWebSocketProtocol
    protocol = _PROTOCOLS.get(window_bits)
    if protocol is None:
        attributes = {"deflate_window_bits": window_bits}
        protocol = type(f"GatewayWebSocketProtocol{window_bits}", (GatewayWebSocketProtocol,), attributes)
        _PROTOCOLS[window_bits] = protocol
    return protocol


# The HTTP connections by (client host, client port, our port), as a scope names them. Weak: a WebSocket
# upgrade hands the connection on and drops its HTTP protocol without `connection_lost`.
_HTTP: weakref.WeakValueDictionary[tuple[str, int, int], GatewayHttpProtocol] = weakref.WeakValueDictionary()


def _address(transport: asyncio.BaseTransport) -> tuple[str, int, int] | None:
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(local, tuple) and len(local) >= 2:
        return str(peer[0]), int(peer[1]), int(local[1])
    return None


def _protocol_of(scope: Mapping[str, Any]) -> GatewayHttpProtocol | None:
    client, server = scope.get("client"), scope.get("server")
    if not client or not server or len(server) < 2 or server[1] is None:
        return None
    return _HTTP.get((str(client[0]), int(client[1]), int(server[1])))


def abort_http(scope: Mapping[str, Any]) -> None:
    """Drop the connection of this HTTP request at once, with what it has buffered."""
    protocol = _protocol_of(scope)
    if protocol is not None:
        protocol.transport.abort()


class StreamSocket:
    """The socket under a streaming response whose start ASGI has sent: its body chunks written straight
    to the asyncio transport (in the chunked encoding uvicorn chose), with uvicorn's flow control, as
    `GatewayWebSocketProtocol` writes frames. Only under uvicorn's httptools protocol, whose framing is
    that one encoding; its end still goes through ASGI (`more_body: False`)."""

    __slots__ = ("chunked", "protocol")

    def __init__(self, protocol: GatewayHttpProtocol, chunked: bool) -> None:
        self.protocol = protocol
        self.chunked = chunked

    @property
    def paused(self) -> bool:
        return bool(self.protocol.flow.write_paused)

    @property
    def on_resume(self) -> Callable[[], None]:
        return self.protocol.on_resume

    @on_resume.setter
    def on_resume(self, callback: Callable[[], None]) -> None:
        self.protocol.on_resume = callback

    def write(self, data: bytes) -> None:
        transport = self.protocol.transport
        if transport.is_closing():
            return
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def abort(self) -> None:
        self.protocol.transport.abort()


def stream_socket(scope: Mapping[str, Any]) -> StreamSocket | None:
    """This request's socket for direct writes, once its response has started; None when the server does
    not offer it (another HTTP protocol class, h11's own framing)."""
    protocol = _protocol_of(scope)
    cycle = getattr(protocol, "cycle", None)
    if protocol is None or cycle is None or not getattr(cycle, "response_started", False):
        return None
    chunked = getattr(cycle, "chunked_encoding", None)
    if not isinstance(chunked, bool) or "httptools" not in type(cycle).__module__:
        return None
    return StreamSocket(protocol, chunked)


class GatewayHttpProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Called when the transport takes writes again after pausing them, or the connection is lost.
        self.on_resume: Callable[[], None] = _ignore

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        address = _address(transport)
        if address is not None:
            _HTTP[address] = self

    def resume_writing(self) -> None:
        super().resume_writing()
        self.on_resume()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_resume()

    def shutdown(self) -> None:
        cycle = getattr(self, "cycle", None)
        hook = None
        if cycle is not None and not cycle.response_complete:
            hook = cycle.scope.get(SHUTDOWN_HOOK)
        super().shutdown()
        if hook is not None:
            hook()
