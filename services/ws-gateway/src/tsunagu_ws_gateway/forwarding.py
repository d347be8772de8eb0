"""Publications that are requests to a service, not messages to subscribers.

A namespace with `forward` set hands its client publications to the named forwarder instead of the
broker: the forwarder turns them into an event on a Kafka topic, keyed so that one partition orders
what must be ordered, and the publish is acknowledged once Kafka has the event. The services answer on
channels (the room's state channel, the sender's `replies:` channel), never through this path.

- `sim-input`: `sim:R.input` → proto SimInput on `tsunagu.sim.inputs`, keyed by room R (the engine
  applies a room's inputs in order). Publishing to a room's state channel `sim:R` is refused: only the
  engine writes state.
- `mqtt-command`: `mqtt:a/b/c` → proto MqttCommand on `tsunagu.mqtt.commands`, keyed by the device
  topic `a/b/c`; mqtt-bridge publishes it QoS 1 and reports delivered / failed / timed out on the
  sender's `replies:mqtt#<user>` channel, with the command id the publish reply returned.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from tsunagu_core import topics
from tsunagu_core.bus import Bus, BusError
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import MqttCommand, SimInput

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ReplyError

SIM_INPUT_SUFFIX = ".input"
REPLIES_NAMESPACE = "replies"


@dataclass(frozen=True, slots=True)
class Sender:
    user: str
    client: str
    session: str
    node: str


Forwarder = Callable[[Sender, str, bytes], Awaitable[dict[str, Any]]]


def reply_channel(kind: str, user: str) -> str:
    """The user-limited channel on which a service answers this user's forwarded requests."""
    return f"{REPLIES_NAMESPACE}:{kind}#{user}"


def _content_type(data: bytes) -> str:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return "application/octet-stream"
    return "application/json"


class SimInputForwarder:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def __call__(self, sender: Sender, channel: str, data: bytes) -> dict[str, Any]:
        name = channel.split(":", 1)[1]
        if not name.endswith(SIM_INPUT_SUFFIX) or len(name) == len(SIM_INPUT_SUFFIX):
            raise ReplyError(codes.PERMISSION_DENIED, "publish inputs to sim:<room>.input; room state is the engine's")
        room = name[: -len(SIM_INPUT_SUFFIX)]
        sequence = 0
        if data[:1] == b"{":
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("seq"), int) and body["seq"] >= 0:
                sequence = body["seq"]
        event = SimInput(
            room=room,
            user_id=sender.user,
            client_id=sender.client,
            client_seq=sequence,
            input=data,
            content_type=_content_type(data),
        )
        delivery = await _send(self.bus, topics.SIM_INPUTS, "sim.input", event, room, sender)
        return {"offset": delivery}


class MqttCommandForwarder:
    def __init__(self, bus: Bus, timeout: float) -> None:
        self.bus = bus
        self.timeout = timeout

    async def __call__(self, sender: Sender, channel: str, data: bytes) -> dict[str, Any]:
        topic = channel.split(":", 1)[1]
        if not sender.user:
            raise ReplyError(codes.PERMISSION_DENIED, "device commands need an authenticated user")
        if "+" in topic or "#" in topic or topic.startswith("$"):
            raise ReplyError(codes.BAD_REQUEST, "a command goes to one device topic: no wildcards, no $ topics")
        command_id = uuid.uuid4().hex
        event = MqttCommand(
            command_id=command_id,
            topic=topic,
            payload=data,
            qos=1,
            retain=False,
            reply_channel=reply_channel("mqtt", sender.user),
            user_id=sender.user,
            deadline_unix_ms=int((time.time() + self.timeout) * 1000),
        )
        await _send(self.bus, topics.MQTT_COMMANDS, "mqtt.command", event, topic, sender)
        return {"command_id": command_id, "reply_channel": event.reply_channel}


async def _send(bus: Bus, topic: str, event_type: str, event: Any, key: str, sender: Sender) -> int:
    try:
        delivery = await publish_event(bus, topic, event_type, event, key=key, source=f"ws-gateway/{sender.node}")
    except BusError as exc:
        raise ReplyError(codes.INTERNAL, f"not accepted by the bus now: {exc}") from None
    return delivery.offset


def build_forwarders(bus: Bus, *, command_timeout: float) -> Mapping[str, Forwarder]:
    return {
        "sim-input": SimInputForwarder(bus),
        "mqtt-command": MqttCommandForwarder(bus, command_timeout),
    }
