"""Fixtures: a paho-mqtt device for the tests: real MQTT 5 client on its own network thread."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Device:
    def __init__(self, host: str, port: int, *, client_id: str | None = None, clean: bool = True) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"dev-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.received: list[tuple[str, bytes, dict[str, str]]] = []
        self.responders: dict[str, Any] = {}
        self._connected = threading.Event()
        self.client.on_connect = lambda *args: self._connected.set()
        self.client.on_message = self._on_message
        self.host, self.port, self.clean = host, port, clean

    def will(self, topic: str, payload: bytes, retain: bool = True) -> Device:
        self.client.will_set(topic, payload, qos=1, retain=retain)
        return self

    def connect(self, timeout: float = 5.0) -> Device:
        properties = None
        if not self.clean:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 300
        self.client.connect(self.host, self.port, keepalive=10, clean_start=self.clean, properties=properties)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError("device did not connect")
        return self

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic_filter, qos=1)
        if not done.wait(5):
            raise TimeoutError("no SUBACK")

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        user = dict(getattr(props, "UserProperty", []) or []) if props is not None else {}
        self.received.append((message.topic, message.payload, user))
        self.messages.put(message)
        responder = self.responders.get(message.topic)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if responder is not None and response_topic:
            answer = Properties(PacketTypes.PUBLISH)
            answer.CorrelationData = props.CorrelationData
            client.publish(response_topic, responder(message.payload), qos=1, properties=answer)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, so the broker publishes the will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


MQTT_URL = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")


@pytest.fixture
def device() -> Iterator[Callable[..., Device]]:
    started: list[Device] = []
    address = urlsplit(MQTT_URL)

    def make(**kwargs: Any) -> Device:
        made = Device(address.hostname or "127.0.0.1", address.port or 1883, **kwargs)
        started.append(made)
        return made

    yield make
    for made in started:
        with contextlib.suppress(Exception):
            made.disconnect()
