"""Forwarded namespaces: a client publish to sim:<room>.input or mqtt:<topic> becomes an event on Kafka
for sim-engine or mqtt-bridge (here the in-process bus), keyed by room or device topic, and never reaches
subscribers; everything else about the publish (permissions, replies) stays as the SDK expects."""

from __future__ import annotations

import asyncio

import pytest
from centrifuge import Client
from centrifuge.exceptions import ReplyError
from tsunagu_core import topics
from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import envelope_of, payload_of
from tsunagu_core.wire.events_pb2 import MqttCommand, SimInput


async def captured(gateway, topic: str) -> list[BusMessage]:  # type: ignore[no-untyped-def]
    seen: list[BusMessage] = []

    async def keep(message: BusMessage) -> None:
        seen.append(message)

    await gateway.server.config.app.state.runtime.bus.consume([topic], f"test-{topic}", keep)
    return seen


async def until(items: list[BusMessage], count: int) -> None:
    async with asyncio.timeout(5):
        while len(items) < count:
            await asyncio.sleep(0.01)


async def test_sim_inputs_go_to_kafka_keyed_by_room(gateway, token) -> None:  # type: ignore[no-untyped-def]
    inputs = await captured(gateway, topics.SIM_INPUTS)
    client = Client(gateway.ws_url, token=token("ann", ["sim:*"]))
    await client.connect()
    for seq in range(3):
        await client.publish("sim:arena.input", {"seq": seq, "move": [1, 0]})
    await until(inputs, 3)
    events = [payload_of(envelope_of(m), SimInput) for m in inputs]
    assert [(e.room, e.user_id, e.client_seq, e.content_type) for e in events] == [
        ("arena", "ann", seq, "application/json") for seq in range(3)
    ]
    assert {m.key for m in inputs} == {b"arena"}
    with pytest.raises(ReplyError) as refused:
        await client.publish("sim:arena", {"x": 1})
    assert refused.value.code == 103, "only the engine writes a room's state"
    history = await gateway.broker.history("sim:arena.input", limit=10)
    assert history.publications == [], "inputs are not fanned out to subscribers"
    await client.disconnect()


async def test_device_commands_go_to_kafka_with_a_reply_channel(gateway, token) -> None:  # type: ignore[no-untyped-def]
    commands = await captured(gateway, topics.MQTT_COMMANDS)
    client = Client(gateway.ws_url, token=token("ann", ["mqtt:*", "replies:*"]))
    await client.connect()
    reply = await client.publish("mqtt:plant/7/valve", {"open": True})
    assert reply is not None
    await until(commands, 1)
    command = payload_of(envelope_of(commands[0]), MqttCommand)
    assert (command.topic, command.qos, command.user_id) == ("plant/7/valve", 1, "ann")
    assert command.reply_channel == "replies:mqtt#ann"
    assert commands[0].key == b"plant/7/valve"
    assert len(command.command_id) == 32 and command.deadline_unix_ms > 0
    with pytest.raises(ReplyError) as refused:
        await client.publish("mqtt:plant/+/valve", {"open": True})
    assert refused.value.code == 107
    # The replies channel of another user is not ann's to read.
    with pytest.raises(ReplyError) as denied:
        await client.history("replies:mqtt#bob", limit=1)
    assert denied.value.code == 103
    await client.disconnect()
