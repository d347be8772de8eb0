"""Durable event bus with two engines behind one interface: Kafka and in-memory."""

from tsunagu_core.bus.base import (
    DEAD_LETTER_SUFFIX,
    BatchHandler,
    BatchPolicy,
    Bus,
    BusError,
    BusMessage,
    Delivery,
    Handler,
    Outgoing,
    Rejected,
    RetryPolicy,
    Subscription,
)
from tsunagu_core.bus.memory import MemoryBus

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "BatchHandler",
    "BatchPolicy",
    "Bus",
    "BusError",
    "BusMessage",
    "Delivery",
    "Handler",
    "MemoryBus",
    "Outgoing",
    "Rejected",
    "RetryPolicy",
    "Subscription",
]
