"""Sockets that a protocol library reads and writes itself (strawberry's graphql-transport-ws,
python-engineio's WebSocket and long-polling): admission still decides at their handshake, and the
registry still counts and closes them.

`Gate` is ASGI middleware in front of such a library: a WebSocket handshake (or a new Engine.IO session)
is screened by admission and counted in the registry as a `Connection` for as long as the library serves
it; the library's own code then admits the credential through the same admission function.
`LibrarySocket` is that connection's transport: what the session sends goes through the library (so
`send` is not used), and `close` is whatever the protocol binds it to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.protocol.codes import Disconnect

log = logging.getLogger("tsunagu.gateway.library")

CONNECTION_KEY = "tsunagu.connection"


def _ignore_close(disconnect: Disconnect) -> None:
    return


class LibrarySocket:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closing: Disconnect | None = None
        self.client_closed = False  # the library does not tell a close frame from a lost link
        self.on_close: Callable[[Disconnect], None] = _ignore_close

    def send(self, frame: bytes) -> None:
        return  # the library writes; sessions of these protocols reach it through their sink

    def close(self, disconnect: Disconnect) -> None:
        if self.closing is None:
            self.closing = disconnect
            self.on_close(disconnect)


def library_connection(gateway: Gateway, scope: Scope, protocol: str, transport: str = "websocket") -> Connection:
    return Connection(
        LibrarySocket(transport), Peer.of(scope), protocol, CommandRate(gateway.settings.commands_per_second)
    )


class Gate:
    """Screens and counts the WebSocket handshakes of `app` (see the module docstring); `counts(scope)`
    says which requests open a connection (default: every WebSocket)."""

    def __init__(
        self,
        app: ASGIApp,
        gateway: Gateway,
        protocol: str,
        opens: Callable[[Scope], bool] | None = None,
        count: bool = True,
    ) -> None:
        self.app = app
        self.gateway = gateway
        self.protocol = protocol
        self.opens = opens or (lambda scope: scope["type"] == "websocket")
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.opens(scope):
            await self.app(scope, receive, send)
            return
        gateway = self.gateway
        connection = library_connection(gateway, scope, self.protocol)
        try:
            gateway.admission.screen(connection.peer, self.protocol)
            if self.count:
                gateway.registry.open(connection)
        except Refused as refused:
            log.info("refusing a %s handshake from %s: %s", self.protocol, connection.peer.ip, refused.detail)
            await _deny(scope, receive, send, refused)
            return
        scope[CONNECTION_KEY] = connection
        try:
            await self.app(scope, receive, send)
        finally:
            if self.count:
                gateway.registry.close(connection)


async def _deny(scope: Scope, receive: Receive, send: Send, refused: Refused) -> None:
    response = PlainTextResponse(refused.detail, refused.status)
    # Starlette renders a response to a WebSocket handshake as the denial-response extension's messages.
    if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": refused.detail[:120]})
