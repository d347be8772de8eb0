"""Kafka `tsunagu.mqtt.commands` -> device: publish QoS 1, then report the result to the sender.

The bus delivers at least once (a bridge that dies before its Kafka offset is committed gets the
command again). The ledger keeps each command's state under its id (Redis `SET NX` with a TTL, or a
dict in memory mode) so the device gets it at most once from us:
- no state: claim `sending`, publish, wait for the broker's PUBACK, record `delivered`;
- `delivered` / `failed` / `timed_out`: not sent again, the recorded result is reported again (the reply
  carries an idempotency key, so the sender sees one result);
- `sending`: a bridge stopped between publishing and the PUBACK; whether the broker (and so the device)
  got it is unknown, so it is not resent (no duplicate) and reported `unconfirmed` with that reason:
  the sender learns it may have arrived, rather than a `failed` that may be false.
A command whose deadline has passed is not sent and reported `timed_out`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import orjson
from prometheus_client import Counter, Histogram
from tsunagu_core.broker import Broker, PublishOptions
from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.wire.events_pb2 import MqttCommand

from tsunagu_mqtt_bridge.connection import MqttConnection, MqttError
from tsunagu_mqtt_bridge.mapping import Rejected, validate_publish_topic
from tsunagu_mqtt_bridge.relay import REJECTED

log = logging.getLogger("tsunagu.mqtt_bridge.commands")

COMMANDS = Counter("tsunagu_mqtt_commands_total", "Device commands by result", ["status"])
COMMAND_SECONDS = Histogram(
    "tsunagu_mqtt_command_seconds",
    "From a command's arrival to the broker's acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)

DELIVERED = "delivered"
FAILED = "failed"
UNCONFIRMED = "unconfirmed"
TIMED_OUT = "timed_out"
SENDING = "sending"
REPLIES_PREFIX = "replies:"
KEY_PREFIX = "tsunagu:mqtt-bridge:command:"


class Ledger(Protocol):
    async def get(self, command_id: str) -> str | None: ...

    async def claim(self, command_id: str) -> bool:
        """Record `sending` unless the command has a state already; True when this call recorded it."""

    async def put(self, command_id: str, state: str) -> None: ...

    async def close(self) -> None: ...


class MemoryLedger:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._states: dict[str, tuple[str, float]] = {}

    async def get(self, command_id: str) -> str | None:
        entry = self._states.get(command_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    async def claim(self, command_id: str) -> bool:
        if await self.get(command_id) is not None:
            return False
        await self.put(command_id, SENDING)
        if len(self._states) > 100_000:
            now = time.monotonic()
            self._states = {k: v for k, v in self._states.items() if v[1] >= now}
        return True

    async def put(self, command_id: str, state: str) -> None:
        self._states[command_id] = (state, time.monotonic() + self.ttl)

    async def close(self) -> None:
        return None


class RedisLedger:
    def __init__(self, url: str, ttl: float) -> None:
        from tsunagu_core.redis_pool import redis_client

        self.ttl = max(1, int(ttl))
        self.redis = redis_client(url, socket_timeout=5.0, connect_timeout=5.0)

    async def get(self, command_id: str) -> str | None:
        value = await self.redis.get(KEY_PREFIX + command_id)
        return value.decode() if isinstance(value, bytes) else value

    async def claim(self, command_id: str) -> bool:
        return bool(await self.redis.set(KEY_PREFIX + command_id, SENDING, nx=True, ex=self.ttl))

    async def put(self, command_id: str, state: str) -> None:
        await self.redis.set(KEY_PREFIX + command_id, state, ex=self.ttl)

    async def close(self) -> None:
        await self.redis.aclose()


class CommandHandler:
    def __init__(self, connection: MqttConnection, broker: Broker, ledger: Ledger) -> None:
        self.connection = connection
        self.broker = broker
        self.ledger = ledger

    async def handle(self, message: BusMessage) -> None:
        try:
            command = payload_of(envelope_of(message), MqttCommand)
        except EnvelopeError as exc:
            REJECTED.labels("bad_command").inc()
            log.error("dropping %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
            return
        if not command.command_id:
            REJECTED.labels("bad_command").inc()
            log.error("dropping a command without an id at %s[%d]@%d", message.topic, message.partition, message.offset)
            return
        status, reason = await self.execute(command)
        COMMANDS.labels(status).inc()
        await self.report(command, status, reason)

    async def execute(self, command: MqttCommand) -> tuple[str, str]:
        known = await self.ledger.get(command.command_id)
        if known is not None:
            return self._again(known)
        remaining = (command.deadline_unix_ms / 1000 - time.time()) if command.deadline_unix_ms else 30.0
        if remaining <= 0:
            await self.ledger.put(command.command_id, TIMED_OUT)
            return TIMED_OUT, "the deadline passed before the bridge received the command"
        try:
            validate_publish_topic(command.topic)
        except Rejected as exc:
            REJECTED.labels(exc.reason).inc()
            await self.ledger.put(command.command_id, FAILED)
            return FAILED, str(exc)
        if not await self.ledger.claim(command.command_id):
            # Another replica (or an earlier attempt) got there between our get and claim.
            return self._again(await self.ledger.get(command.command_id) or SENDING)
        started = time.perf_counter()
        try:
            await self.connection.publish(
                command.topic,
                command.payload,
                qos=1,
                retain=command.retain,
                timeout=remaining,
                user_property=[("command_id", command.command_id)],
            )
        except TimeoutError:
            await self.ledger.put(command.command_id, TIMED_OUT)
            return TIMED_OUT, "the MQTT broker did not acknowledge the command before its deadline"
        except MqttError as exc:
            await self.ledger.put(command.command_id, FAILED)
            return FAILED, str(exc)
        COMMAND_SECONDS.observe(time.perf_counter() - started)
        await self.ledger.put(command.command_id, DELIVERED)
        return DELIVERED, ""

    @staticmethod
    def _again(state: str) -> tuple[str, str]:
        if state == SENDING:
            return UNCONFIRMED, "a bridge stopped before the broker confirmed it; not resent to avoid a duplicate"
        if state == DELIVERED:
            return DELIVERED, ""
        return state, "reported before"

    async def report(self, command: MqttCommand, status: str, reason: str) -> None:
        if not command.reply_channel.startswith(REPLIES_PREFIX):
            if command.reply_channel:
                log.warning("not reporting to %r: results go to replies: channels", command.reply_channel[:80])
            return
        body = orjson.dumps({"command_id": command.command_id, "status": status, "reason": reason})
        options = PublishOptions(
            history_size=100,
            history_ttl=300,
            idempotency_key=f"mqtt-command-result/{command.command_id}",
        )
        await self.broker.publish(command.reply_channel, body, options)
