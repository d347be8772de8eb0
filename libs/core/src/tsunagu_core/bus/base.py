"""The bus: durable, ordered, keyed events between services (Kafka in a cluster, memory in one process).

Delivery is at least once. A consumer's position moves past an event only after its handler
returned; a handler that keeps failing is retried with backoff and, after `max_attempts`, the
event goes to `<topic>.dlq` with the error in its headers so one poison event cannot stop a
partition for good.
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


Handler = Callable[[BusMessage], Awaitable[None]]


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

    @abc.abstractmethod
    async def consume(
        self,
        topics: Sequence[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy = RetryPolicy(),
    ) -> Subscription:
        """Join `group` and call `handler` for each event, one at a time per consumer, in partition order."""


def encode_key(key: bytes | str | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()


async def handle_with_retry(bus: Bus, message: BusMessage, group: str, handler: Handler, retry: RetryPolicy) -> None:
    """Run the handler until it succeeds or its attempts run out; then dead-letter the event."""
    backoff = retry.first_backoff
    for attempt in range(1, retry.max_attempts + 1):
        try:
            await handler(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            BUS_HANDLER_ERRORS.labels(message.topic, group).inc()
            if attempt == retry.max_attempts:
                log.error(
                    "giving up on %s[%d]@%d in group %s after %d attempts: %r",
                    message.topic,
                    message.partition,
                    message.offset,
                    group,
                    attempt,
                    exc,
                )
                await _dead_letter(bus, message, group, exc)
                return
            log.warning(
                "handler failed on %s[%d]@%d (attempt %d/%d): %r",
                message.topic,
                message.partition,
                message.offset,
                attempt,
                retry.max_attempts,
                exc,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, retry.max_backoff)
        else:
            BUS_CONSUMED.labels(message.topic, group).inc()
            return


async def _dead_letter(bus: Bus, message: BusMessage, group: str, exc: Exception) -> None:
    headers = dict(message.headers)
    headers.update(
        {
            "tsunagu-dlq-error": repr(exc)[:1000],
            "tsunagu-dlq-group": group,
            "tsunagu-dlq-origin": f"{message.topic}/{message.partition}/{message.offset}",
        }
    )
    await bus.publish(message.topic + DEAD_LETTER_SUFFIX, message.value, key=message.key, headers=headers)
    BUS_DEAD_LETTERS.labels(message.topic, group).inc()
