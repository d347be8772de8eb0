"""Fan-out, channel history and presence with two engines behind one interface: Redis and in-memory."""

from tsunagu_core.broker.base import (
    Broker,
    BrokerError,
    BrokerEventHandler,
    ClientInfo,
    HistoryResult,
    PresenceStats,
    Publication,
    PublishOptions,
    PublishRequest,
    PublishResult,
    StreamPosition,
)
from tsunagu_core.broker.memory import MemoryBroker

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerEventHandler",
    "ClientInfo",
    "HistoryResult",
    "MemoryBroker",
    "PresenceStats",
    "Publication",
    "PublishOptions",
    "PublishRequest",
    "PublishResult",
    "StreamPosition",
]
