"""Kafka engine on confluent-kafka (librdkafka).

librdkafka is callback- and poll-driven, so each producer and consumer owns one thread that
polls it, and results cross into asyncio with `call_soon_threadsafe`. The consumer hands each
event to the event loop and waits for its handler before storing the offset, which keeps
partition order and makes the stored offset mean "done" (commits carry only stored offsets).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tsunagu_core.bus.base import (
    Bus,
    BusError,
    BusMessage,
    Delivery,
    Handler,
    RetryPolicy,
    Subscription,
    encode_key,
    handle_with_retry,
)
from tsunagu_core.config import TlsSettings
from tsunagu_core.telemetry import BUS_CONSUMER_LAG, BUS_PUBLISH_ERRORS, BUS_PUBLISHED, inject_trace_headers

log = logging.getLogger("tsunagu.bus.kafka")


class KafkaBus(Bus):
    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "tsunagu",
        partitions: int = 6,
        replication: int = 1,
        extra_config: Mapping[str, Any] | None = None,
        stats_interval: float = 10.0,
        tls: TlsSettings | None = None,
    ) -> None:
        from tsunagu_core.tls import kafka_config

        self.bootstrap = bootstrap
        self.stats_interval = stats_interval
        self.client_id = client_id
        self.partitions = partitions
        self.replication = replication
        # TLS from TSUNAGU_KAFKA_SECURITY_PROTOCOL and TSUNAGU_TLS_* (a ConfigError when a file is missing)
        self.extra_config = {**kafka_config(tls), **(extra_config or {})}
        self.last_error = ""
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._poller: threading.Thread | None = None
        self._closed = threading.Event()
        self._consumers: set[_KafkaConsumer] = set()

    def _common_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            "error_cb": self._on_error,
            **self.extra_config,
        }

    def _on_error(self, error: KafkaError) -> None:
        # librdkafka says why a broker connection failed (e.g. a plaintext client on an SSL listener)
        # only here; ping() quotes it.
        self.last_error = error.str()

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._admin = AdminClient(self._common_config())
        await self.ping()
        self._producer = Producer(
            {
                **self._common_config(),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "delivery.timeout.ms": 30000,
                "compression.type": "lz4",
            }
        )
        self._closed.clear()
        self._poller = threading.Thread(target=self._poll_producer, name="kafka-producer-poll", daemon=True)
        self._poller.start()

    def _poll_producer(self) -> None:
        producer = self._producer
        assert producer is not None
        while not self._closed.is_set():
            producer.poll(0.1)

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.stop()
        producer = self._producer
        if producer is not None:
            remaining = await asyncio.to_thread(producer.flush, 10)
            if remaining:
                log.warning("%d events were still undelivered when the producer closed", remaining)
        self._closed.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, 5)
        self._producer = None
        self._poller = None

    async def ping(self) -> None:
        admin = self._admin or AdminClient(self._common_config())
        try:
            await asyncio.to_thread(admin.list_topics, timeout=3)
        except KafkaException as exc:
            cause = f" ({self.last_error})" if self.last_error else ""
            raise BusError(
                f"Kafka at {self.bootstrap} does not answer: {exc.args[0]}{cause}{self._tls_hint(exc)}"
            ) from None

    def _tls_hint(self, exc: KafkaException) -> str:
        """What a failed transport most likely means when the two sides disagree about TLS."""
        error = exc.args[0] if exc.args else None
        if not isinstance(error, KafkaError) or error.code() not in (
            KafkaError._TRANSPORT,
            KafkaError._ALL_BROKERS_DOWN,
        ):
            return ""
        if self.extra_config.get("security.protocol", "PLAINTEXT") == "PLAINTEXT":
            return "; if the listener is SSL-only, set TSUNAGU_KAFKA_SECURITY_PROTOCOL=SSL (and TSUNAGU_TLS_*)"
        return "; if the listener is not SSL, TSUNAGU_KAFKA_SECURITY_PROTOCOL=SSL is wrong, else check TSUNAGU_TLS_*"

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        admin = self._admin or AdminClient(self._common_config())
        metadata = await asyncio.to_thread(admin.list_topics, timeout=5)
        missing = [t for t in topics if t not in metadata.topics]
        if not missing:
            return
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=self.partitions, replication_factor=self.replication) for t in missing],
            operation_timeout=10,
        )
        for topic, future in futures.items():
            try:
                await asyncio.wrap_future(future)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BusError(f"cannot create topic {topic}: {exc.args[0]}") from None
            else:
                log.info("created topic %s (%d partitions)", topic, self.partitions)

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Delivery:
        producer = self._producer
        if producer is None:
            raise BusError("the Kafka bus is not started")
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[Delivery] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, delivered, err, msg)

        all_headers = inject_trace_headers(dict(headers or {}))
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=encode_key(key),
                    headers=list(all_headers.items()),
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                # The local queue is full: wait for deliveries instead of failing the caller.
                await asyncio.sleep(0.01)
        try:
            result = await delivered
        except BusError:
            BUS_PUBLISH_ERRORS.labels(topic).inc()
            raise
        BUS_PUBLISHED.labels(topic).inc()
        return result

    async def consume(
        self,
        topics: Sequence[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy = RetryPolicy(),
    ) -> Subscription:
        config = {
            **self._common_config(),
            "group.id": group,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            # librdkafka's statistics carry each assigned partition's lag: exported as a gauge.
            "statistics.interval.ms": int(self.stats_interval * 1000),
            "stats_cb": lambda stats: record_consumer_lag(group, stats),
        }
        consumer = _KafkaConsumer(self, asyncio.get_running_loop(), list(topics), group, handler, retry, config)
        self._consumers.add(consumer)
        consumer.start()
        return consumer

    def forget(self, consumer: _KafkaConsumer) -> None:
        self._consumers.discard(consumer)


def record_consumer_lag(group: str, stats_json: str) -> None:
    """Messages not yet handled by this consumer, per topic: the sum over its partitions that know their lag."""
    try:
        stats = json.loads(stats_json)
    except ValueError:
        return
    for topic, topic_stats in (stats.get("topics") or {}).items():
        lags = [
            partition.get("consumer_lag", -1)
            for number, partition in (topic_stats.get("partitions") or {}).items()
            if number != "-1"
        ]
        known = [lag for lag in lags if isinstance(lag, int) and lag >= 0]
        if known:
            BUS_CONSUMER_LAG.labels(topic, group).set(sum(known))


def _settle(future: asyncio.Future[Delivery], err: KafkaError | None, msg: Message) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(BusError(f"Kafka did not accept the event: {err.str()}"))
    else:
        future.set_result(Delivery(msg.topic() or "", msg.partition() or 0, msg.offset() or 0))


def _to_bus_message(msg: Message) -> BusMessage:
    received = msg.headers() or []
    pairs = received.items() if isinstance(received, dict) else received
    headers = {}
    for name, raw in pairs:
        headers[name] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
    _, timestamp = msg.timestamp()
    return BusMessage(
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        key=msg.key(),
        value=msg.value() or b"",
        headers=headers,
        timestamp_ms=timestamp,
    )


class _KafkaConsumer(Subscription):
    def __init__(
        self,
        bus: KafkaBus,
        loop: asyncio.AbstractEventLoop,
        topics: list[str],
        group: str,
        handler: Handler,
        retry: RetryPolicy,
        config: dict[str, Any],
    ) -> None:
        self.bus = bus
        self.loop = loop
        self.topics = topics
        self.group = group
        self.handler = handler
        self.retry = retry
        self.config = config
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kafka-consumer-{group}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        consumer = Consumer(self.config)
        consumer.subscribe(self.topics)
        try:
            while not self._stopping.is_set():
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer %s: %s", self.group, error.str())
                    continue
                outcome = asyncio.run_coroutine_threadsafe(
                    handle_with_retry(self.bus, _to_bus_message(msg), self.group, self.handler, self.retry),
                    self.loop,
                )
                try:
                    outcome.result()
                except (concurrent.futures.CancelledError, RuntimeError):
                    # The loop is going away: leave the offset unstored so the event is redelivered.
                    break
                consumer.store_offsets(message=msg)
        finally:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("consumer %s: final commit failed: %s", self.group, exc.args[0])
            consumer.close()

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)
        self.bus.forget(self)
