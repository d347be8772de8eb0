"""Engines for the stream-ingest tests: memory always; Kafka and Redis together when the real stack is up."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from tsunagu_core.broker import Broker, MemoryBroker
from tsunagu_core.bus import Bus, MemoryBus
from tsunagu_core.testing import KAFKA_BOOTSTRAP, REDIS_URL, Recorder, require_stack


@dataclass
class Engines:
    name: str
    bus: Bus
    broker: Broker


@pytest.fixture(params=["memory", "real"])
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[Engines]:
    if request.param == "real":
        require_stack("stream-ingest on Kafka and Redis")
        from tsunagu_core.broker.redis import RedisBroker
        from tsunagu_core.bus.kafka import KafkaBus

        bus: Bus = KafkaBus(KAFKA_BOOTSTRAP, client_id="stream-ingest-tests", partitions=3, stats_interval=1.0)
        broker: Broker = RedisBroker(REDIS_URL, prefix=f"test-ingest-{uuid.uuid4().hex[:10]}")
    else:
        bus = MemoryBus(partitions=3)
        broker = MemoryBroker()
    broker.set_handler(Recorder())
    await bus.start()
    await broker.start()
    yield Engines(request.param, bus, broker)
    await bus.close()
    await broker.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]
