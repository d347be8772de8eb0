"""Remote control of a device over WebRTC with the MQTT command path as fallback.

A Chromium page (clients/js DeviceControl) and the aiortc device agent (`tsunagu device-agent`'s
DeviceAgent), each on its own gateway replica, set up a data channel through the platform's signaling. The
agent's link is dropped mid-stream: the commands the channel did not confirm and all later ones arrive over
Kafka, mqtt-bridge and Mosquitto. The device carries out each of the 1,000 commands once, in order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from centrifuge import Client
from tsunagu_core.testing import require_stack

from tsunagu.device_agent import DeviceAgent

REPO = Path(__file__).resolve().parents[2]
JS = Path(__file__).parent / "js"
SECRET = "e2e-device-secret-long-enough-for-hs256"
MQTT_URL = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")
COMMANDS = 1000


def token(user: str, channels: list[str]) -> str:
    return jwt.encode({"sub": user, "channels": channels, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("device-control")
    tsc = REPO / "clients" / "js" / "node_modules" / ".bin" / "tsc"
    config = REPO / "clients" / "js" / "tsconfig.build.json"
    flags = ["--declaration", "false", "--declarationMap", "false", "--sourceMap", "false"]
    subprocess.run([str(tsc), "-p", str(config), "--outDir", str(out), *flags], check=True, timeout=120)
    return out


async def test_commands_over_the_data_channel_then_over_mqtt_arrive_once_in_order(  # type: ignore[no-untyped-def]
    start_service, real_env, helper
) -> None:
    require_stack("the device control test")
    from tsunagu.browser import find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.fail("no Chromium: run `python -m tsunagu.browser` (make test does) or set TSUNAGU_CHROMIUM")
    prefix = uuid.uuid4().hex[:10]
    device, operator, topic = f"rover{prefix}", f"ann{prefix}", f"{prefix}/rover/set"
    bridge = start_service(
        ["serve", "mqtt-bridge"],
        {
            **real_env,
            "TSUNAGU_MQTT_URL": MQTT_URL,
            "TSUNAGU_MQTT_BRIDGE_FILTERS": json.dumps([f"{prefix}/telemetry/#"]),
            "TSUNAGU_MQTT_BRIDGE_SHARE_GROUP": f"e2e{prefix}",
            "TSUNAGU_MQTT_BRIDGE_CLIENT_ID": f"e2e-device-bridge-{prefix}",
            "TSUNAGU_MQTT_BRIDGE_CONSUMER_GROUP": f"mqtt-bridge-device-{prefix}",
        },
    )
    # The page on one gateway, the device on the other: the signaling crosses replicas.
    gateways = [
        start_service(["serve", "ws-gateway"], {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET})
        for _ in range(2)
    ]
    for service in (bridge, *gateways):
        await asyncio.to_thread(service.wait_ready, 60)

    done: list[int] = []

    def carry_out(command_id: str, payload: Any, path: str) -> None:
        done.append(int(payload["n"]))

    client = Client(f"ws://127.0.0.1:{gateways[1].port}/connection/websocket", token=token(device, []))
    await client.connect()
    agent = DeviceAgent(client, device, [operator], carry_out)
    await agent.start()
    mqtt = asyncio.create_task(agent.run_mqtt(MQTT_URL, topic, f"e2e-device-{prefix}"))
    await asyncio.wait_for(agent.mqtt_ready.wait(), 15)

    async def drop_midway() -> None:
        while len(done) < COMMANDS // 2:
            await asyncio.sleep(0.005)
        await agent.drop(operator)

    dropper = asyncio.create_task(drop_midway())
    options = {
        "chromium": chromium,
        "helper": str(helper),
        "base": gateways[0].base,
        "user": operator,
        "token": token(operator, ["mqtt:*"]),
        "device": device,
        "commandTopic": topic,
        "commands": COMMANDS,
        "pauseMs": 3,
    }
    try:
        node = await asyncio.create_subprocess_exec(
            "node", "device_control.mjs", json.dumps(options), cwd=JS, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(node.communicate(), 120)
        assert node.returncode == 0, err.decode()[-3000:]
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["errors"] == [], result["errors"]
        await asyncio.wait_for(dropper, 5)
        deadline = time.monotonic() + 60
        while len(done) < COMMANDS:
            assert time.monotonic() < deadline, (
                f"{len(done)} of {COMMANDS} carried out (last {done[-3:]}, paths {set(agent.received.paths)});"
                f" the page: paths {result['paths']}, sent over {[p for _, p in result['sent']].count('mqtt')} mqtt"
            )
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # nothing more arrives
    finally:
        dropper.cancel()
        mqtt.cancel()
        await asyncio.gather(mqtt, return_exceptions=True)
        await agent.close()
        await client.disconnect()
    assert done == list(range(1, COMMANDS + 1)), "each command once, in order"
    paths = agent.received.paths
    first_mqtt = paths.index("mqtt")
    assert set(paths[:first_mqtt]) == {"webrtc"} and set(paths[first_mqtt:]) == {"mqtt"}
    assert first_mqtt >= COMMANDS // 2
    # The page switched paths once, told by DeviceControl, and sent the later commands over MQTT.
    assert result["paths"] == ["webrtc", "mqtt"]
    assert result["sent"][-1][1] == "mqtt"
    print(
        f"\n{first_mqtt} commands over the data channel, {COMMANDS - first_mqtt} over MQTT,"
        f" {agent.received.duplicates} resends dropped as duplicates"
    )


async def test_the_agent_carries_out_a_command_id_once_whichever_path_brings_it() -> None:
    done: list[tuple[str, Any, str]] = []
    agent = DeviceAgent(
        None, "rover", ["ann"], lambda command_id, payload, path: done.append((command_id, payload, path))
    )
    assert await agent.command(b'{"id": "a-1", "payload": {"go": 1}}', "webrtc") == "a-1"
    assert await agent.command(b'{"id": "a-1", "payload": {"go": 1}}', "mqtt") == "a-1"  # acknowledged again
    assert await agent.command(b'{"id": "a-2", "payload": null}', "mqtt") == "a-2"
    assert await agent.command(b"not json", "mqtt") is None
    assert await agent.command(b'{"payload": 1}', "webrtc") is None  # no id: nothing to deduplicate by
    assert done == [("a-1", {"go": 1}, "webrtc"), ("a-2", None, "mqtt")]
    assert agent.received.duplicates == 1
