"""What a centrifuge-python client and its subscriptions went through, recorded for the tests to read."""

from __future__ import annotations

from typing import Any

from centrifuge import (
    ClientEventHandler,
    ConnectedContext,
    DisconnectedContext,
    ErrorContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscribedContext,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)


class Events(ClientEventHandler):
    def __init__(self) -> None:
        self.connected: list[ConnectedContext] = []
        self.disconnected: list[DisconnectedContext] = []
        self.errors: list[ErrorContext] = []
        self.server_subscribed: list[ServerSubscribedContext] = []
        self.server_publications: list[ServerPublicationContext] = []

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.connected.append(ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.append(ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        self.errors.append(ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.server_subscribed.append(ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.server_publications.append(ctx)


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.subscribed: list[SubscribedContext] = []
        self.unsubscribed: list[UnsubscribedContext] = []
        self.errors: list[SubscriptionErrorContext] = []
        self.publications: list[Any] = []  # the publications themselves

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.unsubscribed.append(ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        self.errors.append(ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.publications.append(ctx.pub)
