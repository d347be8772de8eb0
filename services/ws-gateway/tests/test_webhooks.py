"""Webhooks: the gateway's events POSTed, signed, to the application's endpoint; retried while it is down,
dead-lettered past `retry_for`, resumed after a restart. A real receiver (FastAPI on a loopback port)
verifies the signatures with the Standard Webhooks library."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from centrifuge import Client
from fastapi import FastAPI, Request, Response
from standardwebhooks import Webhook
from tsunagu_core import topics
from tsunagu_core.bus import DEAD_LETTER_SUFFIX, BusMessage, MemoryBus
from tsunagu_core.envelope import publish_event
from tsunagu_core.testing import eventually, free_port, serving
from tsunagu_core.wire.events_pb2 import GatewayEvent
from tsunagu_ws_gateway.config import WebhookEndpoint
from tsunagu_ws_gateway.webhooks import Relays

from .conftest import make_token, running_gateway

OLD_SECRET = "whsec_" + base64.b64encode(b"the old webhook secret of the app").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"the new webhook secret of the app").decode()


@dataclass
class Receiver:
    port: int
    # Every delivery as it arrived: webhook-id -> bodies (a redelivery appends).
    bodies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    verified_with: dict[str, set[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [bodies[0] for bodies in self.bodies.values() if bodies[0]["type"] == kind]


@contextlib.asynccontextmanager
async def receiver(port: int | None = None) -> AsyncIterator[Receiver]:
    received = Receiver(port or free_port())
    app = FastAPI()

    @app.post("/hooks")
    async def hook(request: Request) -> Response:
        raw = await request.body()
        names = set()
        for name, secret in (("old", OLD_SECRET), ("new", NEW_SECRET)):
            with contextlib.suppress(Exception):
                Webhook(secret).verify(raw, dict(request.headers))
                names.add(name)
        if not names:
            return Response(status_code=401)
        webhook_id = request.headers["webhook-id"]
        received.bodies.setdefault(webhook_id, []).append(orjson.loads(raw))
        received.verified_with[webhook_id] = names
        return Response(status_code=204)

    async with serving(app, received.port):
        yield received


def endpoint(url: str, **options: Any) -> WebhookEndpoint:
    return WebhookEndpoint(
        url=url, events=["connect", "disconnect", "subscribe"], secrets=[NEW_SECRET, OLD_SECRET], **options
    )


async def emit(bus: MemoryBus, user: str, kind: int = GatewayEvent.CONNECTED) -> None:
    event = GatewayEvent(kind=kind, node="n1", client_id=f"c-{user}", user_id=user)  # type: ignore[arg-type]
    await publish_event(bus, topics.GATEWAY_EVENTS, "gateway.event", event, key=user, source="test")


async def test_the_gateways_events_reach_the_endpoint_signed_with_every_current_secret() -> None:
    async with receiver() as app:
        webhooks = {
            "app": {
                "url": app.url,
                "events": ["connect", "subscribe", "disconnect"],
                "secrets": [NEW_SECRET, OLD_SECRET],
            }
        }
        async with running_gateway(webhooks=webhooks) as gateway:
            client = Client(gateway.ws_url, token=make_token("ann", ["chat:*"]))
            await client.connect()
            sub = client.new_subscription("chat:hooked")
            await sub.subscribe()
            await sub.ready(timeout=5)
            await client.disconnect()
            await eventually(lambda: len(app.of_type("disconnect")) == 1, timeout=10)
        [connect] = app.of_type("connect")
        assert connect["data"]["user"] == "ann" and connect["data"]["client"]
        [subscribe] = app.of_type("subscribe")
        assert subscribe["data"]["channel"] == "chat:hooked"
        [disconnect] = app.of_type("disconnect")
        assert disconnect["data"]["user"] == "ann" and "code" in disconnect["data"]
        # Unasked-for events (unsubscribe) are not sent; each delivery is signed with both secrets.
        assert app.of_type("unsubscribe") == []
        assert all(names == {"old", "new"} for names in app.verified_with.values())


async def test_an_endpoint_down_for_a_while_gets_every_event_afterwards_once_by_id() -> None:
    bus = MemoryBus()
    port = free_port()
    relays = Relays(bus, {"app": endpoint(f"http://127.0.0.1:{port}/hooks", first_backoff=0.1, max_backoff=0.5)})
    await relays.start()
    try:
        users = [f"user-{n}" for n in range(20)]
        for user in users:
            await emit(bus, user)
        await asyncio.sleep(3)  # nobody listens on the port meanwhile: every attempt fails
        async with receiver(port) as app:
            await eventually(lambda: len(app.bodies) == len(users), timeout=15)
            await asyncio.sleep(0.5)
            delivered = sorted(body[0]["data"]["user"] for body in app.bodies.values())
            assert delivered == sorted(users)
            # One delivery per event: the relay moves on only after a 2xx.
            assert all(len(bodies) == 1 for bodies in app.bodies.values())
    finally:
        await relays.stop()


async def test_a_relay_stopped_while_retrying_delivers_after_its_restart() -> None:
    bus = MemoryBus()
    port = free_port()
    options = {"first_backoff": 0.1, "max_backoff": 0.2}
    first = Relays(bus, {"app": endpoint(f"http://127.0.0.1:{port}/hooks", **options)})
    await first.start()
    await emit(bus, "ann")
    await asyncio.sleep(1)  # retrying: nobody listens
    await first.stop()
    async with receiver(port) as app:
        # The same group on a new process start: the event was never committed, so it comes again.
        second = Relays(bus, {"app": endpoint(app.url, **options)})
        await second.start()
        try:
            await eventually(lambda: len(app.bodies) == 1, timeout=10)
            assert next(iter(app.bodies.values()))[0]["data"]["user"] == "ann"
        finally:
            await second.stop()


async def test_an_event_undelivered_past_retry_for_goes_to_the_dead_letter_topic() -> None:
    bus = MemoryBus()
    dead: list[BusMessage] = []

    async def keep(message: BusMessage) -> None:
        dead.append(message)

    await bus.consume([topics.GATEWAY_EVENTS + DEAD_LETTER_SUFFIX], "dead-letters", keep)
    relays = Relays(bus, {"app": endpoint(f"http://127.0.0.1:{free_port()}/hooks", first_backoff=0.1, retry_for=1)})
    await relays.start()
    try:
        await emit(bus, "ann")
        await eventually(lambda: len(dead) == 1, timeout=10)
        # Given up on, it holds back nothing: the next event is tried at once.
        await emit(bus, "bob")
        await eventually(lambda: len(dead) == 2, timeout=10)
    finally:
        await relays.stop()
