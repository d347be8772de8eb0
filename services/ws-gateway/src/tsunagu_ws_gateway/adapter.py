"""What the protocol adapters (JSON-RPC at /rpc, GraphQL at /graphql, STOMP at /stomp) share.

An adapter does not re-implement the gateway: each of its connections owns an ordinary
`ClientSession` and translates its protocol into the session's commands (connect, subscribe,
publish, history, presence), so permissions, limits, recovery, presence, events and fan-out are
the native protocol's. The session talks to a `Bridge` (its transport) through a `BridgeCodec`:

- replies come back as the JSON protocol's reply (`{"id": n, "<method>": result}` or `{"id": n,
  "error": ...}`) behind a marker byte, and the bridge hands them, synchronously, to whoever sent the
  command, so a subscribe response is always queued before the publications that follow it;
- publications are rendered by the adapter's own function once per node and protocol (the hub
  groups subscribers by codec) and handed to the adapter as they are;
- unsubscribe and message pushes come back behind their own marker bytes; join/leave and
  server-side subscribe pushes have no equivalent in these protocols and are dropped.

The adapters have no use for the native protocol's application-level pings (`ping_frame` is empty):
JSON-RPC and GraphQL connections rely on WebSocket pings, STOMP on its heart-beats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from prometheus_client import Counter, Gauge
from starlette.websockets import WebSocket

from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codes import ErrorCode, ProtocolError
from tsunagu_ws_gateway.session import ClientSession, Gateway
from tsunagu_ws_gateway.websocket import SocketTransport, origin_allowed

log = logging.getLogger("tsunagu.gateway.adapter")

ADAPTER_CONNECTIONS = Gauge(
    "tsunagu_gateway_adapter_connections", "Open connections of a protocol adapter", ["protocol"]
)
ADAPTER_COMMANDS = Counter(
    "tsunagu_gateway_adapter_commands_total", "Commands handled by a protocol adapter", ["protocol", "method"]
)
ADAPTER_ERRORS = Counter(
    "tsunagu_gateway_adapter_errors_total", "Adapter commands answered with an error", ["protocol", "code"]
)

REPLY = 0
UNSUBSCRIBE = 1
MESSAGE = 2

Render = Callable[[str, Any], bytes]
Reply = dict[str, Any]


class BridgeCodec:
    """The session's codec for one adapter protocol (see the module docstring)."""

    separator = b"\n"
    binary = False
    ping_frame = b""

    def __init__(self, name: str, render_publication: Render) -> None:
        self.name = name
        self._render = render_publication

    def decode_commands(self, frame: bytes | str, max_commands: int) -> list[dict[str, Any]]:
        raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{self.name} connections do not send native frames")

    def payload(self, data: Any) -> bytes:
        # Adapters hand over parsed JSON values, or bytes as they came (a STOMP body).
        return data if isinstance(data, bytes) else json_frames.encode_data(data)

    def rpc_data(self, data: Any) -> Any:
        return data

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> bytes:
        return bytes([REPLY]) + json_frames.reply(command_id, method, result)

    def error_reply(self, command_id: int, error: ErrorCode, temporary: bool = False) -> bytes:
        return bytes([REPLY]) + json_frames.error_reply(command_id, error, temporary)

    def publication_push(self, channel: str, pub: Any) -> bytes:
        return self._render(channel, pub)

    def join_push(self, channel: str, info: Any) -> bytes:
        return b""

    def leave_push(self, channel: str, info: Any) -> bytes:
        return b""

    def unsubscribe_push(self, channel: str, code: int, reason: str) -> bytes:
        return bytes([UNSUBSCRIBE]) + orjson.dumps({"channel": channel, "code": code, "reason": reason})

    def subscribe_push(self, channel: str, result: Mapping[str, Any]) -> bytes:
        return b""

    def message_push(self, data: bytes) -> bytes:
        return bytes([MESSAGE]) + data

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


class Bridge:
    """The transport of an adapter connection's session, and the adapter's way to send it commands."""

    def __init__(
        self,
        gateway: Gateway,
        codec: BridgeCodec,
        *,
        deliver: Callable[[bytes], None],
        close: Callable[[codes.Disconnect], None],
        on_unsubscribe: Callable[[str, int, str], None] | None = None,
        on_message: Callable[[bytes], None] | None = None,
    ) -> None:
        self.protocol = codec.name
        self._deliver = deliver
        self._close = close
        self._on_unsubscribe = on_unsubscribe
        self._on_message = on_message
        self._pending: dict[int, Callable[[Reply], None]] = {}
        self._next_id = 0
        self.session = ClientSession(gateway, self, codec=codec, transport_name=codec.name)
        ADAPTER_CONNECTIONS.labels(self.protocol).inc()
        self._counted = True

    # the session's transport

    def send(self, frame: bytes) -> None:
        if not frame:
            return
        kind = frame[0]
        if kind == REPLY:
            reply = orjson.loads(frame[1:])
            callback = self._pending.pop(reply.get("id", 0), None)
            if callback is not None:
                callback(reply)
        elif kind == UNSUBSCRIBE:
            if self._on_unsubscribe is not None:
                push = orjson.loads(frame[1:])
                self._on_unsubscribe(push["channel"], push["code"], push["reason"])
        elif kind == MESSAGE:
            if self._on_message is not None:
                self._on_message(frame[1:])
        else:
            self._deliver(frame)

    def close(self, disconnect: codes.Disconnect) -> None:
        self._close(disconnect)

    # the adapter's side

    @property
    def connected(self) -> bool:
        return self.session.connected

    async def call(
        self, method: str, request: dict[str, Any], on_reply: Callable[[Reply], None] | None = None
    ) -> Reply:
        """Run one native command; returns its reply (`{method: result}` or `{"error": {code, message}}`).

        `on_reply` runs as soon as the reply exists, before anything the command sends after it (the
        publications buffered while subscribing). Raises ProtocolError when the command ends the connection.
        """
        if not self.session.limiter.take():
            raise ProtocolError(codes.TOO_MANY_REQUESTS_DISCONNECT)
        ADAPTER_COMMANDS.labels(self.protocol, method).inc()
        self._next_id += 1
        command_id = self._next_id
        box: list[Reply] = []

        def done(reply: Reply) -> None:
            box.append(reply)
            if on_reply is not None:
                on_reply(reply)

        self._pending[command_id] = done
        try:
            await self.session.handle_command({"id": command_id, method: request})
        finally:
            self._pending.pop(command_id, None)
        reply = box[0] if box else {method: {}}
        error = reply.get("error")
        if error is not None:
            ADAPTER_ERRORS.labels(self.protocol, str(error.get("code"))).inc()
        return reply

    async def end(self, disconnect: codes.Disconnect) -> None:
        await self.session.close(disconnect)
        if self._counted:
            self._counted = False
            ADAPTER_CONNECTIONS.labels(self.protocol).dec()


class MessageOutbox(SocketTransport):
    """The socket writer of an adapter: like the native one (bounded, never blocks, 3008 for a client
    that does not read) but every frame is a WebSocket text message of its own, as stock JSON-RPC and
    STOMP clients expect."""

    async def write_loop(self) -> None:
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
                for frame in batch:
                    await websocket.send_text(frame.decode())
            if self.closing is not None and not self.frames:
                await websocket.close(self.closing.code, self.closing.reason)
                return


async def refuse(websocket: WebSocket, gateway: Gateway) -> bool:
    """Refuse the handshake as the native endpoint does (draining node, origin not allowed)."""
    if gateway.node.draining or not origin_allowed(websocket, gateway.settings.allowed_origins):
        await websocket.close(code=1008)
        return True
    return False


def start_writer(outbox: MessageOutbox) -> None:
    outbox.reader = asyncio.current_task()
    outbox.writer = asyncio.create_task(outbox.write_loop(), name="adapter-writer")


async def finish(outbox: MessageOutbox, bridge: Bridge) -> None:
    """Once the reading ends: forget the session, let the writer send what is queued and close."""
    await bridge.end(outbox.closing or codes.CONNECTION_CLOSED)
    if outbox.closing is None:
        outbox.closing = codes.CONNECTION_CLOSED
        outbox.wake()
    writer = outbox.writer
    if writer is not None and not writer.done():
        try:
            await asyncio.wait_for(writer, 5.0)
        except (TimeoutError, asyncio.CancelledError, Exception):
            writer.cancel()
    elif writer is not None and not writer.cancelled() and writer.exception() is not None:
        log.debug("adapter writer ended with %s", writer.exception())
