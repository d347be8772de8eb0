"""Matchmaking over the native protocol: the stock centrifuge-python SDK calls the sim-engine's rooms RPCs
through gateway replicas on real Redis and Kafka. Seats are tied to connections through the gateway's
events on Kafka: held while connected, freed when a client leaves on purpose, kept for the reconnection
window when its gateway is killed -9, and given back to the same user on the other gateway."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from centrifuge.exceptions import ReplyError
from tsunagu_core.testing_clients import subscribed

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
SEAT_TTL = 3.0
NODE_SILENCE = 6.0


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["sim:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def call(client: Client, method: str, data: dict[str, Any]) -> dict[str, Any]:
    result = await client.rpc(method, data)
    answer: dict[str, Any] = result.data
    return answer


async def refused(client: Client, method: str, data: dict[str, Any]) -> ReplyError:
    with pytest.raises(ReplyError) as refusal:
        await call(client, method, data)
    return refusal.value


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` until it holds; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


class Frames(SubscriptionEventHandler):
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


async def move(client: Client, room: str, user: str, p: list[float], frames: Frames) -> None:
    """Publish the input until the room's state shows it (the input consumer may still be joining)."""
    expected = [round(v * 100) for v in p]
    for seq in range(1, 40):
        await client.publish(f"sim:{room}.input", {"seq": int(time.time() * 1000) + seq, "p": p})
        try:
            await frames.wait(lambda f: f.get("e", {}).get(user, [None])[:3] == expected, 0.5)
            return
        except TimeoutError:
            continue
    raise AssertionError(f"{user}'s move never showed in {room}")


async def test_join_or_create_seats_tied_to_connections_and_a_reconnection_across_gateways(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    suffix = uuid.uuid4().hex[:8]
    sim_port = pick_port()
    sim_env = {
        **real_env,
        "TSUNAGU_SIM_CONSUMER_GROUP": f"sim-mm-{suffix}",
        "TSUNAGU_SIM_SEATS_CONSUMER_GROUP": f"sim-mm-seats-{suffix}",
        "TSUNAGU_SIM_KEY_PREFIX": f"tsunagu:sim-mm:{suffix}",
        "TSUNAGU_SIM_SEAT_TTL": str(SEAT_TTL),
        "TSUNAGU_SIM_NODE_SILENCE": str(NODE_SILENCE),
    }
    routes = {
        method: {"url": f"http://127.0.0.1:{sim_port}/v1/rpc/{method}", "allow": "authenticated"}
        for method in ("rooms.join_or_create", "rooms.join", "rooms.list", "rooms.lock", "rooms.unlock")
    }
    gateway_env = {
        **real_env,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_RPC_ROUTES": json.dumps(routes),
    }
    engine = start_service(["serve", "sim-engine"], sim_env, port=sim_port)
    gateways = [start_service(["serve", "ws-gateway"], gateway_env) for _ in range(2)]
    for service in (engine, *gateways):
        await asyncio.to_thread(service.wait_ready, 60)

    def client(user: str, gateway: int) -> Client:
        return Client(f"ws://127.0.0.1:{gateways[gateway].port}/connection/websocket", token=token(user))

    mode = f"m{suffix}"  # a mode of this run only, so no room of another run matches
    duel = {"kind": "avatar", "mode": mode, "region": "eu", "max_clients": 2}
    ann, bob, cid, dan = client("ann", 0), client("bob", 0), client("cid", 1), client("dan", 1)
    clients = [ann, bob, cid, dan]
    for c in clients:
        await c.connect()

    async def count(room: str) -> int:
        rooms = (await call(dan, "rooms.list", {"kind": "avatar"}))["rooms"]
        return next((int(r["clients"]) for r in rooms if r["room"] == room), 0)

    try:
        # The seat watcher reads gateway events from the newest on: wait until it does (a seat freed by
        # an unsubscribe), resubscribing in case the first events went by before its group joined.
        probe = await call(dan, "rooms.join_or_create", {**duel, "region": "probe"})
        probe_sub = await subscribed(dan, f"sim:{probe['room']}")

        async def probe_freed() -> bool:
            if probe_sub.state.value == "subscribed":
                await probe_sub.unsubscribe()
            await asyncio.sleep(0.5)
            if await count(probe["room"]) == 0:
                return True
            await call(dan, "rooms.join", {"room": probe["room"]})
            await probe_sub.subscribe()
            await probe_sub.ready(timeout=10)
            return False

        await eventually(probe_freed, 60, "the seat watcher consumes gateway events")

        # join or create: two of the same kind and filters share a room, other filters make another
        first = await call(ann, "rooms.join_or_create", duel)
        second = await call(bob, "rooms.join_or_create", duel)
        assert second["room"] == first["room"] and second["clients"] == 2
        room = first["room"]
        other = await call(cid, "rooms.join_or_create", {**duel, "region": "us"})
        assert other["room"] != room and other["clients"] == 1
        # the duel room is full: joining it by name is refused (the SDK's rpc() rejects) with a reason
        full = await refused(cid, "rooms.join", {"room": room})
        assert full.code == 409 and full.message == f"full: room {room!r} is full (2 clients)", full
        listed = {r["room"]: r["clients"] for r in (await call(cid, "rooms.list", {"kind": "avatar"}))["rooms"]}
        assert listed[room] == 2 and listed[other["room"]] == 1
        # its creator locks a room (no one new joins), nobody else may
        assert (await refused(dan, "rooms.lock", {"room": other["room"]})).code == 403
        assert (await call(cid, "rooms.lock", {"room": other["room"]}))["locked"] is True
        shut = await refused(dan, "rooms.join", {"room": other["room"]})
        assert shut.code == 423 and shut.message.startswith("locked: "), shut
        assert (await call(cid, "rooms.unlock", {"room": other["room"]}))["locked"] is False

        ann_frames, bob_frames = Frames(), Frames()
        await subscribed(ann, f"sim:{room}", ann_frames)
        await subscribed(bob, f"sim:{room}", bob_frames)
        cid_sub = await subscribed(cid, f"sim:{other['room']}")
        await move(ann, room, "ann", [1.5, 2.0, 0.0], ann_frames)
        await move(bob, room, "bob", [-4.0, 3.25, 0.0], bob_frames)

        # connected clients keep their seats past the seat ttl without asking again
        await asyncio.sleep(SEAT_TTL + 1.0)
        assert await count(room) == 2
        assert (await refused(cid, "rooms.join", {"room": room})).code == 409
        # leaving on purpose frees the seat at once: an unsubscribe from the room, a clean disconnect
        await cid_sub.unsubscribe()
        await eventually(lambda: _is(count(other["room"]), 0), 5, "cid's seat freed by his unsubscribe")
        assert (await call(dan, "rooms.join", {"room": other["room"]}))["clients"] == 1
        await dan.disconnect()
        dan = clients[3] = client("dan", 1)
        await dan.connect()
        await eventually(lambda: _is(count(other["room"]), 0), 5, "dan's seat freed by his clean disconnect")

        # Ann's and Bob's gateway is killed -9: no event says they left, their seats stay reserved
        gateways[0].process.kill()
        gateways[0].process.wait()
        killed_at = time.monotonic()
        # Bob reconnects to the other gateway within the window and gets his seat back, the room full
        bob = clients[1] = client("bob", 1)
        await bob.connect()
        back = await call(bob, "rooms.join", {"room": room})
        assert back["clients"] == 2, back
        assert (await refused(cid, "rooms.join", {"room": room})).code == 409  # Ann's seat is still hers
        # the room's state from a keyframe, with one avatar each: his own not duplicated by the new connection
        bob_frames = Frames()
        await subscribed(bob, f"sim:{room}", bob_frames)
        keyframe = await bob_frames.wait(lambda f: f["type"] == "keyframe")
        assert set(keyframe["e"]) == {"ann", "bob"}, keyframe["e"]
        assert keyframe["e"]["bob"][:3] == [-400, 325, 0] and keyframe["e"]["ann"][:3] == [150, 200, 0]
        await move(bob, room, "bob", [2.0, -1.0, 0.0], bob_frames)
        latest = await bob_frames.wait(lambda f: f["type"] == "keyframe" and f["e"]["bob"][:3] == [200, -100, 0])
        assert set(latest["e"]) == {"ann", "bob"}

        # Ann does not come back: her seat goes seat_ttl + node_silence after her gateway's last heartbeat
        await eventually(lambda: _is(count(room), 1), SEAT_TTL + NODE_SILENCE + 5, "Ann's seat expired")
        gone_after = time.monotonic() - killed_at
        assert gone_after > SEAT_TTL + NODE_SILENCE - 5.0 - 1.0, gone_after  # beats every 5 s
        assert (await call(cid, "rooms.join", {"room": room}))["clients"] == 2
        ann = clients[0] = client("ann", 1)
        await ann.connect()
        late = await refused(ann, "rooms.join", {"room": room})
        assert late.code == 409 and late.message.startswith("full: ")
        # Bob has stayed connected all along: still seated
        assert await count(room) == 2
    finally:
        for c in clients:
            await c.disconnect()


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
