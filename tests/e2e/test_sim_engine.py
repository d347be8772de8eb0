"""sim-engine with two gateway replicas on real Redis and Kafka, driven by the stock centrifuge-python SDK:
authoritative positions for everyone, refusals to the sender, and a resume from the snapshot after kill -9."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from tsunagu_core.testing_clients import subscribed

SECRET = "e2e-secret-long-enough-for-hs256-tokens"


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["sim:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[dict[str, Any]] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)

    async def wait(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.data[seen:]:
                    if condition(frame):
                        return frame
                seen = len(self.data)
                await asyncio.sleep(0.02)


async def move_until(
    client: Client, channel: str, body: dict[str, Any], inbox: Inbox, user: str, timeout: float = 20.0
) -> None:
    """Publish the input until the engine's state shows it (the consumer group may still be joining)."""
    expected = [round(v * 100) for v in body["p"]]
    deadline = time.monotonic() + timeout
    while True:
        body["seq"] = body.get("seq", 0) + 1
        await client.publish(channel, body)
        try:
            await inbox.wait(lambda f: f.get("e", {}).get(user, [None])[:3] == expected, 1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


async def test_avatars_across_two_gateways_refusals_and_resume_after_kill(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    suffix = uuid.uuid4().hex[:8]
    env = {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": "e2e"}
    sim_env = {
        **env,
        "TSUNAGU_SIM_CONSUMER_GROUP": f"sim-e2e-{suffix}",
        "TSUNAGU_SIM_KEY_PREFIX": f"tsunagu:sim-e2e:{suffix}",
        "TSUNAGU_SIM_SNAPSHOT_EVERY": "10",
        "TSUNAGU_SIM_LEASE_TTL": "1.5",
        "TSUNAGU_SIM_SCAN_INTERVAL": "0.3",
    }
    engine = start_service(["serve", "sim-engine"], sim_env)
    gateways = [start_service(["serve", "ws-gateway"], env) for _ in range(2)]
    for service in (engine, *gateways):
        await asyncio.to_thread(service.wait_ready, 60)
    room = f"e2e{suffix}"
    async with httpx.AsyncClient(base_url=engine.base) as http:
        spec = {"room": room, "kind": "avatar", "tick_hz": 20, "keyframe_every": 10, "params": {"max_speed": 1000}}
        created = await http.post("/v1/rooms", json=spec)
        assert created.status_code == 201, created.text

    ann = Client(f"ws://127.0.0.1:{gateways[0].port}/connection/websocket", token=token("ann"))
    bob = Client(f"ws://127.0.0.1:{gateways[1].port}/connection/websocket", token=token("bob"))
    await ann.connect()
    await bob.connect()
    try:
        ann_state, bob_state, ann_replies = Inbox(), Inbox(), Inbox()
        await subscribed(ann, f"sim:{room}", ann_state)
        await subscribed(bob, f"sim:{room}", bob_state)
        await subscribed(ann, "replies:sim#ann", ann_replies)
        inputs = f"sim:{room}.input"
        # Keyframes arrive without any input: a late joiner waits at most one keyframe interval.
        await ann_state.wait(lambda f: f["type"] == "keyframe")

        ann_move = {"p": [1.5, 2.0, 0.0]}
        bob_move = {"p": [-4.0, 3.25, 0.0]}
        await move_until(ann, inputs, ann_move, ann_state, "ann")
        await move_until(bob, inputs, bob_move, bob_state, "bob")
        # Each sees the other's authoritative position, through the other gateway.
        await bob_state.wait(lambda f: f["e"].get("ann", [0])[:3] == [150, 200, 0])
        seen = await ann_state.wait(lambda f: f["e"].get("bob", [0])[:3] == [-400, 325, 0])
        assert seen["room"] == room and seen["q"] == 0.01

        # An input out of the world is refused, with the reason, on Ann's replies channel only.
        ann_move["seq"] += 1
        await ann.publish(inputs, {"seq": ann_move["seq"], "p": [5000, 0, 0]})
        refusal = await ann_replies.wait(lambda f: f.get("type") == "sim.rejected")
        assert (refusal["reason"], refusal["client_seq"], refusal["room"]) == ("out_of_range", ann_move["seq"], room)

        # kill -9 the engine once a snapshot (every 10 ticks, with the keyframe) holds both moves; another
        # replica takes over from the snapshot, at most 10 ticks behind.
        moved_tick = max(f["tick"] for f in ann_state.data)
        await ann_state.wait(lambda f: f["type"] == "keyframe" and f["tick"] > moved_tick)
        await asyncio.sleep(0.2)
        died_tick = max(f["tick"] for f in ann_state.data)
        engine.process.kill()
        engine.process.wait()
        replacement = start_service(["serve", "sim-engine"], sim_env)
        await asyncio.to_thread(replacement.wait_ready, 60)
        before = len(ann_state.data)
        resumed = await ann_state.wait(lambda f: f["type"] == "keyframe" and ann_state.data.index(f) >= before, 15)
        assert resumed["tick"] >= died_tick - 10, (died_tick, resumed["tick"])
        assert resumed["e"]["ann"][:3] == [150, 200, 0] and resumed["e"]["bob"][:3] == [-400, 325, 0]
        async with httpx.AsyncClient(base_url=replacement.base) as http:
            described = (await http.get(f"/v1/rooms/{room}")).json()
            assert described["running_here"] is True
            state = (await http.get(f"/v1/rooms/{room}/state")).json()
            assert state["e"]["bob"][:3] == [-400, 325, 0]
        # Inputs flow again once Kafka hands the room's partition to the new replica.
        ann_move["p"] = [2.0, 2.0, 0.0]
        await move_until(ann, inputs, ann_move, bob_state, "ann", timeout=30)
        async with httpx.AsyncClient(base_url=replacement.base) as http:
            assert (await http.delete(f"/v1/rooms/{room}")).status_code == 200
    finally:
        await ann.disconnect()
        await bob.disconnect()
