"""Device command round trips, same run: over the WebRTC data channel against over the platform's MQTT path.

A Chromium page (clients/js DeviceControl) and the aiortc device agent (`tsunagu device-agent`'s DeviceAgent)
on the stack (Redis, Kafka, Mosquitto), a gateway and mqtt-bridge started here. One command at a time:
- data channel: page → agent, acknowledged on the channel;
- MQTT path: a publish to `mqtt:<command topic>` (gateway → Kafka → mqtt-bridge → Mosquitto → agent), the
  agent acknowledging on its ack topic (Mosquitto → mqtt-bridge → Redis → gateway → page).
p50/p99 of each; and the age of the agent's telemetry samples on arrival in the page (20 a second, each by both
paths; the agent and the page share the host's clock). Raw results in bench/results/device-rtt-*.json.

    eval "$(tsunagu stack env)"; python bench/device_rtt.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import jwt
from centrifuge import Client

sys.path.insert(0, str(Path(__file__).parent))
from record import Recorder

from tsunagu.browser import find_chromium
from tsunagu.device_agent import DeviceAgent

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "tests" / "e2e" / "js"
SECRET = "bench-device-secret-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token(user: str, channels: list[str]) -> str:
    return jwt.encode({"sub": user, "channels": channels, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def serve(service: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", service, "--port", str(port)],
        env={**os.environ, **env},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return process, port
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit(f"{service} did not get ready")
        time.sleep(0.2)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run(rounds: int, chromium: str, helper: str, port: int, mqtt_url: str, prefix: str) -> dict[str, list[float]]:
    device, operator = f"rover{prefix}", f"ann{prefix}"
    command_topic, ack_topic = f"{prefix}/rover/set", f"{prefix}/rover/acks"
    telemetry_topic = f"{prefix}/rover/telemetry"
    client = Client(f"ws://127.0.0.1:{port}/connection/websocket", token=token(device, []))
    await client.connect()
    agent = DeviceAgent(
        client, device, [operator], lambda *_: None, ack_topic=ack_topic, telemetry_topic=telemetry_topic
    )
    await agent.start()
    mqtt = asyncio.create_task(agent.run_mqtt(mqtt_url, command_topic, f"bench-device-{prefix}"))
    await asyncio.wait_for(agent.mqtt_ready.wait(), 15)
    sampler = asyncio.create_task(agent.run_telemetry(lambda: {"device": device}, every=0.05, mqtt_every=0.05))
    options = {
        "chromium": chromium,
        "helper": helper,
        "base": f"http://127.0.0.1:{port}",
        "user": operator,
        "token": token(operator, ["mqtt:*"]),
        "device": device,
        "commandTopic": command_topic,
        "ackTopic": ack_topic,
        "telemetryTopic": telemetry_topic,
        "rounds": rounds,
    }
    try:
        node = await asyncio.create_subprocess_exec(
            "node", "device_rtt.mjs", json.dumps(options), cwd=JS, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(node.communicate(), 300)
        if node.returncode != 0:
            raise SystemExit(err.decode()[-2000:])
    finally:
        mqtt.cancel()
        sampler.cancel()
        await asyncio.gather(mqtt, sampler, return_exceptions=True)
        await agent.close()
        await client.disconnect()
    timings: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium: python -m tsunagu.browser")
    mqtt_url = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")
    prefix = uuid.uuid4().hex[:8]
    env = {"TSUNAGU_BUS": "kafka", "TSUNAGU_BROKER": "redis", "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET}
    bridge_env = {
        **env,
        "TSUNAGU_MQTT_URL": mqtt_url,
        # The agent's acknowledgements come back through the bridge (its commands go out through it anyway).
        "TSUNAGU_MQTT_BRIDGE_FILTERS": json.dumps([f"{prefix}/rover/acks", f"{prefix}/rover/telemetry"]),
        "TSUNAGU_MQTT_BRIDGE_SHARE_GROUP": "",
        "TSUNAGU_MQTT_BRIDGE_CLIENT_ID": f"bench-bridge-{prefix}",
        "TSUNAGU_MQTT_BRIDGE_CONSUMER_GROUP": f"bench-bridge-{prefix}",
    }
    processes = []
    try:
        bridge, _ = serve("mqtt-bridge", bridge_env)
        processes.append(bridge)
        gateway, port = serve("ws-gateway", env)
        processes.append(gateway)
        with tempfile.TemporaryDirectory() as helper:
            tsc = REPO / "clients" / "js" / "node_modules" / ".bin" / "tsc"
            config = REPO / "clients" / "js" / "tsconfig.build.json"
            flags = ["--declaration", "false", "--declarationMap", "false", "--sourceMap", "false"]
            subprocess.run([str(tsc), "-p", str(config), "--outDir", helper, *flags], check=True)
            timings = asyncio.run(run(args.rounds, chromium, helper, port, mqtt_url, prefix))
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)
    recorder = Recorder("device-rtt", vars(args))
    labels = {"webrtc": "data channel", "mqtt": "gateway -> Kafka -> mqtt-bridge -> MQTT and back"}
    for path, label in labels.items():
        values = timings[path]
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        print(f"{label:<52} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   ({len(values)} round trips)")
        recorder.add(f"command round trip over the {label}, p50", p50, "ms")
        recorder.add(f"command round trip over the {label}, p99", p99, "ms")
    telemetry_labels = {"webrtc": "data channel", "mqtt": "MQTT -> mqtt-bridge -> Redis -> gateway"}
    for path, label in telemetry_labels.items():
        ages = timings["ages"][path]
        if not ages:
            raise SystemExit(f"no telemetry arrived over the {label}")
        p50, p99 = statistics.median(ages), percentile(ages, 0.99)
        print(f"telemetry over the {label:<40} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   ({len(ages)} samples)")
        recorder.add(f"telemetry sample age on arrival over the {label}, p50", p50, "ms")
        recorder.add(f"telemetry sample age on arrival over the {label}, p99", p99, "ms")
    recorder.save()


if __name__ == "__main__":
    main()
