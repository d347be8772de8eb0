"""`tsunagu run`'s embedded MQTT broker (rumqttd) and demo device, with paho-mqtt as the outside client,
and mqtt-bridge on that broker: no external server (memory engines)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_mqtt_bridge.app import create_app
from tsunagu_mqtt_bridge.config import MqttBridgeSettings

from tsunagu.demo_device import COMMAND_TOPIC, STATE_TOPIC, STATUS_TOPIC, TELEMETRY_TOPIC, DemoDevice, Thermostat
from tsunagu.embedded_mqtt import EmbeddedMqttBroker


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedMqttBroker]:
    embedded = EmbeddedMqttBroker("127.0.0.1", 0)
    await asyncio.to_thread(embedded.start)
    try:
        yield embedded
    finally:
        await asyncio.to_thread(embedded.stop)


class Client:
    """A paho-mqtt MQTT 5 client on its own network thread; what it receives lands in `messages`."""

    def __init__(self, broker: EmbeddedMqttBroker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex, protocol=mqtt.MQTTv5)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def subscribe(self, topic_filter: str) -> None:
        self.client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(5)

    def next_on(self, topic: str, timeout: float = 10.0) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                message = self.messages.get(timeout=left)
                if message.topic == topic:
                    return message
        raise TimeoutError(f"nothing on {topic} within {timeout:g}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def client(broker: EmbeddedMqttBroker) -> Iterator[Client]:
    made = Client(broker)
    yield made
    made.close()


@pytest.fixture
async def device(broker: EmbeddedMqttBroker) -> AsyncIterator[None]:
    task = asyncio.create_task(DemoDevice(broker.host, broker.port, interval=0.2).run())
    yield
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def request(client: Client, payload: dict[str, Any]) -> dict[str, Any]:
    """An MQTT 5 request to the device's command topic; its answer on our response topic."""
    response_topic = f"test/{uuid.uuid4().hex}/answer"
    client.subscribe(response_topic)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = response_topic
    properties.CorrelationData = b"42"
    client.publish(COMMAND_TOPIC, json.dumps(payload).encode(), properties)
    answer = client.next_on(response_topic)
    assert answer.properties.CorrelationData == b"42"
    body: dict[str, Any] = json.loads(answer.payload)
    return body


async def test_the_demo_device_sends_telemetry_and_answers_requests(client: Client, device: None) -> None:
    client.subscribe(TELEMETRY_TOPIC)
    reading = json.loads((await asyncio.to_thread(client.next_on, TELEMETRY_TOPIC)).payload)
    assert reading["device"] == "demo-thermostat" and {"temperature", "setpoint", "heating", "ts"} <= set(reading)
    client.subscribe(STATUS_TOPIC)  # retained
    status = await asyncio.to_thread(client.next_on, STATUS_TOPIC)
    assert status.payload == b"online" and status.retain

    answer = await asyncio.to_thread(request, client, {"setpoint": 23.5})
    assert answer["ok"] is True and answer["setpoint"] == 23.5
    client.subscribe(STATE_TOPIC)  # retained: the state after the command
    state = json.loads((await asyncio.to_thread(client.next_on, STATE_TOPIC)).payload)
    assert state["setpoint"] == 23.5
    refused = await asyncio.to_thread(request, client, {"setpoint": 99})
    assert refused == {"device": "demo-thermostat", "ok": False, "error": "setpoint must be 5..35 °C"}


def test_the_thermostat_refuses_what_is_not_a_setpoint() -> None:
    thermostat = Thermostat(seed=1)
    for payload in (b"warm please", b'{"setpoint": "22"}', b'{"setpoint": true}', b"[21]"):
        assert thermostat.command(payload)["ok"] is False
    assert thermostat.setpoint == 21.0
    assert thermostat.command(b'{"setpoint": 18}')["setpoint"] == 18.0
    readings = [thermostat.reading()["temperature"] for _ in range(30)]
    assert readings[-1] < readings[0], "the room cools towards a lower setpoint"


def test_a_taken_port_gives_way_to_a_free_one_and_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        embedded = EmbeddedMqttBroker("127.0.0.1", port)
        assert embedded.displaced and embedded.port != port and embedded.url == f"mqtt://127.0.0.1:{embedded.port}"
    assert not EmbeddedMqttBroker("127.0.0.1", embedded.port).displaced


async def test_the_bridge_keeps_its_connection_to_a_strict_broker(
    broker: EmbeddedMqttBroker, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """rumqttd disconnects a client whose PUBACKs come out of order; the bridge's relays finish in any
    order (one queue per topic), so with `ack_in_order` (run mode's setting) it acknowledges in arrival
    order and stays connected."""
    caplog.set_level(logging.WARNING, logger="tsunagu.mqtt_bridge.connection")
    prefix = uuid.uuid4().hex[:8]
    runtime = Runtime(CoreSettings(bus="memory", broker="memory", mqtt_url=broker.url))
    settings = MqttBridgeSettings(
        filters=[f"{prefix}/#"], share_group="", client_id=f"bridge-{prefix}", ack_in_order=True
    )
    app = create_app(runtime, settings)
    async with app.router.lifespan_context(app):
        await runtime.wait_ready(("bus", "broker", "mqtt"), timeout=10)
        await asyncio.sleep(0.2)  # SUBACK
        topics = [f"{prefix}/sensor-{n}" for n in range(20)]
        for round_ in range(10):
            for topic in topics:
                client.client.publish(topic, json.dumps({"n": round_}).encode(), qos=1)

        async def relayed() -> bool:
            for topic in topics:
                history = (await runtime.broker.history(f"mqtt:{topic}")).publications
                if [json.loads(p.data)["n"] for p in history] != list(range(10)):
                    return False
            return True

        async with asyncio.timeout(15):
            while not await relayed():
                await asyncio.sleep(0.05)
        assert "MQTT connection lost" not in caplog.text, "rumqttd dropped the bridge"
