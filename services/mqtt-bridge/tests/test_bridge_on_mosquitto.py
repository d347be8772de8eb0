"""The bridge against the real Mosquitto and Redis, with paho-mqtt devices (bus: in-process)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from prometheus_client import REGISTRY
from tsunagu_core import topics
from tsunagu_core.config import CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import REDIS_URL, Recorder, eventually, require_stack
from tsunagu_core.wire.events_pb2 import MqttCommand
from tsunagu_mqtt_bridge.app import create_app
from tsunagu_mqtt_bridge.config import MqttBridgeSettings

MQTT_URL = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")


@asynccontextmanager
async def bridge(prefix: str, **overrides: Any) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    require_stack("the bridge on Mosquitto")
    core = CoreSettings(broker="redis", bus="memory", redis_url=REDIS_URL, mqtt_url=MQTT_URL)
    runtime = Runtime(core)
    settings = MqttBridgeSettings(
        filters=[f"{prefix}/#"],
        share_group=f"g{prefix}",
        client_id=f"bridge-{prefix}",
        presence_topic=f"{prefix}/devices/+/status",
        presence_channel=f"mqtt:{prefix}/devices/{{device}}",
        max_payload_bytes=1024,
        **overrides,
    )
    app = create_app(runtime, settings)
    async with app.router.lifespan_context(app):
        await runtime.wait_ready(("bus", "broker", "mqtt"), timeout=10)
        await asyncio.sleep(0.2)  # SUBACK
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge", timeout=10) as http:
            yield runtime, http


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_telemetry_reaches_channel_history_in_order(device: Callable[..., Any]) -> None:
    prefix = uuid.uuid4().hex[:10]
    async with bridge(prefix) as (runtime, _http):
        sensor = device().connect()
        too_large = metric("tsunagu_mqtt_rejected_total", reason="payload_too_large")
        bad_chars = metric("tsunagu_mqtt_rejected_total", reason="invalid_channel_chars")
        for n in range(30):
            await asyncio.to_thread(sensor.publish, f"{prefix}/s1/temp", orjson.dumps({"n": n}))
        await asyncio.to_thread(sensor.publish, f"{prefix}/s1/raw", b"\x00\xffbytes")
        await asyncio.to_thread(sensor.publish, f"{prefix}/s1/big", b"x" * 2000)
        await asyncio.to_thread(sensor.publish, f"{prefix}/s 1/temp", b"1")
        await asyncio.to_thread(sensor.publish, f"{prefix}/s1/last", b'{"v": 1}', retain=True)

        channel = f"mqtt:{prefix}/s1/last"

        async def kept(name: str) -> list[bytes]:
            return [p.data for p in (await runtime.broker.history(name)).publications]

        # Topics are relayed in parallel: the last one published may be on its channel before the others.
        async with asyncio.timeout(5):
            while not await kept(channel) or (await kept(f"mqtt:{prefix}/s1/temp"))[-1:] != [orjson.dumps({"n": 29})]:
                await asyncio.sleep(0.02)
        # History keeps the last 10, in the order the device published them.
        assert await kept(f"mqtt:{prefix}/s1/temp") == [orjson.dumps({"n": n}) for n in range(20, 30)]
        assert await kept(f"mqtt:{prefix}/s1/raw") == [b"\x00\xffbytes"]
        assert await kept(channel) == [b'{"v": 1}']
        assert await kept(f"mqtt:{prefix}/s1/big") == []
        assert metric("tsunagu_mqtt_rejected_total", reason="payload_too_large") == too_large + 1
        assert metric("tsunagu_mqtt_rejected_total", reason="invalid_channel_chars") == bad_chars + 1
        await asyncio.to_thread(sensor.publish, f"{prefix}/s1/last", b"", retain=True)  # clear the retained value


async def command(runtime: Runtime, topic: str, user: str, *, deadline_in: float = 5.0, command_id: str = "") -> str:
    command_id = command_id or uuid.uuid4().hex
    event = MqttCommand(
        command_id=command_id,
        topic=topic,
        payload=b'{"led": "on"}',
        qos=1,
        reply_channel=f"replies:mqtt#{user}",
        user_id=user,
        deadline_unix_ms=int((time.time() + deadline_in) * 1000),
    )
    await publish_event(runtime.bus, topics.MQTT_COMMANDS, "mqtt.command", event, key=topic, source="test")
    return command_id


async def test_commands_reach_the_device_once_and_the_sender_hears_the_result(device: Callable[..., Any]) -> None:
    prefix = uuid.uuid4().hex[:10]
    user = f"u{prefix}"
    async with bridge(prefix) as (runtime, _http):
        lamp = device().connect()
        await asyncio.to_thread(lamp.subscribe, f"{prefix}/lamp/cmd")
        replies = f"replies:mqtt#{user}"

        async def results() -> list[dict[str, Any]]:
            return [orjson.loads(p.data) for p in (await runtime.broker.history(replies)).publications]

        first = await command(runtime, f"{prefix}/lamp/cmd", user)
        # The same command again (a redelivery): not sent twice, one result.
        await command(runtime, f"{prefix}/lamp/cmd", user, command_id=first)
        late = await command(runtime, f"{prefix}/lamp/cmd", user, deadline_in=-1)
        bad = await command(runtime, f"{prefix}/lamp/+", user)
        async with asyncio.timeout(5):
            while len(await results()) < 3:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        by_id = {r["command_id"]: r for r in await results()}
        assert len(await results()) == 3
        assert by_id[first] == {"command_id": first, "status": "delivered", "reason": ""}
        assert by_id[late]["status"] == "timed_out"
        assert by_id[bad]["status"] == "failed" and "wildcards" in by_id[bad]["reason"]
        assert [(t, p) for t, p, _ in lamp.received] == [(f"{prefix}/lamp/cmd", b'{"led": "on"}')]
        assert lamp.received[0][2] == {"command_id": first}


async def test_device_presence_from_status_and_last_will(device: Callable[..., Any]) -> None:
    prefix = uuid.uuid4().hex[:10]
    async with bridge(prefix) as (runtime, _http):
        channel = f"mqtt:{prefix}/devices/d1"
        recorder = Recorder()
        runtime.broker.set_handler(recorder)
        await runtime.broker.subscribe(channel)
        status = f"{prefix}/devices/d1/status"
        d1 = device().will(status, b"offline").connect()
        await asyncio.to_thread(d1.publish, status, b"online", retain=True)
        await eventually(lambda: len(recorder.presence) == 1)
        assert list(await runtime.broker.presence(channel)) == ["mqtt-device:d1"]
        await asyncio.to_thread(d1.publish, status, b"online", retain=True)  # no second join
        await asyncio.to_thread(d1.drop)  # the broker publishes the will
        await eventually(lambda: len(recorder.presence) == 2, timeout=20)
        assert [(join, info.user) for _, join, info in recorder.presence] == [(True, "d1"), (False, "d1")]
        assert await runtime.broker.presence(channel) == {}
        await asyncio.to_thread(device().connect().publish, status, b"", retain=True)


async def test_device_request_response_over_http_rpc(device: Callable[..., Any]) -> None:
    prefix = uuid.uuid4().hex[:10]
    async with bridge(prefix) as (_runtime, http):
        thermostat = device().connect()
        thermostat.responders[f"{prefix}/th/get"] = lambda payload: orjson.dumps(
            {"asked": orjson.loads(payload), "t": 21}
        )
        await asyncio.to_thread(thermostat.subscribe, f"{prefix}/th/get")
        body = {
            "method": "mqtt.request",
            "user": "ann",
            "client": "c1",
            "data": {"topic": f"{prefix}/th/get", "payload": {"unit": "C"}},
        }
        answer = await http.post("/mqtt.request", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["payload"] == {"asked": {"unit": "C"}, "t": 21}
        assert answer.json()["encoding"] == "json"
        silent = {**body, "data": {"topic": f"{prefix}/nobody/home", "timeout": 0.3}}
        timed_out = await http.post("/mqtt.request", json=silent)
        assert timed_out.status_code == 504 and "no response" in timed_out.json()["error"]
