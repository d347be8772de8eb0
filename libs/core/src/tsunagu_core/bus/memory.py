"""In-process bus for `tsunagu run` and unit tests, with Kafka's semantics where tests can see them:
partitions chosen by key, consumer groups that split partitions and remember committed offsets."""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tsunagu_core.bus.base import (
    BatchHandler,
    BatchPolicy,
    Bus,
    BusMessage,
    Delivery,
    RetryPolicy,
    Subscription,
    encode_key,
    handle_batch_with_retry,
)
from tsunagu_core.telemetry import BUS_PUBLISHED, inject_trace_headers


@dataclass(slots=True)
class _Group:
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    members: list[_MemoryConsumer] = field(default_factory=list)
    # Partitions a member is handling a batch of: after a rebalance the new owner waits for it.
    busy: set[tuple[str, int]] = field(default_factory=set)


class MemoryBus(Bus):
    def __init__(self, partitions: int = 3) -> None:
        self.partitions = partitions
        self._logs: dict[str, list[list[BusMessage]]] = {}
        self._groups: dict[str, _Group] = {}
        self._round_robin = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for group in list(self._groups.values()):
            for member in list(group.members):
                await member.stop()

    async def ping(self) -> None:
        return None

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        for topic in topics:
            self._topic(topic)

    def _topic(self, topic: str) -> list[list[BusMessage]]:
        if topic not in self._logs:
            self._logs[topic] = [[] for _ in range(self.partitions)]
        return self._logs[topic]

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Delivery:
        logs = self._topic(topic)
        raw_key = encode_key(key)
        if raw_key is None:
            self._round_robin += 1
            partition = self._round_robin % self.partitions
        else:
            partition = zlib.crc32(raw_key) % self.partitions
        log = logs[partition]
        message = BusMessage(
            topic=topic,
            partition=partition,
            offset=len(log),
            key=raw_key,
            value=bytes(value),
            headers=inject_trace_headers(dict(headers or {})),
            timestamp_ms=int(time.time() * 1000),
        )
        log.append(message)
        BUS_PUBLISHED.labels(topic).inc()
        for group in self._groups.values():
            for member in group.members:
                member.wake.set()
        return Delivery(topic, partition, message.offset)

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
        for topic in topics:
            self._topic(topic)
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group()
            if from_latest:
                for topic in topics:
                    for partition, log in enumerate(self._logs[topic]):
                        state.committed[(topic, partition)] = len(log)
        member = _MemoryConsumer(self, state, list(topics), group, handler, retry, batch)
        state.members.append(member)
        member.task = asyncio.create_task(member.run(), name=f"memory-bus-consumer-{group}")
        return member

    def assignment(self, member: _MemoryConsumer) -> list[tuple[str, int]]:
        """Partitions of `member`, spread over the group's members the way a range assignor would."""
        members = member.state.members
        if member not in members:
            return []
        index = members.index(member)
        pairs = [(topic, p) for topic in member.topics for p in range(len(self._logs[topic]))]
        return [pair for i, pair in enumerate(pairs) if i % len(members) == index]

    def log_of(self, topic: str, partition: int) -> list[BusMessage]:
        return self._logs[topic][partition]


class _MemoryConsumer(Subscription):
    def __init__(
        self,
        bus: MemoryBus,
        state: _Group,
        topics: list[str],
        group: str,
        handler: BatchHandler,
        retry: RetryPolicy,
        batch: BatchPolicy,
    ) -> None:
        self.bus = bus
        self.state = state
        self.topics = topics
        self.group = group
        self.handler = handler
        self.retry = retry
        self.batch = batch
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._workers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stopping = False

    async def run(self) -> None:
        while not self._stopping:
            self.wake.clear()
            for pair in self.bus.assignment(self):
                if pair in self.state.busy:
                    continue
                position = self.state.committed.get(pair, 0)
                if position < len(self.bus.log_of(*pair)):
                    self.state.busy.add(pair)
                    self._workers[pair] = asyncio.create_task(self._work(pair), name=f"memory-bus-{self.group}")
            await self.wake.wait()

    async def _work(self, pair: tuple[str, int]) -> None:
        """Handle one partition's events a batch at a time while this member owns it."""
        try:
            while not self._stopping and pair in self.bus.assignment(self):
                position = self.state.committed.get(pair, 0)
                messages = self.bus.log_of(*pair)[position : position + self.batch.max_messages]
                if not messages:
                    break
                await handle_batch_with_retry(self.bus, messages, self.group, self.handler, self.retry)
                self.state.committed[pair] = position + len(messages)
        finally:
            self.state.busy.discard(pair)
            self._workers.pop(pair, None)
            for member in self.state.members:
                member.wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        if self in self.state.members:
            self.state.members.remove(self)
            for other in self.state.members:
                other.wake.set()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        # Let the batches in hand finish so their offsets are committed, as Kafka's close() does.
        workers = [w for w in self._workers.values() if w is not asyncio.current_task()]
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
