"""Kafka engine on confluent-kafka (librdkafka).

librdkafka is callback- and poll-driven, so each producer and consumer owns one thread that
polls it, and results cross into asyncio with `call_soon_threadsafe`, once per batch. The
consumer thread takes what librdkafka has fetched (`consume(num_messages)`) and hands it to the
event loop in one call; there each partition has a queue and a worker that runs the handler on a
batch of it and then stores the batch's last offset, which keeps partition order and makes the
stored offset mean "done" (commits carry only stored offsets). A partition whose queue grows past
`BatchPolicy.max_buffered` is paused (librdkafka drops what it prefetched and resumes after the
last event it handed over, so nothing is skipped or read twice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import queue
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tsunagu_core.bus.base import (
    BatchHandler,
    BatchPolicy,
    Bus,
    BusError,
    BusMessage,
    Delivery,
    Outgoing,
    RetryPolicy,
    Subscription,
    encode_key,
    handle_batch_with_retry,
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
        self._settled: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Delivery], Delivery | BusError]] = []
        self._settled_lock = threading.Lock()
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
            self._hand_over_settled()
        self._hand_over_settled()

    def _on_settled(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Delivery], err: KafkaError | None, msg: Message
    ) -> None:
        """A delivery report (poll thread): kept until the poll returns, then handed to the loop with
        the others of the same poll, one wake-up of the loop per poll instead of one per event."""
        if err is not None:
            outcome: Delivery | BusError = BusError(f"Kafka did not accept the event: {err.str()}")
        else:
            outcome = Delivery(msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        with self._settled_lock:
            self._settled.append((loop, future, outcome))

    def _hand_over_settled(self) -> None:
        with self._settled_lock:
            settled, self._settled = self._settled, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Delivery], Delivery | BusError]]] = {}
        for loop, future, outcome in settled:
            by_loop.setdefault(loop, []).append((future, outcome))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop that has closed meanwhile
                loop.call_soon_threadsafe(_settle_all, outcomes)

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
        on_delivery = functools.partial(self._on_settled, loop, delivered)
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

    async def publish_many(self, events: Sequence[Outgoing]) -> list[Delivery]:
        """Produce every event without waiting between them; one wake-up of the loop when all are settled."""
        producer = self._producer
        if producer is None:
            raise BusError("the Kafka bus is not started")
        if not events:
            return []
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[None] = loop.create_future()
        results: list[Delivery | None] = [None] * len(events)
        errors: list[str] = []
        outstanding = [len(events)]
        lock = threading.Lock()

        def on_delivery(index: int, err: KafkaError | None, msg: Message) -> None:
            # Runs on the poll thread (or in produce() on this thread when the queue rejects it).
            if err is not None:
                errors.append(err.str())
            else:
                results[index] = Delivery(msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
            with lock:
                outstanding[0] -= 1
                last = outstanding[0] == 0
            if last:
                loop.call_soon_threadsafe(_resolve, settled)

        trace = inject_trace_headers({})
        for index, event in enumerate(events):
            headers: dict[str, str | bytes | None] = {**trace, **event.headers} if event.headers else {**trace}
            callback = functools.partial(on_delivery, index)
            while True:
                try:
                    producer.produce(
                        event.topic,
                        value=event.value,
                        key=encode_key(event.key),
                        headers=headers,
                        on_delivery=callback,
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
        await settled
        for event in events:
            BUS_PUBLISHED.labels(event.topic).inc()
        if errors:
            for event in events:
                BUS_PUBLISH_ERRORS.labels(event.topic).inc()
            raise BusError(f"Kafka did not accept {len(errors)} of {len(events)} events: {errors[0]}")
        return [r for r in results if r is not None]

    def _consumer_config(self, group: str, from_latest: bool = False) -> dict[str, Any]:
        return {
            **self._common_config(),
            "group.id": group,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "latest" if from_latest else "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            # librdkafka's statistics carry each assigned partition's lag: exported as a gauge.
            "statistics.interval.ms": int(self.stats_interval * 1000),
            "stats_cb": lambda stats: record_consumer_lag(group, stats),
        }

    async def consume_batches(
        self,
        topics: Sequence[str],
        group: str,
        handler: BatchHandler,
        *,
        batch: BatchPolicy = BatchPolicy(),
        retry: RetryPolicy = RetryPolicy(),
        from_latest: bool = False,
    ) -> Subscription:
        config = self._consumer_config(group, from_latest)
        consumer = _KafkaConsumer(self, asyncio.get_running_loop(), list(topics), group, handler, retry, batch, config)
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
        # Measured from the stored offset (what handlers finished), not librdkafka's position, which
        # runs ahead by the events fetched and queued for a partition's worker.
        lags = [
            partition.get("consumer_lag_stored", partition.get("consumer_lag", -1))
            for number, partition in (topic_stats.get("partitions") or {}).items()
            if number != "-1"
        ]
        known = [lag for lag in lags if isinstance(lag, int) and lag >= 0]
        if known:
            BUS_CONSUMER_LAG.labels(topic, group).set(sum(known))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle_all(outcomes: list[tuple[asyncio.Future[Delivery], Delivery | BusError]]) -> None:
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BusError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


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


Partition = tuple[str, int]


class _KafkaConsumer(Subscription):
    """The consumer thread fetches; the event loop runs one worker per partition with events queued."""

    def __init__(
        self,
        bus: KafkaBus,
        loop: asyncio.AbstractEventLoop,
        topics: list[str],
        group: str,
        handler: BatchHandler,
        retry: RetryPolicy,
        batch: BatchPolicy,
        config: dict[str, Any],
    ) -> None:
        self.bus = bus
        self.loop = loop
        self.topics = topics
        self.group = group
        self.handler = handler
        self.retry = retry
        self.batch = batch
        self.config = config
        self._stopping = threading.Event()
        self._workers_done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kafka-consumer-{group}", daemon=True)
        # loop side
        self._pending: dict[Partition, deque[BusMessage]] = {}
        self._workers: dict[Partition, asyncio.Task[None]] = {}
        self._closing = False
        # loop -> thread: offsets to store (the next offset to read) and pause/resume requests
        self._done: queue.SimpleQueue[tuple[Partition, int]] = queue.SimpleQueue()
        self._flow: queue.SimpleQueue[tuple[Partition, bool]] = queue.SimpleQueue()
        self._paused: set[Partition] = set()

    def start(self) -> None:
        self._thread.start()

    # consumer thread

    def _run(self) -> None:
        consumer = Consumer(self.config)
        consumer.subscribe(self.topics, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        try:
            while not self._stopping.is_set():
                self._store_done(consumer)
                self._apply_flow(consumer)
                first = consumer.poll(0.1)
                if first is None:
                    continue
                # Whatever else librdkafka has fetched already, without waiting for more.
                messages = [first, *consumer.consume(self.batch.max_messages - 1, 0)]
                received = []
                for msg in messages:
                    error = msg.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer %s: %s", self.group, error.str())
                        continue
                    received.append(_to_bus_message(msg))
                if received:
                    try:
                        self.loop.call_soon_threadsafe(self._receive, received)
                    except RuntimeError:
                        break  # the loop is gone: nothing is stored, the events are read again
        finally:
            # Workers finish the batches in hand before the final commit (unless the loop is gone).
            if self._stopping.is_set() and not self.loop.is_closed():
                self._workers_done.wait(30)
            self._store_done(consumer)
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("consumer %s: final commit failed: %s", self.group, exc.args[0])
            with contextlib.suppress(RuntimeError):
                consumer.close()

    def _store_done(self, consumer: Consumer) -> None:
        latest: dict[Partition, int] = {}
        while True:
            try:
                pair, offset = self._done.get_nowait()
            except queue.Empty:
                break
            latest[pair] = max(offset, latest.get(pair, 0))
        if latest:
            try:
                consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in latest.items()])
            except KafkaException as exc:
                # A partition revoked meanwhile: its new owner reads from the last commit.
                log.info("consumer %s: offsets not stored: %s", self.group, exc.args[0])

    def _apply_flow(self, consumer: Consumer) -> None:
        while True:
            try:
                (topic, partition), pause = self._flow.get_nowait()
            except queue.Empty:
                return
            try:
                if pause:
                    consumer.pause([TopicPartition(topic, partition)])
                else:
                    consumer.resume([TopicPartition(topic, partition)])
            except KafkaException as exc:
                log.info("consumer %s: pause/resume of %s[%d]: %s", self.group, topic, partition, exc.args[0])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let the revoked partitions' batches in hand finish and commit them before the new owner reads."""
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        # When the loop is gone or stuck, unfinished batches are read again by the next owner.
        with contextlib.suppress(concurrent.futures.CancelledError, concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(self._release(revoked), self.loop).result(60)
        self._store_done(consumer)
        if self.config.get("enable.auto.commit"):
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.info("consumer %s: commit on revoke failed: %s", self.group, exc.args[0])
        for pair in revoked:
            self._paused.discard(pair)

    # event loop

    def _receive(self, messages: list[BusMessage]) -> None:
        for message in messages:
            pair = (message.topic, message.partition)
            pending = self._pending.get(pair)
            if pending is None:
                pending = self._pending[pair] = deque()
            pending.append(message)
        for pair, pending in self._pending.items():
            if pending and pair not in self._workers and not self._closing:
                self._workers[pair] = self.loop.create_task(self._work(pair), name=f"kafka-{self.group}-{pair[1]}")
            if len(pending) > self.batch.max_buffered and pair not in self._paused:
                self._paused.add(pair)
                self._flow.put((pair, True))

    async def _work(self, pair: Partition) -> None:
        pending = self._pending[pair]
        try:
            while pending and not self._closing:
                size = min(len(pending), self.batch.max_messages)
                messages = [pending.popleft() for _ in range(size)]
                await handle_batch_with_retry(self.bus, messages, self.group, self.handler, self.retry)
                self._done.put((pair, messages[-1].offset + 1))
                if pair in self._paused and len(pending) <= self.batch.max_buffered // 2:
                    self._paused.discard(pair)
                    self._flow.put((pair, False))
        finally:
            self._workers.pop(pair, None)

    async def _release(self, revoked: list[Partition]) -> None:
        workers = [self._workers[pair] for pair in revoked if pair in self._workers]
        for pair in revoked:
            pending = self._pending.pop(pair, None)
            if pending is not None:
                pending.clear()  # read again by the partition's next owner
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)

    async def stop(self) -> None:
        self._stopping.set()
        self._closing = True
        # The batches in hand finish (their offsets are stored and committed); queued ones are read again.
        workers = [w for w in self._workers.values() if w is not asyncio.current_task()]
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._workers_done.set()
        await asyncio.to_thread(self._thread.join)
        self.bus.forget(self)
