"""Matchmaking over the native protocol: the stock centrifuge-python SDK calls the sim-engine's rooms RPCs
through two gateway replicas on real Redis and Kafka; seats are held in Redis for the reconnection window."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from centrifuge import Client
from centrifuge.exceptions import ReplyError

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
SEAT_TTL = 3.0


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["sim:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def call(client: Client, method: str, data: dict[str, Any]) -> dict[str, Any]:
    result = await client.rpc(method, data)
    answer: dict[str, Any] = result.data
    return answer


async def test_join_or_create_full_rooms_and_a_seat_kept_across_gateways(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    suffix = uuid.uuid4().hex[:8]
    sim_port = pick_port()
    sim_env = {
        **real_env,
        "TSUNAGU_SIM_CONSUMER_GROUP": f"sim-mm-{suffix}",
        "TSUNAGU_SIM_KEY_PREFIX": f"tsunagu:sim-mm:{suffix}",
        "TSUNAGU_SIM_SEAT_TTL": str(SEAT_TTL),
    }
    routes = {
        method: {"url": f"http://127.0.0.1:{sim_port}/v1/rpc/{method}", "allow": "authenticated"}
        for method in ("rooms.join_or_create", "rooms.join", "rooms.list")
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
    ann, bob, cid = client("ann", 0), client("bob", 1), client("cid", 0)
    for c in (ann, bob, cid):
        await c.connect()
    try:
        duel = {"kind": "avatar", "mode": mode, "region": "eu", "max_clients": 2}
        first = await call(ann, "rooms.join_or_create", duel)
        second = await call(bob, "rooms.join_or_create", duel)
        assert second["room"] == first["room"] and second["clients"] == 2
        other = await call(cid, "rooms.join_or_create", {**duel, "region": "us"})
        assert other["room"] != first["room"] and other["clients"] == 1
        # the duel room is full: joining it by name is refused (the SDK's rpc() rejects) with a reason
        with pytest.raises(ReplyError) as full:
            await call(cid, "rooms.join", {"room": first["room"]})
        assert full.value.code == 409 and full.value.message.startswith("full: "), full.value
        assert "is full (2 clients)" in full.value.message
        listed = {r["room"]: r["clients"] for r in (await call(cid, "rooms.list", {"kind": "avatar"}))["rooms"]}
        assert listed[first["room"]] == 2 and listed[other["room"]] == 1

        # Bob drops and comes back on the other gateway within the window: his seat is still his
        await bob.disconnect()
        bob = client("bob", 0)
        await bob.connect()
        back = await call(bob, "rooms.join", {"room": first["room"]})
        assert back["clients"] == 2, back
        # nobody refreshes for longer than the window: the seats are gone, a newcomer takes one
        await asyncio.sleep(SEAT_TTL + 1.0)
        taken = await call(cid, "rooms.join", {"room": first["room"]})
        assert taken["clients"] == 1, taken
        ann_back = await call(ann, "rooms.join", {"room": first["room"]})
        assert ann_back["clients"] == 2
        # Bob returns after the window: the room was refilled while he was away, his seat is gone
        with pytest.raises(ReplyError) as late:
            await call(bob, "rooms.join", {"room": first["room"]})
        assert late.value.code == 409 and late.value.message.startswith("full: ")
    finally:
        for c in (ann, bob, cid):
            await c.disconnect()
