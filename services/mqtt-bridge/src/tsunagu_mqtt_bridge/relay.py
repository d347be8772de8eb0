"""MQTT -> channels: telemetry relay, device presence, and answers to `mqtt.request`.

A message is PUBACKed (connection.py) only after `handle` returned, and `handle` returns only after
the broker (Redis) accepted the publication. Messages are spread over `relay_workers` queues by
topic, so one topic's messages reach its channel in the order the MQTT broker sent them; each worker
takes everything waiting in its queue (up to `relay_batch_size`) and publishes it in one broker call,
so gmqtt's callbacks of one read become one round trip. A broker failure is retried with backoff
(the messages stay unacknowledged, so the MQTT broker keeps them) rather than dropped.

With `ack_in_order`, `handle` also returns in arrival order, whatever order the relays finish in: MQTT
requires PUBACKs in the order the PUBLISHes came [MQTT-4.6.0-2], and a strict broker (rumqttd, the one
`tsunagu run` embeds) disconnects a client that acknowledges out of order. This is the default; off,
each message is acknowledged as soon as its batch is relayed, which Mosquitto tolerates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gmqtt.mqtt.constants import PubRecReasonCode
from prometheus_client import Counter, Histogram
from tsunagu_core.broker import Broker, ClientInfo, PublishOptions, PublishRequest

from tsunagu_mqtt_bridge.config import MqttBridgeSettings
from tsunagu_mqtt_bridge.mapping import (
    ONLINE,
    Rejected,
    channel_for_topic,
    check_payload,
    presence_status,
    wildcard_values,
)

log = logging.getLogger("tsunagu.mqtt_bridge")

RELAYED = Counter("tsunagu_mqtt_relayed_total", "MQTT messages published to their channel", ["retained"])
REJECTED = Counter("tsunagu_mqtt_rejected_total", "MQTT messages or commands that could not be mapped", ["reason"])
RELAY_SECONDS = Histogram(
    "tsunagu_mqtt_relay_seconds",
    "From an MQTT message's arrival to the channel publication being accepted (per batch, its oldest message)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
PRESENCE = Counter("tsunagu_mqtt_presence_total", "Device presence changes pushed to channels", ["status"])
BROKER_RETRIES = Counter("tsunagu_mqtt_broker_retries_total", "Channel publications retried after a broker error")


@dataclass(slots=True)
class _Item:
    topic: str
    payload: bytes
    retained: bool
    arrived: float
    done: asyncio.Future[None]


class Relay:
    def __init__(self, settings: MqttBridgeSettings, broker: Broker, *, response_root: str) -> None:
        self.settings = settings
        self.broker = broker
        # Responses to `mqtt.request` of every replica live under this root: answered, never relayed.
        self.response_root = response_root
        self.options = PublishOptions(
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            meta_ttl=max(86400.0, settings.history_ttl * 10),
        )
        self.pending_requests: dict[bytes, asyncio.Future[tuple[str, bytes]]] = {}
        # Resolved once the last message handed to `handle` may be acknowledged.
        self._last_ack: asyncio.Future[None] | None = None
        self._queues: list[asyncio.Queue[_Item]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._ready: Callable[[], Awaitable[None]] | None = None

    def start(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start the workers; they relay once `ready()` returned (the broker is connected)."""
        self._ready = ready
        self._queues = [asyncio.Queue() for _ in range(self.settings.relay_workers)]
        self._workers = [
            asyncio.create_task(self._work(queue), name=f"mqtt-relay-{i}") for i, queue in enumerate(self._queues)
        ]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []

    async def handle(self, topic: str, payload: bytes, qos: int, properties: dict[str, Any]) -> int:
        """gmqtt's on_message: returns the PUBACK reason code once the message is taken care of (and, with
        `ack_in_order`, every message that arrived before it was acknowledged)."""
        if not self.settings.ack_in_order:
            await self._take(topic, payload, properties)
            return int(PubRecReasonCode.SUCCESS)
        # Taken before the first await: tasks start in arrival order, so this chain is arrival order.
        previous, turn = self._last_ack, asyncio.get_running_loop().create_future()
        self._last_ack = turn
        try:
            await self._take(topic, payload, properties)
            if previous is not None:
                await asyncio.shield(previous)
            return int(PubRecReasonCode.SUCCESS)
        finally:
            # Also after a failure (no PUBACK for this one: the broker redelivers it): later ones go on.
            turn.set_result(None)
            if self._last_ack is turn:
                self._last_ack = None

    async def _take(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        """An answer to `mqtt.request` is handed to its waiter; anything else is relayed to its channel."""
        if topic.startswith(self.response_root):
            self._answer(topic, payload, properties)
            return
        if not self._queues:
            raise RuntimeError("relay not started")
        retained = bool(properties.get("retain"))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Enqueued before the first await: queue order is arrival order.
        shard = zlib.crc32(topic.encode()) % len(self._queues)
        self._queues[shard].put_nowait(_Item(topic, payload, retained, time.perf_counter(), done))
        await done

    def _answer(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        correlation = properties.get("correlation_data")
        key = correlation[0] if isinstance(correlation, list) and correlation else correlation
        if isinstance(key, str):
            key = key.encode()
        waiter = self.pending_requests.get(key) if isinstance(key, bytes) else None
        if waiter is not None and not waiter.done():
            waiter.set_result((topic, payload))

    async def _work(self, queue: asyncio.Queue[_Item]) -> None:
        if self._ready is not None:
            await self._ready()
        limit = self.settings.relay_batch_size
        while True:
            batch = [await queue.get()]
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._relay(batch)
            except asyncio.CancelledError:
                for item in batch:
                    item.done.cancel()
                raise
            except Exception as exc:  # never lose the worker; the messages stay unacknowledged
                log.exception("relaying %d messages failed", len(batch))
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
            else:
                for item in batch:
                    if not item.done.done():
                        item.done.set_result(None)

    async def _relay(self, batch: list[_Item]) -> None:
        requests = []
        relayed = []
        for item in batch:
            try:
                channel = channel_for_topic(item.topic)
                check_payload(item.payload, self.settings.max_payload_bytes)
            except Rejected as exc:
                REJECTED.labels(exc.reason).inc()
                log.warning("rejected MQTT message on %r: %s", item.topic[:120], exc)
                continue
            requests.append(PublishRequest(channel, item.payload, self.options))
            relayed.append(item)
        if not requests:
            return
        await self._with_retry(lambda: self.broker.publish_many(requests))
        # Once per batch, for its oldest message: an observation per message was 6% of the bridge's CPU.
        RELAY_SECONDS.observe(time.perf_counter() - relayed[0].arrived)
        retained = sum(item.retained for item in relayed)
        if retained:
            RELAYED.labels("true").inc(retained)
        if len(relayed) > retained:
            RELAYED.labels("false").inc(len(relayed) - retained)
        if self.settings.presence_topic:
            for item in relayed:
                await self._presence(item.topic, item.payload)

    async def _with_retry(self, operation: Any) -> Any:
        delay = 0.05
        while True:
            try:
                return await operation()
            except Exception as exc:
                BROKER_RETRIES.inc()
                log.warning("broker not accepting now (%r); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _presence(self, topic: str, payload: bytes) -> None:
        devices = wildcard_values(self.settings.presence_topic, topic)
        if not devices:
            return
        status = presence_status(payload)
        if status is None:
            REJECTED.labels("bad_status").inc()
            log.warning("status message on %r is neither online nor offline", topic[:120])
            return
        device = devices[0]
        try:
            channel = self.settings.presence_channel.format(device=device)
        except (KeyError, IndexError, ValueError) as exc:
            REJECTED.labels("bad_presence_channel").inc()
            log.warning("presence channel template failed for %r: %r", device, exc)
            return
        client_id = f"mqtt-device:{device}"
        info = ClientInfo(user=device, client=client_id)
        present = await self._with_retry(lambda: self.broker.presence(channel))
        if status == ONLINE:
            await self._with_retry(
                lambda: self.broker.add_presence(channel, client_id, info, ttl=self.settings.presence_ttl)
            )
            if client_id not in present:
                await self._with_retry(lambda: self.broker.publish_presence(channel, True, info))
                PRESENCE.labels(status).inc()
        elif client_id in present:
            await self._with_retry(lambda: self.broker.remove_presence(channel, client_id))
            await self._with_retry(lambda: self.broker.publish_presence(channel, False, info))
            PRESENCE.labels(status).inc()
