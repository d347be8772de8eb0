"""The findings of the security review that cross services, replayed against `tsunagu` as a user starts it:
the internal APIs refuse callers without the platform's credential while the gateway's own calls (collab,
RPC to mqtt-bridge) carry it, `tsunagu run` does not serve its public development secrets to the network,
production refuses what would be unsafe, and `/metrics` can leave the API port."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest
from centrifuge import Client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pycrdt import Doc, Provider, Text
from tsunagu_core.testing_clients import WebsocketChannel
from websockets.asyncio.client import connect

from tsunagu.cli import DEVELOPMENT_API_KEY, DEVELOPMENT_TOKEN_SECRET

# What `tsunagu run` prints as its internal API token (tsunagu.cli).
DEVELOPMENT_INTERNAL_TOKEN = "tsunagu-development-internal-token"

SERVICE_PORTS = {
    "auth": "TSUNAGU_AUTH_PORT",
    "presence": "TSUNAGU_PRESENCE_PORT",
    "collab": "TSUNAGU_COLLAB_PORT",
    "stream-ingest": "TSUNAGU_INGEST_PORT",
    "mqtt-bridge": "TSUNAGU_MQTT_BRIDGE_PORT",
    "sim-engine": "TSUNAGU_SIM_PORT",
    "audit-log": "TSUNAGU_AUDIT_PORT",
}
# What an attacker who reaches an internal port tries first.
ATTACKS = [
    ("GET", "audit-log", "/v1/audit"),
    ("DELETE", "collab", "/v1/docs/minutes"),
    ("POST", "collab", "/v1/docs/minutes/versions/1/restore"),
    ("POST", "sim-engine", "/v1/rooms"),
    ("DELETE", "sim-engine", "/v1/rooms/world"),
    ("GET", "presence", "/v1/users/alice/online"),
    ("POST", "mqtt-bridge", "/mqtt.request"),
    ("GET", "stream-ingest", "/v1/mappings"),
]
MQTT_URL = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")


def quiet_env(ports: dict[str, int]) -> dict[str, str]:
    env = {"TSUNAGU_BUS": "memory", "TSUNAGU_BROKER": "memory", "TSUNAGU_DATABASE": "memory"}
    env |= {variable: str(ports[name]) for name, variable in SERVICE_PORTS.items()}
    return env


def dev_token(user: str, channels: list[str]) -> str:
    return jwt.encode({"sub": user, "channels": channels, "exp": int(time.time()) + 600}, DEVELOPMENT_TOKEN_SECRET)


async def test_tsunagu_run_keeps_its_internal_apis_shut_and_its_gateway_gets_in(  # type: ignore[no-untyped-def]
    start_service, pick_port
) -> None:
    ports = {name: pick_port() for name in SERVICE_PORTS}
    platform = start_service(["run"], quiet_env(ports))
    await asyncio.to_thread(platform.wait_ready, 90)
    async with httpx.AsyncClient(timeout=10) as http:
        for method, service, path in ATTACKS:
            url = f"http://127.0.0.1:{ports[service]}{path}"
            for headers in ({}, {"authorization": "Bearer guess"}, {"x-api-key": DEVELOPMENT_API_KEY}):
                refused = await http.request(method, url, json={"user": "admin", "data": {}}, headers=headers)
                assert refused.status_code == 401, (method, url, refused.text)
        # the y-websocket path: the gateway loads and the collab service stores the document with the token
        doc = f"sec-{uuid.uuid4().hex[:8]}"
        ydoc: Doc = Doc()
        text = ydoc.get("text", type=Text)
        token = dev_token("alice", ["collab:*"])
        async with (
            connect(f"ws://127.0.0.1:{platform.port}/collab/{doc}?token={token}") as websocket,
            Provider(ydoc, WebsocketChannel(websocket, doc)),
        ):
            text.insert(0, "minutes of the meeting")
            internal = {"authorization": f"Bearer {DEVELOPMENT_INTERNAL_TOKEN}"}
            async with asyncio.timeout(20):
                while True:
                    stored = await http.get(f"http://127.0.0.1:{ports['collab']}/v1/docs/{doc}", headers=internal)
                    assert stored.status_code == 200, stored.text
                    if stored.json()["content"].get("text") == "minutes of the meeting":
                        break
                    await asyncio.sleep(0.1)
        # the web app's service probes ask /readyz, which stays open
        services = (await http.get(f"http://127.0.0.1:{platform.port}/web/services")).json()
        assert services["collab"] == services["sim-engine"] == {"state": "up"}, services
        for service in SERVICE_PORTS:
            assert (await http.get(f"http://127.0.0.1:{ports[service]}/readyz")).status_code == 200, service


async def test_tsunagu_run_does_not_serve_its_development_secrets_to_the_network(  # type: ignore[no-untyped-def]
    start_service, pick_port
) -> None:
    ports = {name: pick_port() for name in SERVICE_PORTS}
    # no MQTT broker of ours: run mode starts its embedded one, which has no authentication
    env = quiet_env(ports) | {"TSUNAGU_MQTT_URL": "", "TSUNAGU_RUN_MQTT_PORT": "0"}
    exposed = start_service(["run", "--host", "0.0.0.0"], env)
    assert await asyncio.to_thread(exposed.process.wait, 60) == 2
    message = exposed.output()
    assert "would serve the public development secrets" in message, message
    secrets = ("TSUNAGU_GATEWAY_API_KEY", "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET", "TSUNAGU_INTERNAL_TOKEN")
    for variable in (*secrets, "TSUNAGU_MQTT_URL"):  # the embedded MQTT broker has no authentication
        assert variable in message
    # told explicitly, on a trusted network
    allowed = start_service(["run", "--host", "0.0.0.0", "--expose-development-secrets"], env)
    await asyncio.to_thread(allowed.wait_healthy, 90)
    assert allowed.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "ws-gateway"], {"TSUNAGU_GATEWAY_API_KEY": DEVELOPMENT_API_KEY}, "TSUNAGU_GATEWAY_API_KEY"),
        (["serve", "collab"], {}, "without TSUNAGU_INTERNAL_TOKEN"),
        (["serve", "collab"], {"TSUNAGU_INTERNAL_TOKEN": DEVELOPMENT_INTERNAL_TOKEN}, "TSUNAGU_INTERNAL_TOKEN"),
        (
            ["serve", "audit-log"],
            {"TSUNAGU_INTERNAL_TOKEN": "a-real-one", "TSUNAGU_DATABASE": "postgres"},
            "TSUNAGU_AUDIT_SIGNING_KEY",
        ),
        (["serve", "auth"], {}, "TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET"),
        (["run"], {}, "public development secret"),
    ],
    ids=["gateway-dev-api-key", "open-internal-api", "dev-internal-token", "unsigned-audit", "unencrypted-keys", "run"],
)
def test_production_refuses_to_start_unsafe(  # type: ignore[no-untyped-def]
    start_service, pick_port, args: list[str], env: dict[str, str], expected: str
) -> None:
    ports = {name: pick_port() for name in SERVICE_PORTS}
    process = start_service(args, {**quiet_env(ports), "TSUNAGU_ENV": "production", **env})
    assert process.process.wait(60) == 2
    assert expected in process.output(), process.output()


async def test_metrics_leave_the_api_port_when_they_have_their_own(start_service, pick_port) -> None:  # type: ignore[no-untyped-def]
    metrics_port = pick_port()
    collab = start_service(
        ["serve", "collab"], {"TSUNAGU_INTERNAL_TOKEN": "metrics-test-token", "TSUNAGU_METRICS_PORT": str(metrics_port)}
    )
    await asyncio.to_thread(collab.wait_ready, 60)
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert page.status_code == 200 and "tsunagu_bus_published_total" in page.text
        assert (await http.get(collab.base + "/metrics")).status_code == 401
        with_token = await http.get(collab.base + "/metrics", headers={"authorization": "Bearer metrics-test-token"})
        assert with_token.status_code == 404


# --------------------------------------------------------------------------- gateway -> mqtt-bridge on the real stack


class Responder:
    """An MQTT 5 device answering requests on one topic (paho-mqtt)."""

    def __init__(self, port: int, topic: str) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.subscribed = threading.Event()
        self.requests: list[bytes] = []
        self.client.on_message = self._answer
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10), "no SUBACK"

    def _answer(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.requests.append(message.payload)
        props = message.properties
        if props is not None and getattr(props, "ResponseTopic", None):
            answer = Properties(PacketTypes.PUBLISH)
            answer.CorrelationData = props.CorrelationData
            client.publish(props.ResponseTopic, b'{"open": false}', qos=1, properties=answer)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_the_gateways_rpc_reaches_mqtt_bridge_with_the_token_and_a_forged_call_does_not(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    prefix = uuid.uuid4().hex[:10]
    secret = "e2e-security-secret-long-enough-for-hs256"
    internal = {"TSUNAGU_INTERNAL_TOKEN": f"internal-{prefix}"}
    bridge_port = pick_port()
    bridge = start_service(
        ["serve", "mqtt-bridge"],
        {
            **real_env,
            **internal,
            "TSUNAGU_MQTT_URL": MQTT_URL,
            "TSUNAGU_MQTT_BRIDGE_FILTERS": json.dumps([f"{prefix}/#"]),
            "TSUNAGU_MQTT_BRIDGE_CLIENT_ID": f"e2e-sec-{prefix}",
            "TSUNAGU_MQTT_BRIDGE_CONSUMER_GROUP": f"mqtt-bridge-sec-{prefix}",
        },
        port=bridge_port,
    )
    gateway = start_service(
        ["serve", "ws-gateway"],
        {
            **real_env,
            **internal,
            "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": secret,
            "TSUNAGU_GATEWAY_RPC_ROUTES": json.dumps(
                {"mqtt.request": {"url": f"http://127.0.0.1:{bridge_port}/mqtt.request", "allow": "authenticated"}}
            ),
        },
    )
    for service in (bridge, gateway):
        await asyncio.to_thread(service.wait_ready, 90)
    device = await asyncio.to_thread(Responder, int(MQTT_URL.rsplit(":", 1)[1].strip("/")), f"{prefix}/valve/state")
    try:
        topic = f"{prefix}/valve/state"
        forged = {"method": "mqtt.request", "user": "plant-admin", "client": "x", "data": {"topic": topic}}
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.post(f"http://127.0.0.1:{bridge_port}/mqtt.request", json=forged)
        assert refused.status_code == 401, refused.text
        assert device.requests == [], "the forged request never reached the device"

        token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        client = Client(f"ws://127.0.0.1:{gateway.port}/connection/websocket", token=token)
        await client.connect()
        try:
            answer = await client.rpc("mqtt.request", {"topic": f"{prefix}/valve/state", "payload": {"q": 1}})
        finally:
            await client.disconnect()
        assert answer.data["payload"] == {"open": False}
        assert len(device.requests) == 1
    finally:
        await asyncio.to_thread(device.close)
