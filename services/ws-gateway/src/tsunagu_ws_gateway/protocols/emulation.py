"""Centrifugo's bidirectional emulation (docs/protocol.md): `/connection/http_stream` and
`/connection/sse` carry the server's replies and pushes, `POST /emulation` the client's commands. What
centrifuge-js falls back to where WebSockets do not pass (`transports: [{transport: 'websocket', ...},
{transport: 'http_stream', ...}, {transport: 'sse', ...}]`).

A stream's request carries the connect command (http_stream: the POST body, JSON or, with
`Content-Type: application/octet-stream`, protobuf; sse: the `cf_connect` URL parameter of a GET, or a
POST body; JSON). The session is the native protocol's (`Session` with the JSON or protobuf codec),
admitted through the one admission path and run by the one socket loop (core/loop.py), whose frames
are the connect request and then each emulation request's commands (transports/emulation.py). The
connect reply names the emulation `session` and `node` the client sends back with every command;
core/emulation.py takes the commands to that session, over the broker when it lives on another replica.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from tsunagu_ws_gateway.core.emulation import EmulationRouter
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.core.loop import serve
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import FrameSink
from tsunagu_ws_gateway.core.session import UNCOUNTED, Session
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import ProtocolError
from tsunagu_ws_gateway.protocol.emulation_frames import BadEmulation, parse_request
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.protocol.protobuf_frames import PROTOBUF
from tsunagu_ws_gateway.protocols.native import NativeHandler
from tsunagu_ws_gateway.protocols.uni import CONNECT_PARAM, BadRequest, _cors
from tsunagu_ws_gateway.transports.emulation import EmulatedStream
from tsunagu_ws_gateway.transports.server import SHUTDOWN_HOOK, abort_http, stream_socket

log = logging.getLogger("tsunagu.gateway.emulation")

PROTOBUF_CONTENT = "application/octet-stream"
# Room for the JSON escaping of the commands inside an emulation request's body.
ENVELOPE_SLACK = 1024


class EmulationSink(FrameSink):
    """The native sink; the connect reply also names the emulation session and this node."""

    __slots__ = ("emulation_node", "emulation_session")

    def __init__(self, codec: Codec, transport: EmulatedStream, session: str, node: str) -> None:
        super().__init__(codec, transport)
        self.emulation_session = session
        self.emulation_node = node

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> None:
        if method == "connect":
            # As Centrifugo: a random id of this connection (not the token's `sid`, which tabs may share).
            result = {**result, "session": self.emulation_session, "node": self.emulation_node}
        super().reply(command_id, method, result)


def _content_type(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower()
    return ""


async def _read_body(receive: Receive, limit: int, what: str) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, f"the client went before its {what} was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the {what} is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _preflight(gateway: Gateway, peer: Peer, methods: str) -> Response:
    if peer.origin is None or not gateway.admission.origin_allowed(peer):
        return PlainTextResponse(f"origin {peer.origin!r} is not allowed", 403)
    headers = {
        **_cors(gateway, peer),
        "access-control-allow-methods": methods,
        "access-control-allow-headers": peer.headers.get("access-control-request-headers", ""),
        "access-control-max-age": "300",
    }
    return Response(status_code=204, headers=headers)


def _check_commands(codec: Codec, data: bytes) -> None:
    """Malformed commands get a 400 here rather than closing the session they were sent to."""
    try:
        codec.decode_commands(data, UNCOUNTED)
    except ProtocolError as exc:
        raise BadRequest(400, str(exc)) from None


class EmulatedStreamEndpoint:
    """An ASGI app for `/connection/http_stream` (POST) or `/connection/sse` (GET with `cf_connect`, or
    POST): one native session, its replies streamed, its further commands from `/emulation`."""

    def __init__(self, name: str, *, event_stream: bool) -> None:
        self.name = name
        self.event_stream = event_stream
        self.methods = "GET, POST, OPTIONS" if event_stream else "POST, OPTIONS"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Gateway = scope["app"].state.gateway
        router: EmulationRouter = scope["app"].state.emulation
        settings = gateway.settings
        peer = Peer.of(scope)
        if scope["method"] == "OPTIONS":
            await _preflight(gateway, peer, self.methods)(scope, receive, send)
            return
        cors = _cors(gateway, peer)
        binary = not self.event_stream and _content_type(scope) == PROTOBUF_CONTENT
        codec: Codec = PROTOBUF if binary else JSON
        try:
            first = await self._request(scope, receive, settings.max_frame_bytes)
            _check_commands(codec, first)
        except BadRequest as bad:
            log.info("refusing a %s request: %s", self.name, bad.detail)
            await PlainTextResponse(bad.detail, bad.status, headers=cors)(scope, receive, send)
            return
        transport = EmulatedStream(
            self.name,
            send,
            receive,
            settings.send_buffer_bytes,
            event_stream=self.event_stream,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in cors.items()],
            abort=lambda: abort_http(scope),
            socket_of=lambda: stream_socket(scope),
            first=first,
            binary=binary,
        )
        connection = Connection(transport, peer, "native", CommandRate(settings.commands_per_second))
        try:
            gateway.admission.screen(peer, self.name)
            gateway.registry.open(connection)
        except Refused as refused:
            log.info("refusing a %s request from %s: %s", self.name, peer.ip, refused.detail)
            await PlainTextResponse(refused.detail, refused.status, headers=cors)(scope, receive, send)
            return
        session_id = router.open(transport)
        try:
            try:
                sink = EmulationSink(codec, transport, session_id, router.node.id)
                handler = NativeHandler(Session(gateway, connection, sink), codec)
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
        finally:
            router.close(session_id)

    async def _request(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        if scope["method"] == "POST":
            data = await _read_body(receive, limit, "connect request")
        else:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            data = query.get(CONNECT_PARAM, [""])[0].encode()
            if len(data) > limit:
                raise BadRequest(413, f"the connect request is larger than {limit} bytes")
        if not data.strip():
            raise BadRequest(400, f"no connect command (the POST body, or the {CONNECT_PARAM} parameter)")
        return data


http_stream_endpoint = EmulatedStreamEndpoint("http_stream", event_stream=False)
sse_endpoint = EmulatedStreamEndpoint("sse", event_stream=True)


class EmulationEndpoint:
    """`POST /emulation`: commands for an emulated session. 204 once they are handed to the session
    (its replies come on its stream); 400 unreadable, 403 origin, 404 no such session or node, 413 too
    large, 429 too many waiting, 503/504 the broker or the other node did not carry it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Gateway = scope["app"].state.gateway
        router: EmulationRouter = scope["app"].state.emulation
        peer = Peer.of(scope)
        if scope["method"] == "OPTIONS":
            await _preflight(gateway, peer, "POST, OPTIONS")(scope, receive, send)
            return
        cors = _cors(gateway, peer)
        limit = gateway.settings.max_frame_bytes
        try:
            if not gateway.admission.origin_allowed(peer):
                raise BadRequest(403, f"origin {peer.origin!r} is not allowed")
            binary = _content_type(scope) == PROTOBUF_CONTENT
            body = await _read_body(receive, 2 * limit + ENVELOPE_SLACK, "emulation request")
            try:
                request = parse_request(body, binary=binary)
            except BadEmulation as exc:
                raise BadRequest(400, str(exc)) from None
            if len(request.data) > limit:
                raise BadRequest(413, f"the commands are larger than {limit} bytes")
            _check_commands(PROTOBUF if binary else JSON, request.data)
        except BadRequest as bad:
            log.info("refusing an emulation request: %s", bad.detail)
            await PlainTextResponse(bad.detail, bad.status, headers=cors)(scope, receive, send)
            return
        outcome = await router.deliver(request.node, request.session, request.data, binary)
        if outcome.status == 204:
            await Response(status_code=204, headers=cors)(scope, receive, send)
            return
        log.info("emulation request for session %s not delivered: %s", request.session, outcome.detail)
        await PlainTextResponse(outcome.detail, outcome.status, headers=cors)(scope, receive, send)


emulation_endpoint = EmulationEndpoint()
