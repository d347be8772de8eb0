"""Fossil delta subscriptions on the real stack (Redis broker, Kafka, sim-engine): the stock centrifuge-js SDK
on a ticker, and the sim's world state; bytes on the wire with and without deltas are printed, and the
payloads the clients end with are the ones published."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from centrifuge.fossil import apply_delta

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
JS_DIR = Path(__file__).parent / "js"


def token(user: str, channels: list[str]) -> str:
    claims = {"sub": user, "channels": channels, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def gateway_env(real_env: dict[str, str]) -> dict[str, str]:
    return {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": "e2e"}


@pytest.mark.parametrize("wire_format", ["json", "protobuf"])
async def test_the_stock_js_sdk_follows_a_ticker_through_deltas_and_a_recovery(  # type: ignore[no-untyped-def]
    start_service, real_env, wire_format: str
) -> None:
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    # The stream: namespace allows fossil deltas by default (a Kafka feed's records look alike).
    channel = f"stream:delta{uuid.uuid4().hex[:8]}.acme"
    process = await asyncio.create_subprocess_exec(
        "node",
        "delta_subscriber.mjs",
        f"ws://127.0.0.1:{gateway.port}/connection/websocket",
        token("ann", ["stream:*"]),
        channel,
        f"http://127.0.0.1:{gateway.port}/api",
        "e2e",
        wire_format,
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    received = summary["received"]
    assert [item["n"] for item in received["delta"]] == list(range(50))
    assert received["delta"] == received["full"]
    assert [event["recovered"] for event in summary["subscribed"]] == [False, True]
    stats = summary["stats"]
    # Full: the first publication, the ten recovered ones and the first live one after the recovery.
    assert stats["numFullPayloads"] == 12 and stats["numDeltaPayloads"] == 38, stats
    print(
        f"\n{wire_format}: 50 ticker payloads, {stats['bytesDecoded']} B decoded from {stats['bytesReceived']} B"
        f" received ({stats['bytesReceived'] / stats['bytesDecoded']:.0%})"
    )
    assert stats["bytesReceived"] < stats["bytesDecoded"] * 0.75


async def test_the_sim_world_through_deltas_decodes_to_the_same_states(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    suffix = uuid.uuid4().hex[:8]
    env = gateway_env(real_env)
    sim_env = {
        **env,
        "TSUNAGU_SIM_CONSUMER_GROUP": f"sim-delta-{suffix}",
        "TSUNAGU_SIM_KEY_PREFIX": f"tsunagu:sim-delta:{suffix}",
        "TSUNAGU_SIM_SCAN_INTERVAL": "0.3",
    }
    engine = start_service(["serve", "sim-engine"], sim_env)
    gateway = start_service(["serve", "ws-gateway"], env)
    for service in (engine, gateway):
        await asyncio.to_thread(service.wait_ready, 60)
    room = f"delta{suffix}"
    async with httpx.AsyncClient(base_url=engine.base) as http:
        # Bodies falling under gravity: the world changes every tick without any input.
        spec = {
            "room": room,
            "kind": "physics",
            "tick_hz": 20,
            "keyframe_every": 20,
            "params": {"bodies": 40, "gravity": -9.8, "world": 200},
        }
        created = await http.post("/v1/rooms", json=spec)
        assert created.status_code == 201, created.text

    wanted = 60
    frames: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    sizes: dict[str, int] = {}

    async def follow(name: str, delta: bool) -> None:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/connection/websocket") as ws:
            await ws.send(json.dumps({"id": 1, "connect": {"token": token(name, ["sim:*"])}}))
            await ws.recv()
            subscribe: dict[str, Any] = {"channel": f"sim:{room}"}
            if delta:
                subscribe["delta"] = "fossil"
            await ws.send(json.dumps({"id": 2, "subscribe": subscribe}))
            reply = json.loads(await ws.recv())
            assert reply["subscribe"].get("delta", False) is delta, reply
            frames[name], sizes[name] = [], 0
            previous = b""
            while len(frames[name]) < wanted:
                message = await ws.recv()
                for line in (message if isinstance(message, str) else message.decode()).splitlines():
                    push = json.loads(line).get("push", {})
                    if "pub" not in push:
                        continue
                    data = push["pub"]["data"]
                    if delta:
                        text = data.encode()
                        previous = bytes(apply_delta(previous, text)) if push["pub"].get("delta") else text
                        state = json.loads(previous)
                    else:
                        state = data
                    frames[name].append((state["tick"], state))
                    sizes[name] += len(line.encode())

    await asyncio.wait_for(asyncio.gather(follow("ann", True), follow("bob", False)), 60)
    # The same ticks may not be the first for both (they subscribed a moment apart): compare those both saw.
    by_tick = dict(frames["bob"])
    common = [(tick, state) for tick, state in frames["ann"] if tick in by_tick]
    assert len(common) >= wanted - 5
    assert all(state == by_tick[tick] for tick, state in common)
    per_frame = {name: sizes[name] / wanted for name in sizes}
    print(
        f"\nsim world (40 falling bodies, 20 Hz): {per_frame['bob']:.0f} B per publication in full,"
        f" {per_frame['ann']:.0f} B with fossil deltas ({per_frame['ann'] / per_frame['bob']:.0%})"
    )
    assert sizes["ann"] < sizes["bob"]
