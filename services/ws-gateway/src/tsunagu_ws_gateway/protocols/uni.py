"""Centrifugo's unidirectional transports: `/connection/uni_sse`, `/connection/uni_http_stream` and
`/connection/uni_websocket` (docs/protocol.md).

A unidirectional client sends its connect request once (the SSE URL's `cf_connect`, a POST body, or
the first WebSocket message) and only reads after that. Its subscriptions are server-side: the token's
`subs` claim (or the connect hook's backend) says which channels, the connect request's `subs` say where
the client stands in them (`recover`, `offset`, `epoch`), and the connect push tells it what was
recovered. The connect is the native session's (`Session.execute` with a `Connect` command) through
the one admission path, and the connection runs in the one socket loop (core/loop.py): this module only
parses the request, renders through `UNI_JSON` and turns every failure into an HTTP status (before the
stream starts) or a disconnect push (after).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson
from prometheus_client import Gauge
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.core.loop import serve
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import Renderer
from tsunagu_ws_gateway.core.session import Session
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codes import Disconnect, ErrorCode, ProtocolError, ReplyError
from tsunagu_ws_gateway.protocol.uni_frames import (
    PING_PUSH,
    UNI_JSON,
    connect_request,
    disconnect_for,
    disconnect_push,
)
from tsunagu_ws_gateway.transports.http_stream import HttpStreamTransport
from tsunagu_ws_gateway.transports.server import SHUTDOWN_HOOK, abort_http, stream_socket
from tsunagu_ws_gateway.transports.stream_encoding import GzipStream, accepts_gzip
from tsunagu_ws_gateway.transports.websocket import WebSocketTransport, serve_websocket

log = logging.getLogger("tsunagu.gateway.uni")

# The SSE URL parameter (and the uni_websocket one) that holds the connect request, as Centrifugo names it.
CONNECT_PARAM = "cf_connect"
UNI_CONNECTIONS = Gauge(
    "tsunagu_gateway_uni_connections", "Open unidirectional connections on this node", ["transport"]
)


class UniTransport(Protocol):
    name: str
    closing: Disconnect | None

    def send(self, frame: bytes) -> None: ...

    def connected(self, frame: bytes, positions: dict[str, dict[str, Any]]) -> None: ...

    def close(self, disconnect: Disconnect) -> None: ...


class UniWebSocketTransport(WebSocketTransport):
    """A WebSocket whose every push is one message, and whose close is told first by a disconnect push
    (Centrifugo sends both: the push for clients that read only messages, the close frame's code)."""

    __slots__ = ()
    name = "uni_websocket"

    def connected(self, frame: bytes, positions: dict[str, dict[str, Any]]) -> None:
        self.send(frame)

    def close(self, disconnect: Disconnect) -> None:
        if self.closing is None and disconnect is not codes.SLOW and disconnect.code != codes.CONNECTION_CLOSED.code:
            self.send(disconnect_push(disconnect))
        super().close(disconnect)

    def close_unannounced(self, disconnect: Disconnect) -> None:
        """Close with the code alone (a first message that is no connect request, as Centrifugo closes)."""
        super().close(disconnect)


def _positions(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Where the connect push leaves the client in each recoverable channel (after what it recovered)."""
    positions: dict[str, dict[str, Any]] = {}
    for channel, sub in (result.get("subs") or {}).items():
        if not sub.get("recoverable"):
            continue
        publications = sub.get("publications") or []
        offset = publications[-1].offset if publications else sub.get("offset", 0)
        positions[channel] = {"offset": offset, "epoch": sub.get("epoch", "")}
    return positions


class UniSink:
    """The session's sink on a unidirectional connection: pushes only; an error is a disconnect."""

    __slots__ = ("deliver", "transport")
    renderer: Renderer = UNI_JSON
    pings = True  # `{}`, as Centrifugo pings unidirectional clients...
    pongs = False  # ...which cannot answer

    def __init__(self, transport: UniTransport) -> None:
        self.transport = transport
        self.deliver = transport.send

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> None:
        if method == "connect" and "session" not in result:
            # As Centrifugo's unidirectional connect push: an id of this connection's session (the token's
            # `sid` when it has one).
            result = {**result, "session": str(uuid.uuid4())}
        frame = UNI_JSON.reply(command_id, method, result)
        if method == "connect":
            self.transport.connected(frame, _positions(result))
        else:
            self.transport.send(frame)

    def error(self, command_id: int, error: ErrorCode, temporary: bool = False) -> None:
        log.info("closing a unidirectional client after error %d: %s", error.code, error.message)
        self.transport.close(disconnect_for(error))

    def unsubscribed(self, channel: str, code: int, reason: str) -> None:
        self.transport.send(UNI_JSON.unsubscribe_push(channel, code, reason))

    def subscribed(self, channel: str, result: Mapping[str, Any]) -> None:
        self.transport.send(UNI_JSON.subscribe_push(channel, result))

    def message(self, data: bytes) -> None:
        self.transport.send(UNI_JSON.message_push(data))

    def ping(self) -> None:
        self.transport.send(PING_PUSH)

    def close(self, disconnect: Disconnect) -> None:
        self.transport.close(disconnect)


class UniHandler:
    """The socket loop's handler: connect with the request the client sent (at once when it came with
    the HTTP request, or as the first WebSocket message), and ignore anything after it (as Centrifugo)."""

    def __init__(self, session: Session, request: dict[str, Any] | None) -> None:
        self.session = session
        self.request = request
        self.max_frame_bytes = session.settings.max_frame_bytes
        self.started = False

    async def on_open(self) -> None:
        UNI_CONNECTIONS.labels(self.session.transport_name).inc()
        if self.request is not None:
            await self._connect(self.request)

    async def on_frame(self, frame: bytes | str) -> None:
        if self.started:
            return
        try:
            request = connect_request(frame)
        except ProtocolError as exc:
            log.info("closing a uni_websocket client: %s", exc)
            transport = self.session.connection.transport
            if not isinstance(transport, UniWebSocketTransport):
                raise
            self.started = True
            transport.close_unannounced(exc.disconnect)
            return
        await self._connect(request)

    def on_too_large(self, size: int) -> None:
        return

    async def on_close(self, disconnect: Disconnect) -> None:
        UNI_CONNECTIONS.labels(self.session.transport_name).dec()
        await self.session.end(disconnect)

    async def _connect(self, request: dict[str, Any]) -> None:
        self.started = True
        try:
            command = cmd.parse("connect", request, json_frames.encode_data, lambda data: data)
        except ReplyError as exc:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, exc.detail or exc.error.message) from None
        try:
            await self.session.execute(1, command)
        except Refused as refused:
            disconnect = refused.disconnect if refused.error is None else disconnect_for(refused.error.error)
            log.info("refusing a %s client: %s", self.session.transport_name, refused.detail)
            self.session.connection.close(disconnect)


def _session(gateway: Gateway, connection: Connection, transport: UniTransport) -> Session:
    return Session(gateway, connection, UniSink(transport))


# HTTP: uni_sse and uni_http_stream


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def _body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "the client went before its connect request was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the connect request is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def with_last_event_id(request: dict[str, Any], last_event_id: str) -> dict[str, Any]:
    """The connect request with the positions an SSE event id carries (transports/http_stream.py) as its
    subscriptions' recovery positions; they are newer than the URL's (a browser reconnects to the same
    URL), so they win. BadRequest when the header is not one of our ids."""
    try:
        positions = orjson.loads(last_event_id)
    except orjson.JSONDecodeError:
        raise BadRequest(400, "Last-Event-ID is not a stream position of this gateway") from None
    if not isinstance(positions, dict):
        raise BadRequest(400, "Last-Event-ID is not a stream position of this gateway")
    subs = request.get("subs")
    subs = dict(subs) if isinstance(subs, Mapping) else {}
    for channel, position in positions.items():
        if not isinstance(position, dict):
            raise BadRequest(400, "Last-Event-ID is not a stream position of this gateway")
        subs[channel] = {"recover": True, "offset": position.get("offset"), "epoch": position.get("epoch")}
    return {**request, "subs": subs}


class UniHttpEndpoint:
    """An ASGI app for `/connection/uni_sse` (GET with `cf_connect`, or POST) or `/connection/uni_http_stream`
    (POST): the request checked, the client screened and counted, then one connection in the socket loop."""

    def __init__(self, name: str, *, event_stream: bool) -> None:
        self.name = name
        self.event_stream = event_stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Gateway = scope["app"].state.gateway
        settings = gateway.settings
        peer = Peer.of(scope)
        if scope["method"] == "OPTIONS":
            await self._preflight(gateway, peer)(scope, receive, send)
            return
        try:
            request = await self._request(scope, receive, settings.max_frame_bytes)
        except BadRequest as bad:
            log.info("refusing a %s request: %s", self.name, bad.detail)
            await PlainTextResponse(bad.detail, bad.status, headers=_cors(gateway, peer))(scope, receive, send)
            return
        transport = HttpStreamTransport(
            self.name,
            send,
            receive,
            settings.send_buffer_bytes,
            event_stream=self.event_stream,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in _cors(gateway, peer).items()],
            abort=lambda: abort_http(scope),
            socket_of=lambda: stream_socket(scope),
            encoder=GzipStream() if settings.http_stream_gzip and accepts_gzip(scope["headers"]) else None,
            retry_ms=settings.sse_retry_ms,
        )
        connection = Connection(transport, peer, self.name, CommandRate(settings.commands_per_second))
        try:
            gateway.admission.screen(peer, self.name)
            gateway.registry.open(connection)
        except Refused as refused:
            log.info("refusing a %s request from %s: %s", self.name, peer.ip, refused.detail)
            await PlainTextResponse(refused.detail, refused.status)(scope, receive, send)
            return
        try:
            handler = UniHandler(_session(gateway, connection, transport), request)
        except BaseException:
            gateway.registry.close(connection)
            raise
        # A stopping server ends the stream with a shutdown push (the client reconnects elsewhere).
        scope[SHUTDOWN_HOOK] = lambda: transport.close(codes.SHUTDOWN)
        transport.start()
        try:
            await serve(connection, handler, transport.received(), gateway.registry)
        finally:
            await transport.finish()

    def _preflight(self, gateway: Gateway, peer: Peer) -> Response:
        """CORS preflight of a page on another origin (a POST with a JSON body, a Last-Event-ID header):
        allowed for the origins admission allows, as the stream itself is."""
        if peer.origin is None or not gateway.admission.origin_allowed(peer):
            return PlainTextResponse(f"origin {peer.origin!r} is not allowed", 403)
        headers = {
            **_cors(gateway, peer),
            "access-control-allow-methods": "GET, POST, OPTIONS" if self.event_stream else "POST, OPTIONS",
            "access-control-allow-headers": peer.headers.get("access-control-request-headers", ""),
            "access-control-max-age": "300",
        }
        return Response(status_code=204, headers=headers)

    async def _request(self, scope: Scope, receive: Receive, limit: int) -> dict[str, Any]:
        try:
            if scope["method"] == "POST":
                request = connect_request(await _body(receive, limit))
            else:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                raw = query.get(CONNECT_PARAM, [""])[0]
                if len(raw) > limit:
                    raise BadRequest(413, f"the connect request is larger than {limit} bytes")
                request = connect_request(raw)
        except ProtocolError as exc:
            raise BadRequest(400, str(exc)) from None
        if self.event_stream:
            for name, value in scope.get("headers", ()):
                if name == b"last-event-id" and value:
                    return with_last_event_id(request, value.decode("latin-1"))
        return request


def _cors(gateway: Gateway, peer: Peer) -> dict[str, str]:
    """A browser on another origin reads the response only with these: an origin admission allows
    (`allowed_origins`) is named back, with credentials (cookies), as Centrifugo answers."""
    if peer.origin is None or not gateway.admission.origin_allowed(peer):
        return {}
    return {"access-control-allow-origin": peer.origin, "access-control-allow-credentials": "true", "vary": "Origin"}


uni_sse_endpoint = UniHttpEndpoint("uni_sse", event_stream=True)
uni_http_stream_endpoint = UniHttpEndpoint("uni_http_stream", event_stream=False)


# uni_websocket


async def uni_websocket_endpoint(websocket: WebSocket) -> None:
    raw = websocket.query_params.get(CONNECT_PARAM)
    request: dict[str, Any] | None = None
    if raw:
        try:
            request = connect_request(raw)
        except ProtocolError as exc:
            log.info("refusing a uni_websocket handshake: %s", exc)
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(PlainTextResponse(str(exc), 400))
            else:
                await websocket.close(code=codes.BAD_REQUEST_DISCONNECT.code, reason=str(exc)[:120])
            return

    def handler(connection: Connection) -> UniHandler:
        transport: UniWebSocketTransport = connection.transport  # type: ignore[assignment]
        return UniHandler(_session(websocket.app.state.gateway, connection, transport), request)

    await serve_websocket(websocket, "uni_websocket", handler, joiner=None, transport_class=UniWebSocketTransport)
