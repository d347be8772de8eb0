"""A digital twin room on the real stack: paho-mqtt devices publish telemetry through Mosquitto and mqtt-bridge,
sim-engine moves the room's entities as it arrives, and a user's command from the room reaches the device
exactly once (through Kafka and mqtt-bridge) with a receipt, seen by a stock centrifuge-python client."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import httpx
import jwt
from centrifuge import Client
from tsunagu_core.testing_clients import Inbox, MqttDevice

SECRET = "e2e-twin-secret-long-enough-for-hs256"
MQTT_URL = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["sim:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def latest(frames: list[Any], device: str) -> list[Any] | None:
    for frame in reversed(frames):
        if device in frame.get("e", {}):
            return frame["e"][device]  # type: ignore[no-any-return]
    return None


async def test_a_twin_room_follows_device_telemetry_and_commands_reach_the_device_once(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    prefix = uuid.uuid4().hex[:10]
    user = f"ann{prefix}"
    env = {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET}
    bridge_env = {
        **real_env,
        "TSUNAGU_MQTT_URL": MQTT_URL,
        "TSUNAGU_MQTT_BRIDGE_FILTERS": json.dumps([f"{prefix}/#"]),
        "TSUNAGU_MQTT_BRIDGE_SHARE_GROUP": f"e2e{prefix}",
        "TSUNAGU_MQTT_BRIDGE_CLIENT_ID": f"e2e-twin-bridge-{prefix}",
        "TSUNAGU_MQTT_BRIDGE_CONSUMER_GROUP": f"mqtt-bridge-twin-{prefix}",
    }
    bridge = start_service(["serve", "mqtt-bridge"], bridge_env)
    engine = start_service(
        ["serve", "sim-engine"],
        {
            **env,
            "TSUNAGU_SIM_CONSUMER_GROUP": f"sim-twin-{prefix}",
            "TSUNAGU_SIM_KEY_PREFIX": f"tsunagu:sim-twin:{prefix}",
            "TSUNAGU_SIM_SOURCE_POLL": "0.1",
        },
    )
    gateway = start_service(["serve", "ws-gateway"], env)
    for service in (bridge, engine, gateway):
        await asyncio.to_thread(service.wait_ready, 60)
    rover = await asyncio.to_thread(MqttDevice, int(MQTT_URL.rsplit(":", 1)[1].strip("/")), f"rover-{prefix}")
    await asyncio.to_thread(rover.subscribe, f"{prefix}/rover/set")
    room = f"twin{prefix}"
    devices = {
        "rover": {"telemetry": f"{prefix}/rover/telemetry", "command": f"{prefix}/rover/set"},
        "tank": {"telemetry": f"{prefix}/tank/telemetry", "at": [10, 0]},
    }
    async with httpx.AsyncClient(base_url=engine.base) as http:
        spec = {"room": room, "kind": "twin", "tick_hz": 10, "params": {"devices": devices, "stale_after": 2}}
        created = await http.post("/v1/rooms", json=spec)
        assert created.status_code == 201, created.text

    client = Client(f"ws://127.0.0.1:{gateway.port}/connection/websocket", token=token(user))
    await client.connect()
    try:
        world, receipts = Inbox(), Inbox()
        for channel, inbox in ((f"sim:{room}", world), (f"replies:mqtt#{user}", receipts)):
            subscription = client.new_subscription(channel, events=inbox)
            await subscription.subscribe()
            await subscription.ready(5)

        # The rover drives along x; its entity follows, position and readings.
        for step in range(1, 6):
            body = {"x": step * 1.5, "y": 2.0, "heading": 45, "battery": 100 - step}
            rover.client.publish(f"{prefix}/rover/telemetry", json.dumps(body), qos=1)
            await asyncio.sleep(0.05)
        rover.client.publish(f"{prefix}/tank/telemetry", json.dumps({"level": 0.75}), qos=1)
        async with asyncio.timeout(15):
            while (latest(world.data, "rover") or [0])[:4] != [750, 200, 0, 4500]:
                await asyncio.sleep(0.05)
        seen = latest(world.data, "rover")
        assert seen is not None and seen[4]["v"]["battery"] == 95 and seen[4]["stale"] is False
        async with asyncio.timeout(10):
            while ((latest(world.data, "tank") or [0, 0, 0, 0, {}])[4].get("v") or {}).get("level") != 0.75:
                await asyncio.sleep(0.05)
        assert (latest(world.data, "tank") or [])[:2] == [1000, 0]  # where the room put it
        # Silent for longer than stale_after: shown stale.
        async with asyncio.timeout(10):
            while not (latest(world.data, "rover") or [0, 0, 0, 0, {}])[4].get("stale"):
                await asyncio.sleep(0.05)

        # A command from the room: one message at the device, one receipt for Ann.
        command = {"seq": 1, "command": {"device": "rover", "payload": {"drive": "home"}}}
        await client.publish(f"sim:{room}.input", command)
        await receipts.wait_for(1, timeout=20)
        receipt = receipts.data[0]
        assert receipt["status"] == "delivered" and receipt["command_id"].startswith("twin-"), receipt
        await asyncio.sleep(1.0)
        commands = [payload for topic, payload in rover.received if topic == f"{prefix}/rover/set"]
        assert [json.loads(p) for p in commands] == [{"drive": "home"}]
        assert len(receipts.data) == 1
    finally:
        await client.disconnect()
        rover.close()
