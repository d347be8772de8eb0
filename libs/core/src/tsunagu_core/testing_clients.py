"""What several tests do with the stock clients (test dependencies: centrifuge-python, websockets):
collect a subscription's publications, and carry pycrdt's Yjs provider over a `websockets` connection."""

from __future__ import annotations

import asyncio
from typing import Any

from centrifuge import Client, PublicationContext, Subscription, SubscriptionEventHandler  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection


class Inbox(SubscriptionEventHandler):
    """The data of every publication a subscription received, in order."""

    def __init__(self) -> None:
        self.data: list[Any] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.data) < count:
            assert loop.time() < deadline, f"{count} publications expected within {timeout:.0f}s, got {self.data}"
            await asyncio.sleep(0.02)


async def subscribed(
    client: Client, channel: str, events: SubscriptionEventHandler | None = None, **options: Any
) -> Subscription:
    """A subscription the server has confirmed: centrifuge-python's subscribe() only sends the command, so
    a publication made right after it may come before the subscription exists and never arrive."""
    subscription = client.new_subscription(channel, events, **options)
    await subscription.subscribe()
    await subscription.ready(timeout=10)
    return subscription


class WebsocketChannel:
    """pycrdt's Channel (what its Provider reads and writes) over a `websockets` client connection."""

    def __init__(self, websocket: ClientConnection, path: str) -> None:
        self.websocket = websocket
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> WebsocketChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except Exception:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        await self.websocket.send(message)

    async def recv(self) -> bytes:
        message = await self.websocket.recv()
        return message if isinstance(message, bytes) else message.encode()
