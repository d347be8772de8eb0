"""The stock centrifuge-python SDK against our gateway: connect, subscribe, publish, history, recovery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)
from centrifuge.exceptions import ReplyError


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
