"""What the protocol adapters (JSON-RPC, STOMP, GraphQL, Socket.IO, FHIR, collab) share.

An adapter does not re-implement the gateway: each of its connections owns an ordinary core `Session`
and drives it with typed commands (core/commands.py), so admission, permissions, limits, recovery,
presence, events and fan-out are the native protocol's. The adapter is the session's sink
(`AdapterSession`): a command's reply comes back typed and synchronously, before anything the command
causes (so a subscribe response always precedes the publications buffered while subscribing);
publications come pre-rendered by the adapter's own function, once per node (the hub groups
subscribers by renderer); join/leave pushes have no equivalent in these protocols and render to nothing.

Adapters get no native application-level pings: JSON-RPC and GraphQL connections rely on WebSocket
pings, STOMP on its heart-beats, Socket.IO on Engine.IO's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge
from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.admission import Admitted
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.replies import Renderer, Reply
from tsunagu_ws_gateway.core.session import Session
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import Disconnect, ErrorCode

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

Render = Callable[[str, Publication], bytes]


class AdapterRenderer:
    """An adapter's rendering of what the hub fans out (core/replies.py `Renderer`)."""

    def __init__(self, name: str, render_publication: Render) -> None:
        self.name = name
        self._render = render_publication

    def publication_push(self, channel: str, pub: Publication) -> bytes:
        return self._render(channel, pub)

    def join_push(self, channel: str, info: ClientInfo) -> bytes:
        return b""

    def leave_push(self, channel: str, info: ClientInfo) -> bytes:
        return b""

    def __repr__(self) -> str:
        return f"<renderer {self.name}>"


def _ignore_unsubscribe(channel: str, code: int, reason: str) -> None:
    return


def _ignore_message(data: bytes) -> None:
    return


class AdapterSession:
    """The sink of an adapter connection's session, and the adapter's way to send it typed commands."""

    pings = False
    pongs = False

    def __init__(
        self,
        gateway: Gateway,
        connection: Connection,
        renderer: AdapterRenderer,
        *,
        deliver: Callable[[bytes], None],
        close: Callable[[Disconnect], None],
        on_unsubscribe: Callable[[str, int, str], None] = _ignore_unsubscribe,
        on_message: Callable[[bytes], None] = _ignore_message,
    ) -> None:
        self.protocol = renderer.name
        self.renderer: Renderer = renderer
        self.deliver = deliver
        self._close = close
        self._on_unsubscribe = on_unsubscribe
        self._on_message = on_message
        self._pending: dict[int, Callable[[Reply], None]] = {}
        self._next_id = 0
        self.session = Session(gateway, connection, self, transport_name=renderer.name)
        ADAPTER_CONNECTIONS.labels(self.protocol).inc()
        self._counted = True

    # the session's sink

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> None:
        callback = self._pending.pop(command_id, None)
        if callback is not None:
            callback(Reply(method, result))

    def error(self, command_id: int, error: ErrorCode, temporary: bool = False) -> None:
        callback = self._pending.pop(command_id, None)
        if callback is not None:
            callback(Reply("", error=error, temporary=temporary))

    def unsubscribed(self, channel: str, code: int, reason: str) -> None:
        self._on_unsubscribe(channel, code, reason)

    def subscribed(self, channel: str, result: Mapping[str, Any]) -> None:
        return  # a server-side subscription delivers its publications; these protocols have no push for it

    def message(self, data: bytes) -> None:
        self._on_message(data)

    def ping(self) -> None:
        return

    def close(self, disconnect: Disconnect) -> None:
        self._close(disconnect)

    # the adapter's side

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def user(self) -> str:
        return self.session.user

    async def connect(self, token: str) -> Reply:
        """Admit the connection (core/admission.py); raises `Refused` when admission says no."""
        return await self.call(cmd.Connect(token=token))

    def admitted(self, admitted: Admitted) -> None:
        """For a protocol that admitted the client itself at the handshake (collab): the session is its."""
        self.session.admit(admitted.grant, admitted.principal)

    async def call(self, command: cmd.Command, on_reply: Callable[[Reply], None] | None = None) -> Reply:
        """Run one command; returns its reply. `on_reply` runs as soon as the reply exists, before anything
        the command sends after it (the publications buffered while subscribing). Over the connection's
        command rate the reply is error 111; ProtocolError (3013 when the client keeps on, or a command
        before connect) and Refused (connect) reach the caller."""
        method = command.method
        ADAPTER_COMMANDS.labels(self.protocol, method).inc()
        if not self.session.connection.rate.admit():
            detail = self.session.connection.rate.detail
            error = ErrorCode(codes.TOO_MANY_REQUESTS.code, f"{codes.TOO_MANY_REQUESTS.message}: {detail}")
            ADAPTER_ERRORS.labels(self.protocol, str(error.code)).inc()
            return Reply(method, error=error, temporary=True)
        self._next_id += 1
        command_id = self._next_id
        box: list[Reply] = []

        def done(reply: Reply) -> None:
            reply = Reply(method, reply.result, reply.error, reply.temporary)
            box.append(reply)
            if on_reply is not None:
                on_reply(reply)

        self._pending[command_id] = done
        try:
            await self.session.execute(command_id, command)
        finally:
            self._pending.pop(command_id, None)
        reply = box[0] if box else Reply(method)
        if reply.error is not None:
            ADAPTER_ERRORS.labels(self.protocol, str(reply.error.code)).inc()
        return reply

    async def end(self, disconnect: Disconnect) -> None:
        await self.session.end(disconnect)
        if self._counted:
            self._counted = False
            ADAPTER_CONNECTIONS.labels(self.protocol).dec()


def error_text(reply: Reply) -> str:
    error = reply.error
    return "" if error is None else f"{error.message} (code {error.code})"
