"""The rooms this replica runs: starting them (from their snapshot), feeding them inputs from the bus,
publishing what they send, snapshotting, and giving them up when another replica takes them over.
See store.py for the ownership rule."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from tsunagu_core import topics
from tsunagu_core.broker import Broker, BrokerError, PublishOptions, PublishRequest, StreamPosition
from tsunagu_core.bus import Bus, BusError, BusMessage
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of, publish_event
from tsunagu_core.wire.events_pb2 import MqttCommand, SimInput

from tsunagu_sim_engine.kinds.twin import DeviceCommand
from tsunagu_sim_engine.room import BYTES_SENT, INPUTS, REPLIES, PendingInput, Room, RoomSpec, SendCommands
from tsunagu_sim_engine.store import RoomStore

log = logging.getLogger("tsunagu.sim.engine")

SIM_STATE = PublishOptions()
# The `replies` namespace keeps a short history, so a reply published while the user reconnects is recovered.
REPLY_OPTIONS = PublishOptions(history_size=100, history_ttl=300)


async def publish_all(broker: Broker, requests: list[PublishRequest]) -> int:
    """Publish a tick's output in one broker call (a keyframe tick can publish to hundreds of cell
    channels); a failure is logged, the tick goes on. The number that failed."""
    if not requests:
        return 0
    try:
        await broker.publish_many(requests)
    except BrokerError as exc:
        log.warning("sim publish of %d publications failed: %r", len(requests), exc)
        return len(requests)
    return 0


COMMANDS = Counter("tsunagu_sim_device_commands_total", "Twin rooms' device commands by outcome", ["outcome"])


class CommandSender:
    """Twin rooms' device commands onto the platform's command path, as the gateway sends a client's publish
    to `mqtt:<topic>`: proto MqttCommand on Kafka `tsunagu.mqtt.commands` keyed by the device topic. mqtt-bridge
    publishes each command id once and reports delivered / failed / timed out on `replies:mqtt#<user>`; a
    command the bus refuses is reported failed there by us, so the user always hears of it."""

    def __init__(self, bus: Bus, broker: Broker, timeout: float) -> None:
        self.bus = bus
        self.broker = broker
        self.timeout = timeout

    async def __call__(self, commands: list[DeviceCommand]) -> None:
        for command in commands:
            reply_channel = f"replies:mqtt#{command.user}"
            event = MqttCommand(
                command_id=command.command_id,
                topic=command.topic,
                payload=command.payload,
                qos=1,
                retain=False,
                reply_channel=reply_channel,
                user_id=command.user,
                deadline_unix_ms=int((time.time() + self.timeout) * 1000),
            )
            try:
                await publish_event(
                    self.bus, topics.MQTT_COMMANDS, "mqtt.command", event, key=command.topic, source="sim-engine"
                )
            except BusError as exc:
                COMMANDS.labels("not_sent").inc()
                log.warning("device command %s to %s not sent: %r", command.command_id, command.topic, exc)
                body = {"command_id": command.command_id, "status": "failed", "reason": f"not sent: {exc}"}
                options = PublishOptions(
                    history_size=100, history_ttl=300, idempotency_key=f"mqtt-command-result/{command.command_id}"
                )
                with contextlib.suppress(BrokerError):
                    await self.broker.publish(reply_channel, json.dumps(body).encode(), options)
                continue
            COMMANDS.labels("sent").inc()


@dataclass(slots=True)
class Running:
    room: Room
    task: asyncio.Task[None]
    # Follows the room's source channels (a twin's device telemetry), when it has any.
    follower: asyncio.Task[None] | None = None


async def follow_sources(broker: Broker, room: Room, channels: list[str], interval: float) -> None:
    """Feed the room every publication of its source channels, in order, from the latest one on.

    Read from the channels' history every `interval` rather than subscribed: the broker's fan-out has one
    handler per process, which is the gateway's when `tsunagu run` puts every service in one process; and
    a position per channel carries over nothing lost between two reads (mqtt-bridge keeps 10 per topic
    for 300 s). A new owner of the room starts from each channel's latest publication."""
    positions: dict[str, StreamPosition | None] = dict.fromkeys(channels)

    async def read(channel: str) -> None:
        position = positions[channel]
        if position is None:
            result = await broker.history(channel, limit=1, reverse=True)
        else:
            result = await broker.history(channel, since=position)
        for publication in sorted(result.publications, key=lambda p: p.offset):
            room.observe(channel, publication.data, publication.time_ms)
        positions[channel] = result.position

    while True:
        try:
            await asyncio.gather(*(read(channel) for channel in channels))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("room %s: reading its sources failed, retrying: %r", room.spec.room, exc)
        await asyncio.sleep(interval)


class SimEngine:
    def __init__(
        self,
        broker: Broker,
        store: RoomStore,
        *,
        node: str,
        snapshot_every: int = 30,
        lease_ttl: float = 3.0,
        max_rooms: int = 1000,
        input_max_age: float = 5.0,
        send_commands: SendCommands | None = None,
        source_poll: float = 0.2,
    ) -> None:
        self.broker = broker
        self.store = store
        self.node = node
        self.snapshot_every = snapshot_every
        self.lease_ttl = lease_ttl
        self.max_rooms = max_rooms
        self.input_max_age = input_max_age
        self.send_commands = send_commands
        self.source_poll = source_poll
        self.rooms: dict[str, Running] = {}
        self._lock = asyncio.Lock()

    # lifecycle of rooms

    async def create(self, spec: RoomSpec, match: dict[str, Any] | None = None) -> bool:
        """Register the room; False when it exists. This replica adopts it at once (see store.py)."""
        entry = spec.as_dict() if match is None else spec.as_dict() | {"match": match}
        if not await self.store.register(spec.room, entry):
            return False
        if len(self.rooms) < self.max_rooms and await self.store.adopt(spec.room, self.node, self.lease_ttl):
            await self._start(spec)
        return True

    async def delete(self, room: str) -> bool:
        removed = await self.store.delete(room)
        await self.stop(room)
        return removed

    async def _start(self, spec: RoomSpec) -> Room:
        async with self._lock:
            running = self.rooms.get(spec.room)
            if running is not None:
                return running.room
            room = Room(spec)
            snapshot = await self.store.snapshot(spec.room)
            if snapshot is not None:
                room.restore(snapshot)
                log.info("room %s resumed from its snapshot at tick %d", spec.room, room.tick)
            task = asyncio.create_task(
                room.run(self._publisher(spec.kind), self._snapshot, self.snapshot_every, self.send_commands),
                name=f"sim-room-{spec.room}",
            )
            follower = None
            if sources := room.sources():
                follower = asyncio.create_task(
                    follow_sources(self.broker, room, sources, self.source_poll), name=f"sim-sources-{spec.room}"
                )
            self.rooms[spec.room] = Running(room, task, follower)
            task.add_done_callback(functools.partial(self._finished, spec.room))
            return room

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        running = self.rooms.get(name)
        if running is not None and running.task is task:
            del self.rooms[name]
            if running.follower is not None:
                running.follower.cancel()
        if not task.cancelled() and task.exception() is not None:
            log.error("room %s stopped on an error: %r", name, task.exception())

    async def stop(self, name: str) -> None:
        running = self.rooms.pop(name, None)
        if running is None:
            return
        for task in (running.task, running.follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def close(self, *, handover: bool = True) -> None:
        """Stop every room; with `handover`, write a last snapshot and release the lease for a quick adoption."""
        for name in list(self.rooms):
            running = self.rooms.get(name)
            await self.stop(name)
            if handover and running is not None:
                try:
                    await self.store.save_snapshot(name, self.node, self.lease_ttl, running.room.snapshot())
                    await self.store.release(name, self.node)
                except Exception as exc:
                    log.warning("room %s: no last snapshot: %r", name, exc)

    async def _snapshot(self, room: Room) -> bool:
        try:
            saved = await self.store.save_snapshot(room.spec.room, self.node, self.lease_ttl, room.snapshot())
        except Exception as exc:
            log.warning("room %s: snapshot failed, the room keeps running: %r", room.spec.room, exc)
            return True
        if not saved:
            log.info("room %s is no longer ours (taken over or deleted): stopping it", room.spec.room)
        return saved

    def _publisher(self, kind: str) -> Any:
        broker = self.broker

        async def publish(publications: list[tuple[str, bytes]], replies: list[tuple[str, bytes]]) -> None:
            # State and replies of the tick in one round trip.
            requests = [PublishRequest(channel, data, SIM_STATE) for channel, data in publications]
            requests += [PublishRequest(channel, data, REPLY_OPTIONS) for channel, data in replies]
            await publish_all(broker, requests)
            room_bytes = sum(len(d) for c, d in publications if ".cell." not in c)
            cell_bytes = sum(len(d) for c, d in publications if ".cell." in c)
            BYTES_SENT.labels(kind, "room").inc(room_bytes)
            if cell_bytes:
                BYTES_SENT.labels(kind, "cell").inc(cell_bytes)
            if replies:
                BYTES_SENT.labels(kind, "reply").inc(sum(len(d) for _, d in replies))

        return publish

    # the periodic scan: renew our leases, give up lost rooms, adopt orphans

    async def scan(self) -> None:
        for name in list(self.rooms):
            if await self.store.renew(name, self.node, self.lease_ttl) != 1:
                log.info("room %s is no longer ours (taken over or deleted): stopping it", name)
                await self.stop(name)
        for name, raw in (await self.store.specs()).items():
            if name in self.rooms or len(self.rooms) >= self.max_rooms:
                continue
            if await self.store.adopt(name, self.node, self.lease_ttl):
                try:
                    await self._start(RoomSpec.from_dict(raw))
                except Exception as exc:
                    log.error("room %s cannot start here: %r", name, exc)
                    await self.store.release(name, self.node)

    async def run_scanner(self, interval: float) -> None:
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("room scan failed: %r", exc)
            await asyncio.sleep(interval)

    # inputs from the bus

    async def handle_batch(self, messages: Sequence[BusMessage]) -> None:
        """The bus handler: a batch of one partition's inputs, submitted to their rooms in order."""
        for message in messages:
            await self.handle(message)

    async def handle(self, message: BusMessage) -> None:
        try:
            envelope = envelope_of(message)
            event = payload_of(envelope, SimInput)
            sent_ms = envelope.time_unix_ms
        except EnvelopeError as exc:
            log.warning("dropping a sim input that is not a SimInput envelope: %s", exc)
            return
        if sent_ms and time.time() * 1000 - sent_ms > self.input_max_age * 1000:
            INPUTS.labels("", "stale").inc()
            return
        item = PendingInput(event.user_id, event.client_id, event.client_seq, event.input, event.content_type)
        running = self.rooms.get(event.room)
        if running is not None:
            running.room.submit(item)
            return
        raw = await self.store.spec(event.room)
        if raw is None:
            await self._refuse(item, event.room, "unknown_room", f"no room {event.room!r}: create it first")
            return
        # Its inputs come to us: the room's partition is ours, so the room is too.
        await self.store.claim(event.room, self.node, self.lease_ttl)
        room = await self._start(RoomSpec.from_dict(raw))
        room.submit(item)

    async def _refuse(self, item: PendingInput, room: str, reason: str, message: str) -> None:
        if not item.user:
            return
        INPUTS.labels("", "rejected").inc()
        body = {"type": "sim.rejected", "room": room, "client": item.client, "client_seq": item.seq}
        body |= {"reason": reason, "message": message}
        await self.broker.publish(REPLIES.format(user=item.user), json.dumps(body).encode(), REPLY_OPTIONS)

    # answers for HTTP

    async def describe(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        running = self.rooms.get(name)
        out: dict[str, Any] = {**raw, "owner": await self.store.owner(name), "running_here": running is not None}
        if running is not None:
            room = running.room
            out |= {
                "tick": room.tick,
                "entities": len(room.sent),
                "overruns": room.overruns,
                "skipped_ticks": room.skipped_ticks,
                "last_tick_seconds": room.last_tick_seconds,
            }
            recent = sorted(room.recent_ticks)
            if recent:
                out["tick_seconds_p50"] = recent[len(recent) // 2]
                out["tick_seconds_p99"] = recent[min(len(recent) - 1, int(len(recent) * 0.99))]
        return out

    async def state(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        running = self.rooms.get(name)
        if running is not None:
            return running.room.state() | {"source": "live"}
        room = Room(RoomSpec.from_dict(raw))
        snapshot = await self.store.snapshot(name)
        if snapshot is None:
            return room.state() | {"source": "initial"}
        room.restore(snapshot)
        return room.state() | {"source": "snapshot"}
