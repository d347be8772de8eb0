"""The demo's device for `tsunagu run`: a thermostat that is a real MQTT 5 client (gmqtt) of run mode's
broker, so the Board's IoT panel has live telemetry and a device that answers commands, through the
platform's normal path (mqtt-bridge), with no hardware.

- every `interval` seconds: `{"device", "temperature", "setpoint", "heating", "ts"}` on `demo/telemetry`;
- a command `{"setpoint": 21.5}` on `demo/thermostat/set`: applied, and the new state is published
  (retained) on `demo/thermostat/state`; a command that is an MQTT 5 request (it has a response topic,
  as `mqtt.request` sends) is also answered there, with its correlation data;
- `online` (retained) on `devices/demo-thermostat/status`, `offline` as its last will: the bridge's
  device presence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import orjson
from gmqtt import Client, Message, Subscription
from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTv50

log = logging.getLogger("tsunagu.demo_device")

DEVICE = "demo-thermostat"
TELEMETRY_TOPIC = "demo/telemetry"
COMMAND_TOPIC = "demo/thermostat/set"
STATE_TOPIC = "demo/thermostat/state"
STATUS_TOPIC = f"devices/{DEVICE}/status"
SETPOINT_RANGE = (5.0, 35.0)
# Degrees the room moves towards the setpoint per reading, while heating (or cooling off).
DRIFT = 0.3


class Thermostat:
    """The device's state and its answers to commands: no I/O, so the rules are easy to follow."""

    def __init__(self, seed: int | None = None) -> None:
        self.random = random.Random(seed)
        self.temperature = 19.0
        self.setpoint = 21.0

    @property
    def heating(self) -> bool:
        return self.temperature < self.setpoint - 0.2

    def reading(self) -> dict[str, Any]:
        step = DRIFT if self.heating else -DRIFT / 3 if self.temperature > self.setpoint + 0.2 else 0.0
        self.temperature = round(self.temperature + step + self.random.gauss(0, 0.05), 2)
        return self.state()

    def state(self) -> dict[str, Any]:
        return {
            "device": DEVICE,
            "temperature": self.temperature,
            "setpoint": self.setpoint,
            "heating": self.heating,
            "ts": int(time.time() * 1000),
        }

    def command(self, payload: bytes) -> dict[str, Any]:
        """Applies `{"setpoint": n}`; the answer says what the device did, or why it did not."""
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return {"device": DEVICE, "ok": False, "error": 'send JSON: {"setpoint": 21.5}'}
        setpoint = body.get("setpoint") if isinstance(body, dict) else None
        if isinstance(setpoint, bool) or not isinstance(setpoint, int | float):
            return {"device": DEVICE, "ok": False, "error": 'send JSON: {"setpoint": 21.5}'}
        low, high = SETPOINT_RANGE
        if not low <= setpoint <= high:
            return {"device": DEVICE, "ok": False, "error": f"setpoint must be {low:g}..{high:g} °C"}
        self.setpoint = round(float(setpoint), 1)
        return {"ok": True, **self.state()}


class DemoDevice:
    """The thermostat on the broker at `host:port` until cancelled; gmqtt reconnects by itself."""

    def __init__(self, host: str, port: int, *, interval: float = 1.0, seed: int | None = None) -> None:
        self.host = host
        self.port = port
        self.interval = interval
        self.thermostat = Thermostat(seed)
        self.client = Client(
            f"tsunagu-demo-{DEVICE}",
            will_message=Message(STATUS_TOPIC, b"offline", qos=1, retain=True),
            logger=logging.getLogger("tsunagu.demo_device.gmqtt"),
        )
        self.client.set_config({"reconnect_retries": UNLIMITED_RECONNECTS, "reconnect_delay": 1})
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    async def run(self) -> None:
        await self._connect()
        try:
            while True:
                if self.client.is_connected:
                    self._publish(TELEMETRY_TOPIC, self.thermostat.reading())
                await asyncio.sleep(self.interval)
        finally:
            with contextlib.suppress(Exception):
                self.client.publish(STATUS_TOPIC, b"offline", qos=1, retain=True)
                await asyncio.wait_for(self.client.disconnect(), 2)

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.client.connect(self.host, self.port, version=MQTTv50, keepalive=30)
                return
            except Exception as exc:  # the broker may still be starting
                log.debug("demo device: broker not reachable yet (%r)", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _publish(self, topic: str, body: dict[str, Any], retain: bool = False, **properties: Any) -> None:
        self.client.publish(topic, orjson.dumps(body), qos=1, retain=retain, **properties)

    def _on_connect(self, client: Client, flags: int, rc: int, properties: dict[str, Any]) -> None:
        client.subscribe([Subscription(COMMAND_TOPIC, qos=1)])
        client.publish(STATUS_TOPIC, b"online", qos=1, retain=True)
        self._publish(STATE_TOPIC, self.thermostat.state(), retain=True)
        log.info("demo device %s: telemetry on %s, commands on %s", DEVICE, TELEMETRY_TOPIC, COMMAND_TOPIC)

    async def _on_message(
        self, client: Client, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        answer = self.thermostat.command(payload)
        if answer["ok"]:
            self._publish(STATE_TOPIC, self.thermostat.state(), retain=True)
        response_topic = _first(properties.get("response_topic"))
        if response_topic:
            correlation = _first(properties.get("correlation_data"))
            extra = {"correlation_data": correlation} if correlation is not None else {}
            self._publish(str(response_topic), answer, **extra)
        return 0


def _first(value: Any) -> Any:
    """gmqtt hands properties over as lists."""
    return value[0] if isinstance(value, list) and value else value


# The Device view's demo (docs/webrtc.md): a rover answering WebRTC calls through `tsunagu device-agent`'s
# DeviceAgent, driven by commands over the data channel or MQTT, reporting where it is.
ROVER = "demo-rover"
ROVER_COMMAND_TOPIC = "demo/rover/set"
ROVER_TELEMETRY_TOPIC = "demo/rover/telemetry"
ROVER_ACK_TOPIC = "demo/rover/acks"
ROVER_SPEED_LIMIT = 2.0  # m/s


class Rover:
    """Position, heading and speed of a rover on a flat field; commands change speed and heading. No I/O."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.x = 0.0
        self.y = 0.0
        self.heading = 0.0  # degrees, 0 = east, counter-clockwise
        self.speed = 0.0
        self.battery = 100.0
        self.commands = 0
        self.last_error = ""
        self._at = clock()

    def _advance(self) -> None:
        import math

        now = self.clock()
        elapsed, self._at = now - self._at, now
        self.x += self.speed * elapsed * math.cos(math.radians(self.heading))
        self.y += self.speed * elapsed * math.sin(math.radians(self.heading))
        self.battery = max(0.0, self.battery - abs(self.speed) * elapsed * 0.01)

    def command(self, payload: Any) -> None:
        """`{"speed": m/s}`, `{"turn": degrees}`, `{"stop": true}`, in any combination."""
        self._advance()
        self.commands += 1
        if not isinstance(payload, dict):
            self.last_error = 'send an object: {"speed": 1}, {"turn": 90}, {"stop": true}'
            return
        self.last_error = ""
        speed, turn = payload.get("speed"), payload.get("turn")
        if isinstance(speed, int | float) and not isinstance(speed, bool):
            self.speed = max(-ROVER_SPEED_LIMIT, min(ROVER_SPEED_LIMIT, float(speed)))
        if isinstance(turn, int | float) and not isinstance(turn, bool):
            self.heading = (self.heading + float(turn)) % 360
        if payload.get("stop") is True:
            self.speed = 0.0

    def sample(self) -> dict[str, Any]:
        self._advance()
        return {
            "device": ROVER,
            "x": round(self.x, 2),
            "y": round(self.y, 2),
            "heading": round(self.heading, 1),
            "speed": self.speed,
            "battery": round(self.battery, 2),
            "commands": self.commands,
            **({"error": self.last_error} if self.last_error else {}),
        }


async def run_demo_rover(gateway_url: str, token: str, mqtt_url: str, operators: list[str]) -> None:
    """The rover's agent until cancelled: it waits for the gateway, then answers its operators' calls."""
    from centrifuge import Client as CentrifugeClient  # type: ignore[import-untyped]

    from tsunagu.device_agent import DeviceAgent

    rover = Rover()
    client = CentrifugeClient(gateway_url, token=token)
    await client.connect()
    await client.ready()  # the SDK retries with backoff until the gateway listens
    agent = DeviceAgent(
        client,
        ROVER,
        operators,
        lambda command_id, payload, path: rover.command(payload),
        ack_topic=ROVER_ACK_TOPIC,
        telemetry_topic=ROVER_TELEMETRY_TOPIC,
    )
    await agent.start()
    tasks = [
        asyncio.create_task(agent.run_mqtt(mqtt_url, ROVER_COMMAND_TOPIC, f"tsunagu-demo-{ROVER}")),
        asyncio.create_task(agent.run_telemetry(rover.sample, every=0.1, mqtt_every=1.0)),
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.close()
        await client.disconnect()
