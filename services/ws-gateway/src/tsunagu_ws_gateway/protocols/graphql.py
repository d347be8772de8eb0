"""`/graphql`: a strawberry-graphql schema over the gateway's channels, on ordinary client sessions
(protocols/base.py). Strawberry reads and writes the socket (transports/library.py); the handshake is
screened and counted by admission's gate, `connection_init`'s token admitted by the same admission.

- `subscription { channel(name: "chat:x") { channel offset data } }` over WebSocket with the
  graphql-transport-ws protocol; `connection_init`'s payload carries the JWT as `{token}`. Close codes
  are the protocol's (strawberry speaks it): 4400 bad message, 4401 subscribe before the ack, 4403
  admission refused (a bad, expired or revoked token, a connection limit), 4408 no connection_init in
  time, 4409 a repeated operation id, 4429 a second connection_init; a connection the gateway ends for
  its own reasons closes with the native code
  (3008 slow, 3500 revoked, ...).
- `query { history(channel, limit) { publications { offset data } offset epoch } presence(channel) { client user } }`
  and `mutation { publish(channel, data) { offset epoch } }`, over WebSocket or as HTTP POST with
  `Authorization: Bearer <JWT>` (no or a bad token: HTTP 401 with a JSON message).

Gateway errors (permission denied, ...) are GraphQL errors whose `extensions.code` is the native code.
A connection subscribes to a channel once: a second `channel` subscription to the same channel on one
connection fails with 105 (already subscribed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import timedelta
from typing import Any

import orjson
import strawberry
from fastapi import FastAPI, HTTPException
from fastapi.requests import HTTPConnection
from graphql import GraphQLError
from starlette.websockets import WebSocket
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import BaseContext, GraphQLRouter
from strawberry.scalars import JSON
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import Info
from tsunagu_core.broker import Publication as BrokerPublication

from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import Reply
from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codes import ProtocolError
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession
from tsunagu_ws_gateway.transports.library import CONNECTION_KEY, Gate, LibrarySocket, library_connection

# Close code of graphql-transport-ws for a connection that sent no connection_init in time.
INIT_TIMEOUT = codes.Disconnect(4408, "Connection initialisation timeout")


def _render(channel: str, pub: BrokerPublication) -> bytes:
    return orjson.dumps({"channel": channel, "offset": pub.offset, "data": json_frames.json_data(pub.data)})


RENDERER = AdapterRenderer("graphql", _render)
# The hub hands every subscriber on the node the same bytes: they are parsed once, by the first of them.
_parsed: tuple[bytes, dict[str, Any]] = (b"", {})


def _publication_of(frame: bytes) -> dict[str, Any]:
    global _parsed
    if _parsed[0] is not frame:
        _parsed = (frame, orjson.loads(frame))
    return dict(_parsed[1])


class GatewayContext(BaseContext):
    """One per WebSocket connection, or per HTTP request: its own client session."""

    def __init__(self, gateway: Gateway, connection: Any) -> None:
        super().__init__()
        self.gateway = gateway
        self.connection = connection
        self.bridge = AdapterSession(
            gateway, connection, RENDERER, deliver=self.deliver, close=self.close, on_unsubscribe=self.on_unsubscribe
        )
        transport = connection.transport
        if isinstance(transport, LibrarySocket):
            transport.on_close = self.close
        self.queues: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        self.queued_bytes = 0
        self.closing: codes.Disconnect | None = None
        self.client_closed = False  # the library does not tell a close frame from a lost link
        self.connection_params: dict[str, Any] | None = None

    def deliver(self, frame: bytes) -> None:
        publication = _publication_of(frame)
        queue = self.queues.get(publication["channel"])
        if queue is None:
            return
        self.queued_bytes += len(frame)
        if self.queued_bytes > self.gateway.settings.send_buffer_bytes:
            self.close(codes.SLOW)
            return
        publication["size"] = len(frame)
        queue.put_nowait(publication)

    def on_unsubscribe(self, channel: str, code: int, reason: str) -> None:
        queue = self.queues.get(channel)
        if queue is not None:
            queue.put_nowait(None)

    def close(self, disconnect: codes.Disconnect) -> None:
        if self.closing is not None:
            return
        self.closing = disconnect
        if disconnect is codes.STALE and not self.bridge.connected:
            disconnect = INIT_TIMEOUT
        websocket = self.request
        if isinstance(websocket, WebSocket):
            task = asyncio.get_running_loop().create_task(websocket.close(disconnect.code, disconnect.reason))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def connect(self, token: Any) -> None:
        """Raises Refused (core/refusals.py) or GraphQLError when the client is not let in."""
        if not isinstance(token, str):
            raise GraphQLError("the token must be a string")
        _check(await self.bridge.connect(token))


def _check(reply: Reply) -> None:
    if reply.error is not None:
        raise GraphQLError(reply.error.message, extensions={"code": reply.error.code})


async def _native(info: Info[GatewayContext, None], command: cmd.Command) -> Any:
    bridge = info.context.bridge
    if not bridge.connected:
        raise GraphQLError("unauthorized: send connection_init with {token}", extensions={"code": 101})
    try:
        reply = await bridge.call(command)
    except ProtocolError as exc:
        info.context.close(exc.disconnect)
        raise GraphQLError(str(exc), extensions={"code": exc.disconnect.code}) from None
    _check(reply)
    return reply.result


@strawberry.type
class Publication:
    channel: str
    offset: int
    data: JSON | None


@strawberry.type
class History:
    publications: list[Publication]
    offset: int
    epoch: str


@strawberry.type
class ClientInfo:
    client: str
    user: str


@strawberry.type
class PublishResult:
    offset: int
    epoch: str


@strawberry.type
class Query:
    @strawberry.field(description="The channel's latest publications, oldest first (limit 0: all kept).")
    async def history(self, info: Info[GatewayContext, None], channel: str, limit: int = 0) -> History:
        result = await _native(info, cmd.History(channel, limit=limit))
        publications = [
            Publication(channel=channel, offset=p.offset, data=json_frames.json_value(p.data))
            for p in result.get("publications", [])
        ]
        return History(publications=publications, offset=result.get("offset", 0), epoch=result.get("epoch", ""))

    @strawberry.field(description="The clients subscribed to the channel (namespaces with presence on).")
    async def presence(self, info: Info[GatewayContext, None], channel: str) -> list[ClientInfo]:
        result = await _native(info, cmd.Presence(channel))
        return [ClientInfo(client=c, user=i.user) for c, i in result.get("presence", {}).items()]


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Publish JSON data to the channel, as a client of the native protocol would.")
    async def publish(self, info: Info[GatewayContext, None], channel: str, data: JSON) -> PublishResult:
        try:
            payload = cmd.encode(json_frames.encode_data, data)
        except Exception as exc:
            raise GraphQLError(str(exc), extensions={"code": codes.BAD_REQUEST.code}) from None
        result = await _native(info, cmd.Publish(channel, payload))
        return PublishResult(offset=result.get("offset", 0), epoch=result.get("epoch", ""))


@strawberry.type
class Subscription:
    @strawberry.subscription(description="The channel's publications from now on.")
    async def channel(self, info: Info[GatewayContext, None], name: str) -> AsyncGenerator[Publication, None]:
        context = info.context
        if name in context.queues:
            raise GraphQLError("already subscribed", extensions={"code": codes.ALREADY_SUBSCRIBED.code})
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        context.queues[name] = queue
        subscribed = False
        try:
            await _native(info, cmd.Subscribe(name))
            subscribed = True
            while True:
                item = await queue.get()
                if item is None:
                    return
                context.queued_bytes -= item.pop("size", 0)
                yield Publication(channel=name, offset=item["offset"], data=item["data"])
        finally:
            context.queues.pop(name, None)
            if subscribed and not context.bridge.session.closed:
                with contextlib.suppress(Exception):
                    await context.bridge.call(cmd.Unsubscribe(name))


SCHEMA = strawberry.Schema(query=Query, mutation=Mutation, subscription=Subscription)


async def get_context(connection: HTTPConnection) -> AsyncIterator[GatewayContext]:
    gateway: Gateway = connection.app.state.gateway
    known = connection.scope.get(CONNECTION_KEY)
    context = GatewayContext(gateway, known or library_connection(gateway, connection.scope, "graphql", "http"))
    try:
        if not isinstance(connection, WebSocket):
            header = connection.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(401, "send Authorization: Bearer <token>")
            try:
                await context.connect(token.strip())
            except Refused as exc:
                raise HTTPException(exc.status, f"token refused: {exc.detail}") from None
            except GraphQLError as exc:
                raise HTTPException(401, f"token refused: {exc}") from None
        yield context
    finally:
        await context.bridge.end(context.closing or codes.CONNECTION_CLOSED)


class GatewayGraphQLRouter(GraphQLRouter[GatewayContext, None]):
    async def on_ws_connect(self, context: GatewayContext) -> dict[str, object] | None:
        params = context.connection_params or {}
        try:
            await context.connect(params.get("token", "") if isinstance(params, dict) else "")
        except Refused as exc:
            raise ConnectionRejectionError({"message": exc.detail}) from None
        except GraphQLError as exc:
            raise ConnectionRejectionError({"message": str(exc)}) from None
        return {"client": context.bridge.session.id, "user": context.bridge.session.user}


def build_graphql_app(gateway: Gateway, settings: GatewaySettings) -> Any:
    """`/graphql` as an app of its own (the gateway defers building it: deferred.py), behind admission's gate."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.include_router(build_graphql_router(settings))
    return Gate(app, gateway, "graphql")


def build_graphql_router(settings: GatewaySettings) -> GatewayGraphQLRouter:
    return GatewayGraphQLRouter(
        SCHEMA,
        path="/graphql",
        graphql_ide=None,
        allow_queries_via_get=False,
        context_getter=get_context,  # type: ignore[arg-type]  # a FastAPI yield dependency: it also cleans up
        subscription_protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL],
        connection_init_wait_timeout=timedelta(seconds=settings.connect_timeout),
        max_subscriptions_per_connection=settings.max_channels_per_client,
        # The gate in front has checked the origin with the gateway's one policy (core/admission.py).
        allowed_origins=["*"],
    )
