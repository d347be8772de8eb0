"""The bus: durable, ordered, keyed events between services (Kafka in a cluster, memory in one process).

Delivery is at least once. A consumer's position moves past an event only after its handler
returned; a handler that keeps failing is retried with backoff and, after `max_attempts`, the
event goes to `<topic>.dlq` with the error in its headers so one poison event cannot stop a
partition for good.

Batch consumers (`consume_batches`) get up to `BatchPolicy.max_messages` events of one partition
per call, in partition order; each partition has its own worker, so a slow partition does not
stall the others. The batch's offsets are committed once the handler returned. The handler names
the events it cannot take (`Rejected`, with a reason): those go to the dead-letter topic and the
rest of the batch counts as done. A handler that raises has its batch retried as a whole; once its
attempts run out, each event of the batch is tried alone, so only the poison ones are dead-lettered.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tsunagu_core.telemetry import BUS_CONSUMED, BUS_DEAD_LETTERS, BUS_HANDLER_ERRORS

log = logging.getLogger("tsunagu.bus")

DEAD_LETTER_SUFFIX = ".dlq"


@dataclass(frozen=True, slots=True)
class BusMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where the bus stored a published event."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One event of `Bus.publish_many`."""

    topic: str
    value: bytes
    key: bytes | str | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event a batch handler cannot take: it goes to the dead-letter topic with `reason`."""

    message: BusMessage
    reason: str


Handler = Callable[[BusMessage], Awaitable[None]]
BatchHandler = Callable[[Sequence[BusMessage]], Awaitable[Sequence[Rejected] | None]]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How big a batch gets and how much a partition may hold before fetching for it pauses."""

    max_messages: int = 500
    max_buffered: int = 5000


class BusError(Exception):
    """The bus could not accept or deliver an event."""


class Subscription(abc.ABC):
    """A running consumer in a group; stopping it commits what its handler finished."""

    @abc.abstractmethod
    async def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    first_backoff: float = 0.05
    max_backoff: float = 2.0


class Bus(abc.ABC):
    """Durable event bus; see the module docstring for the delivery promise."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raises when the engine cannot be reached (the caller retries with backoff)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise unless the engine answers now."""

    @abc.abstractmethod
    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet."""

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Delivery:
        """Return once the engine has durably accepted the event (acks=all for Kafka)."""

    async def consume(
        self,
        topics: Sequence[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy = RetryPolicy(),
    ) -> Subscription:
        """Join `group` and call `handler` for each event, one at a time per consumer, in partition order."""
        return await self.consume_batches(topics, group, one_at_a_time(handler), batch=EVENT_AT_A_TIME, retry=retry)

    @abc.abstractmethod
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
        """Join `group` and call `handler` with batches of one partition's events (see the module docstring).

        A group with no committed position starts at the oldest event the topics hold, or with `from_latest`
        at the newest (a relay added to a running platform, which must not replay what came before it)."""

    async def publish_many(self, events: Sequence[Outgoing]) -> list[Delivery]:
        """Publish every event, waiting once for all of them; raise if any was not accepted."""
        return [await self.publish(e.topic, e.value, key=e.key, headers=e.headers) for e in events]


def encode_key(key: bytes | str | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()


def one_at_a_time(handler: Handler) -> BatchHandler:
    """A batch handler calling an event handler for each event in turn, one event at a time for the
    whole consumer, as `Bus.consume` promises (its engines pass batches of one, so each event's
    offset is stored as soon as it is handled and retries and dead letters stay per event)."""
    turn = asyncio.Lock()

    async def handle_batch(messages: Sequence[BusMessage]) -> None:
        for message in messages:
            async with turn:
                await handler(message)

    return handle_batch


EVENT_AT_A_TIME = BatchPolicy(max_messages=1)


async def handle_batch_with_retry(
    bus: Bus, messages: Sequence[BusMessage], group: str, handler: BatchHandler, retry: RetryPolicy
) -> None:
    """Run a batch handler until it succeeds or its attempts run out; then try each event alone and
    dead-letter those that still fail. Rejected events are dead-lettered with their reason."""
    topic = messages[0].topic
    backoff = retry.first_backoff
    last_error = ""
    for attempt in range(1, retry.max_attempts + 1):
        try:
            rejected = await handler(messages) or ()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            BUS_HANDLER_ERRORS.labels(topic, group).inc()
            last_error = repr(exc)
            log.warning(
                "batch handler failed on %s[%d]@%d..%d (attempt %d/%d): %r",
                topic,
                messages[0].partition,
                messages[0].offset,
                messages[-1].offset,
                attempt,
                retry.max_attempts,
                exc,
            )
            if attempt == retry.max_attempts:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, retry.max_backoff)
        else:
            await _settle_batch(bus, messages, group, rejected)
            return
    if len(messages) == 1:
        await _dead_letter(bus, messages[0], group, last_error)
        return
    for message in messages:
        try:
            rejected = await handler([message]) or ()
        except asyncio.CancelledError:
            raise
        except Exception as alone:
            BUS_HANDLER_ERRORS.labels(topic, group).inc()
            log.error("giving up on %s[%d]@%d in group %s: %r", topic, message.partition, message.offset, group, alone)
            await _dead_letter(bus, message, group, repr(alone))
        else:
            await _settle_batch(bus, [message], group, rejected)


async def _settle_batch(bus: Bus, messages: Sequence[BusMessage], group: str, rejected: Sequence[Rejected]) -> None:
    for item in rejected:
        log.warning(
            "rejected %s[%d]@%d in group %s: %s",
            item.message.topic,
            item.message.partition,
            item.message.offset,
            group,
            item.reason,
        )
        await _dead_letter(bus, item.message, group, item.reason)
    BUS_CONSUMED.labels(messages[0].topic, group).inc(len(messages) - len(rejected))


async def _dead_letter(bus: Bus, message: BusMessage, group: str, reason: str) -> None:
    headers = dict(message.headers)
    headers.update(
        {
            "tsunagu-dlq-error": reason[:1000],
            "tsunagu-dlq-group": group,
            "tsunagu-dlq-origin": f"{message.topic}/{message.partition}/{message.offset}",
        }
    )
    await bus.publish(message.topic + DEAD_LETTER_SUFFIX, message.value, key=message.key, headers=headers)
    BUS_DEAD_LETTERS.labels(message.topic, group).inc()
