"""Two gateway processes on real Redis and Kafka, driven by the stock centrifuge-python SDK."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from centrifuge import Client, PublicationContext, SubscribedContext, SubscriptionEventHandler
from tsunagu_core import topics
from tsunagu_core.bus import BusMessage
from tsunagu_core.bus.kafka import KafkaBus
from tsunagu_core.envelope import envelope_of, payload_of
from tsunagu_core.testing import KAFKA_BOOTSTRAP
from tsunagu_core.wire.events_pb2 import GatewayEvent

SECRET = "e2e-secret-long-enough-for-hs256-tokens"


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[Any] = []
        self.subscribed: list[SubscribedContext] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.data) < count:
                await asyncio.sleep(0.02)


def gateway_env(real_env: dict[str, str]) -> dict[str, str]:
    return {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": "e2e"}


async def test_replicas_share_channels_and_recover_across_a_restart(start_service, real_env, pick_port) -> None:  # type: ignore[no-untyped-def]
    env = gateway_env(real_env)
    first_port = pick_port()
    first = start_service(["serve", "ws-gateway"], env, port=first_port)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(first.wait_ready)
    await asyncio.to_thread(second.wait_ready)
    channel = f"chat:{uuid.uuid4().hex[:8]}"

    ann = Client(f"ws://127.0.0.1:{first.port}/connection/websocket", token=token("ann"), max_reconnect_delay=0.5)
    bob = Client(f"ws://127.0.0.1:{second.port}/connection/websocket", token=token("bob"))
    await ann.connect()
    await bob.connect()
    ann_inbox, bob_inbox = Inbox(), Inbox()
    await ann.new_subscription(channel, events=ann_inbox, recoverable=True).subscribe()
    bob_sub = bob.new_subscription(channel, events=bob_inbox)
    await bob_sub.subscribe()

    for n in range(5):
        await bob_sub.publish({"n": n})
    await ann_inbox.wait_for(5)
    await bob_inbox.wait_for(5)
    assert ann_inbox.data == bob_inbox.data == [{"n": n} for n in range(5)]

    # Ann's gateway goes away; Bob keeps publishing on the other replica; Ann's gateway comes back.
    assert await asyncio.to_thread(first.stop) == 0
    for n in range(5, 10):
        await bob_sub.publish({"n": n})
    restarted = start_service(["serve", "ws-gateway"], env, port=first_port)
    await asyncio.to_thread(restarted.wait_ready)
    await ann_inbox.wait_for(10)
    await bob_sub.publish({"n": 10})
    await ann_inbox.wait_for(11)
    assert ann_inbox.data == [{"n": n} for n in range(11)], "lost or doubled across the restart"
    assert ann_inbox.subscribed[-1].recovered
    await ann.disconnect()
    await bob.disconnect()


async def test_connections_are_announced_on_kafka(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    user = f"user-{uuid.uuid4().hex[:8]}"
    seen: list[GatewayEvent] = []
    bus = KafkaBus(KAFKA_BOOTSTRAP, client_id="e2e-events")
    await bus.start()

    async def collect(message: BusMessage) -> None:
        event = payload_of(envelope_of(message), GatewayEvent)
        if event.user_id == user:
            assert message.key == user.encode()
            seen.append(event)

    consumer = await bus.consume([topics.GATEWAY_EVENTS], f"e2e-{uuid.uuid4().hex[:6]}", collect)
    client = Client(f"ws://127.0.0.1:{gateway.port}/connection/websocket", token=token(user))
    await client.connect()
    subscription = client.new_subscription("chat:events")
    await subscription.subscribe()
    await subscription.ready()
    await client.disconnect()
    deadline = time.monotonic() + 30
    while len(seen) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await consumer.stop()
    await bus.close()
    kinds = [event.kind for event in seen]
    assert len(kinds) == 4, f"events seen: {kinds}; gateway said: {gateway.stop()} {gateway.output()}"
    assert kinds[:2] == [GatewayEvent.CONNECTED, GatewayEvent.SUBSCRIBED]
    assert set(kinds[2:]) == {GatewayEvent.UNSUBSCRIBED, GatewayEvent.DISCONNECTED}
    assert all(event.channel == "chat:events" for event in seen if event.kind == GatewayEvent.SUBSCRIBED)


JS_DIR = Path(__file__).parent / "js"


async def test_stock_javascript_sdk_publishes_and_recovers(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        "node",
        "native_client.mjs",
        f"ws://127.0.0.1:{gateway.port}/connection/websocket",
        token("ann"),
        channel,
        f"http://127.0.0.1:{gateway.port}/api",
        "e2e",
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert [item["data"]["n"] for item in summary["received"]] == list(range(7))
    assert [item["offset"] for item in summary["received"]] == list(range(1, 8))
    assert summary["historyOffsets"] == [1, 2, 3]
    assert summary["subscribedEvents"][-1] == {"recovered": True, "wasRecovering": True}
    assert summary["forbidden"] == 102  # no `secret` namespace
