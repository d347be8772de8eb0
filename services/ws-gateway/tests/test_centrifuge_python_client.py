"""The stock centrifuge-python SDK against our gateway: connect, subscribe, publish, history, recovery."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from centrifuge import (
    Client,
    ClientEventHandler,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)
from centrifuge.exceptions import ReplyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tsunagu_core import topics
from tsunagu_core.bus import BusMessage, MemoryBus
from tsunagu_core.envelope import envelope_of, payload_of
from tsunagu_core.testing import free_port, serving
from tsunagu_core.testing_clients import subscribed
from tsunagu_core.wire.events_pb2 import GatewayEvent


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.publications: list[Any] = []
        self.subscribed: list[SubscribedContext] = []
        self.arrived = asyncio.Event()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.publications.append(ctx.pub)
        self.arrived.set()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.publications) < count:
                self.arrived.clear()
                await self.arrived.wait()


class Watch(ClientEventHandler):
    def __init__(self) -> None:
        self.disconnected: asyncio.Future[DisconnectedContext] = asyncio.get_running_loop().create_future()

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(ctx)


async def test_connect_subscribe_publish_and_history(gateway, token) -> None:  # type: ignore[no-untyped-def]
    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]))
    await client.connect()
    inbox = Inbox()
    sub = client.new_subscription("chat:lobby", events=inbox)
    await sub.subscribe()
    for i in range(3):
        await sub.publish({"text": f"hello {i}"})
    await inbox.wait_for(3)
    assert [p.data for p in inbox.publications] == [{"text": f"hello {i}"} for i in range(3)]
    assert [p.offset for p in inbox.publications] == [1, 2, 3]
    assert inbox.publications[0].info.user == "ann"
    history = await sub.history(limit=10)
    assert [p.data["text"] for p in history.publications] == ["hello 0", "hello 1", "hello 2"]
    assert history.offset == 3 and history.epoch
    newest = await sub.history(limit=1, reverse=True)
    assert [p.offset for p in newest.publications] == [3]
    await client.disconnect()


async def test_missed_publications_are_recovered_after_reconnect(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    import httpx

    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]))
    await client.connect()
    inbox = Inbox()
    sub = client.new_subscription("chat:recover", events=inbox, recoverable=True)
    await sub.subscribe()
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        await api.post("/api/publish", json={"channel": "chat:recover", "data": {"n": 1}})
        await inbox.wait_for(1)
        await client.disconnect()
        for n in (2, 3, 4):
            reply = (await api.post("/api/publish", json={"channel": "chat:recover", "data": {"n": n}})).json()
            assert reply["result"]["offset"] == n
        await client.connect()
        await inbox.wait_for(4)
        await api.post("/api/publish", json={"channel": "chat:recover", "data": {"n": 5}})
        await inbox.wait_for(5)
    assert [p.data["n"] for p in inbox.publications] == [1, 2, 3, 4, 5]
    assert inbox.subscribed[-1].was_recovering and inbox.subscribed[-1].recovered
    await client.disconnect()


async def test_forbidden_channel_is_refused_with_103(gateway, token) -> None:  # type: ignore[no-untyped-def]
    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]))
    await client.connect()
    with pytest.raises(ReplyError) as caught:
        await client.publish("news", {"text": "not allowed"})
    assert caught.value.code == 103
    with pytest.raises(ReplyError) as caught:
        await client.publish("nonamespace:x", {"text": "?"})
    assert caught.value.code == 102
    await client.disconnect()


async def test_invalid_token_disconnects_with_3500(gateway) -> None:  # type: ignore[no-untyped-def]
    watch = Watch()
    client = Client(gateway.ws_url, token="not-a-jwt", events=watch)
    await client.connect()
    disconnected = await asyncio.wait_for(watch.disconnected, 5)
    assert disconnected.code == 3500


async def refusing_backend(request: Request) -> JSONResponse:
    """An RPC backend that refuses as the platform's services do: 4xx with `{error, message}`."""
    method = (await request.json())["method"]
    if method == "rooms.join":
        return JSONResponse({"error": "full", "message": "room 'duel' is full (2 clients)"}, status_code=409)
    if method == "rooms.coded":
        body = {"error": "busy", "message": "try again", "code": 1503, "temporary": True}
        return JSONResponse(body, status_code=429)
    if method == "rooms.bare":  # a 4xx without the shape: the older mapping
        return JSONResponse({"detail": "nope"}, status_code=422)
    return JSONResponse({"room": "duel"})


async def test_a_backend_refusal_rejects_rpc_with_its_code_and_message(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    app = Starlette(routes=[Route("/rpc", refusing_backend, methods=["POST"])])
    methods = ("rooms.join", "rooms.coded", "rooms.bare", "rooms.list")
    routes = {m: {"url": f"http://127.0.0.1:{port}/rpc", "allow": "authenticated"} for m in methods}
    async with serving(app, port), start_gateway(rpc_routes=routes) as gw:
        client = Client(gw.ws_url, token=token("ann", []))
        await client.connect()
        try:
            with pytest.raises(ReplyError) as refused:
                await client.rpc("rooms.join", {"room": "duel"})
            assert refused.value.code == 409
            assert refused.value.message == "full: room 'duel' is full (2 clients)"
            assert not refused.value.temporary
            with pytest.raises(ReplyError) as coded:
                await client.rpc("rooms.coded", {})
            assert (coded.value.code, coded.value.message, coded.value.temporary) == (1503, "busy: try again", True)
            with pytest.raises(ReplyError) as bare:
                await client.rpc("rooms.bare", {})
            assert bare.value.code == 100 and "422" in bare.value.message
            # the connection stays and answers the next call
            assert (await client.rpc("rooms.list", {})).data == {"room": "duel"}
        finally:
            await client.disconnect()


async def test_connection_events_tell_a_client_leaving_from_a_lost_connection(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    """What the matchmaker ties seats to: a client's own unsubscribe (code 0), a close on purpose
    (`client_closed`), a connection lost without a close frame (not `client_closed`)."""
    bus = MemoryBus()
    events: list[GatewayEvent] = []

    async def keep(message: BusMessage) -> None:
        event = payload_of(envelope_of(message), GatewayEvent)
        if event.kind != GatewayEvent.NODE_HEARTBEAT:
            events.append(event)

    await bus.consume([topics.GATEWAY_EVENTS], "test", keep)

    async def seen(user: str, kind: int, channel: str = "") -> GatewayEvent:
        async with asyncio.timeout(5):
            while True:
                for e in events:
                    if (e.user_id, e.kind, e.channel) == (user, kind, channel):
                        return e
                await asyncio.sleep(0.02)

    async with start_gateway(bus=bus) as gw:
        ann = Client(gw.ws_url, token=token("ann", ["sim:*"]))
        await ann.connect()
        room = await subscribed(ann, "sim:duel")
        await subscribed(ann, "sim:other")
        await room.unsubscribe()
        own = await seen("ann", GatewayEvent.UNSUBSCRIBED, "sim:duel")
        assert own.code == 0 and not own.client_closed
        await ann.disconnect()
        left = await seen("ann", GatewayEvent.DISCONNECTED)
        assert left.client_closed and left.code == 3000
        ending = await seen("ann", GatewayEvent.UNSUBSCRIBED, "sim:other")
        assert ending.code == 3000 and ending.client_closed

        # a connection that just drops (no close frame: the peer's TCP ends, as when a client is killed)
        bob = await websockets.connect(gw.ws_url)
        await bob.send(json.dumps({"id": 1, "connect": {"token": token("bob", ["sim:*"])}}))
        await bob.send(json.dumps({"id": 2, "subscribe": {"channel": "sim:duel"}}))
        await seen("bob", GatewayEvent.SUBSCRIBED, "sim:duel")
        bob.transport.abort()
        lost = await seen("bob", GatewayEvent.DISCONNECTED)
        assert not lost.client_closed and lost.code == 3000
        assert (await seen("bob", GatewayEvent.UNSUBSCRIBED, "sim:duel")).code == 3000
