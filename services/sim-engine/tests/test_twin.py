"""Twin rooms with the memory engines: device telemetry on `mqtt:` channels drives the entities, staleness
shows, and a user's command input becomes one MqttCommand on the command path, named after the input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tsunagu_core import topics
from tsunagu_core.broker import ClientInfo, MemoryBroker, Publication, PublishOptions
from tsunagu_core.bus import BusMessage, MemoryBus
from tsunagu_core.envelope import envelope_of, payload_of, publish_event
from tsunagu_core.testing import eventually
from tsunagu_core.wire.events_pb2 import MqttCommand, SimInput
from tsunagu_sim_engine.codec import decode
from tsunagu_sim_engine.engine import CommandSender, SimEngine
from tsunagu_sim_engine.kinds import load_kinds
from tsunagu_sim_engine.kinds.twin import TwinKind
from tsunagu_sim_engine.room import RoomSpec
from tsunagu_sim_engine.store import MemoryRoomStore

TELEMETRY = PublishOptions(history_size=10, history_ttl=300)  # as mqtt-bridge keeps device topics


class States:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []

    async def on_publication(self, channel: str, publication: Publication) -> None:
        if channel.startswith("sim:"):
            self.frames.append(decode(publication.data))
        else:
            self.replies.append(json.loads(publication.data))

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        return None

    async def on_resubscribed(self) -> None:
        return None

    def latest(self, device: str) -> list[Any] | None:
        for frame in reversed(self.frames):
            if device in frame["e"]:
                return frame["e"][device]
        return None


def twin_spec(room: str, **params: Any) -> RoomSpec:
    devices = {
        "rover": {"telemetry": "plant/rover/telemetry", "command": "plant/rover/set", "at": [1, 2]},
        "gauge": {"telemetry": "plant/gauge/telemetry", "at": [5, 5, 1]},
    }
    body = {"room": room, "kind": "twin", "tick_hz": 20, "params": {"devices": devices, **params}}
    return RoomSpec.parse(body)


async def send(bus: MemoryBus, room: str, user: str, body: dict[str, Any], seq: int, client: str = "c1") -> None:
    event = SimInput(room=room, user_id=user, client_id=client, client_seq=seq, input=json.dumps(body).encode())
    await publish_event(bus, topics.SIM_INPUTS, "sim.input", event, key=room, source="test")


def test_twin_params_are_checked() -> None:
    kind = TwinKind()
    with pytest.raises(ValueError, match="devices"):
        kind.validate_params({})
    with pytest.raises(ValueError, match="wildcards"):
        kind.validate_params({"devices": {"d": {"telemetry": "plant/+/telemetry"}}})
    with pytest.raises(ValueError, match="at"):
        kind.validate_params({"devices": {"d": {"telemetry": "t", "at": [1]}}})
    with pytest.raises(ValueError, match="device id"):
        kind.validate_params({"devices": {"bad id!": {"telemetry": "t"}}})
    params = kind.validate_params({"devices": {"d": {"telemetry": "t", "at": [1, 2]}}})
    assert params["devices"]["d"] == {"telemetry": "t", "command": "", "at": [1.0, 2.0, 0.0]}


async def test_telemetry_drives_entities_and_commands_go_out_once() -> None:
    load_kinds()
    bus, broker, states = MemoryBus(), MemoryBroker(), States()
    broker.set_handler(states)
    await broker.subscribe("sim:plant")
    await broker.subscribe("replies:sim#ann")
    commands: list[MqttCommand] = []

    async def command_seen(message: BusMessage) -> None:
        commands.append(payload_of(envelope_of(message), MqttCommand))

    # Telemetry from before the room existed: the room starts from the latest.
    await broker.publish("mqtt:plant/rover/telemetry", b'{"x": 3, "y": 4, "battery": 97}', TELEMETRY)
    engine = SimEngine(
        broker, MemoryRoomStore(), node="a", send_commands=CommandSender(bus, broker, 10), source_poll=0.05
    )
    inputs = await bus.consume([topics.SIM_INPUTS], "sim-test", engine.handle)
    outbox = await bus.consume([topics.MQTT_COMMANDS], "bridge-test", command_seen)
    try:
        assert await engine.create(twin_spec("plant", stale_after=0.5))
        await eventually(lambda: (states.latest("rover") or [0])[:2] == [300, 400])
        rover = states.latest("rover")
        assert rover is not None and rover[4]["v"]["battery"] == 97 and not rover[4]["stale"]
        gauge = states.latest("gauge")
        assert gauge is not None and gauge[:3] == [500, 500, 100] and gauge[4] == {"v": None, "seen": 0, "stale": True}

        # Telemetry moves the entity as it arrives; text that is not JSON is kept as text.
        await broker.publish("mqtt:plant/rover/telemetry", b'{"x": 3.5, "y": 4, "heading": 90}', TELEMETRY)
        await broker.publish("mqtt:plant/gauge/telemetry", b"21.5 C", TELEMETRY)
        await eventually(lambda: (states.latest("rover") or [0])[:4] == [350, 400, 0, 9000])
        await eventually(lambda: (states.latest("gauge") or [0, 0, 0, 0, {}])[4].get("v") == {"text": "21.5 C"})
        # Silence past stale_after shows.
        await eventually(lambda: (states.latest("rover") or [0, 0, 0, 0, {}])[4].get("stale") is True, timeout=3)

        # A command input becomes one MqttCommand to the device's command topic, with Ann's receipt channel.
        await send(bus, "plant", "ann", {"seq": 1, "command": {"device": "rover", "payload": {"go": "north"}}}, 1)
        await send(bus, "plant", "ann", {"seq": 1, "command": {"device": "rover", "payload": {"go": "north"}}}, 1)
        await eventually(lambda: len(commands) == 1)
        command = commands[0]
        assert (command.topic, json.loads(command.payload), command.qos) == ("plant/rover/set", {"go": "north"}, 1)
        assert command.reply_channel == "replies:mqtt#ann" and command.user_id == "ann"
        # Refusals reach the sender: a device without a command topic, an unknown one, no seq.
        await send(bus, "plant", "ann", {"seq": 2, "command": {"device": "gauge", "payload": 1}}, 2)
        await send(bus, "plant", "ann", {"seq": 3, "command": {"device": "pump", "payload": 1}}, 3)
        await send(bus, "plant", "ann", {"command": {"device": "rover", "payload": 1}}, 0)
        await eventually(lambda: len(states.replies) == 3)
        assert [reply["reason"] for reply in states.replies] == ["not_commandable", "unknown_entity", "seq_required"]
        await asyncio.sleep(0.2)
        assert len(commands) == 1
    finally:
        await inputs.stop()
        await outbox.stop()
        await engine.close(handover=False)


async def test_the_same_input_names_the_same_command_on_another_replica() -> None:
    """After a crash the input is redelivered to the room's new owner: the command it makes has the id of the
    first, so mqtt-bridge (which keeps sent ids) sends it once."""
    load_kinds()
    rooms = [twin_spec("plant").as_dict() | {"room": "plant"} for _ in range(2)]
    first, second = (TwinKind().create(RoomSpec.from_dict(raw).params) for raw in rooms)
    for simulation in (first, second):
        simulation.room = "plant"
        simulation.apply_input("ann", {"command": {"device": "rover", "payload": [1]}}, 0.0, client="c9", seq=7)
    one, other = first.take_commands(), second.take_commands()
    assert [c.command_id for c in one] == [c.command_id for c in other]
    simulation = TwinKind().create(RoomSpec.from_dict(rooms[0]).params)
    simulation.room = "plant"
    simulation.apply_input("ann", {"command": {"device": "rover", "payload": [1]}}, 0.0, client="c9", seq=8)
    assert simulation.take_commands()[0].command_id != one[0].command_id
