"""Engines for the contract suites: memory always; Redis and Kafka when the real stack is up."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from tsunagu_core.broker import Broker, MemoryBroker
from tsunagu_core.bus import Bus, MemoryBus
from tsunagu_core.testing import KAFKA_BOOTSTRAP, REDIS_ENGINES, Recorder, redis_engine_url, require_stack


def new_redis_broker(engine: str = "redis") -> Broker:
    from tsunagu_core.broker.redis import RedisBroker

    # A fresh key prefix per broker keeps tests independent of each other and of earlier runs.
    return RedisBroker(redis_engine_url(engine), prefix=f"test-{uuid.uuid4().hex[:10]}")


@pytest.fixture(params=["memory", *REDIS_ENGINES])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """Every engine: memory, the stack's Redis, a Redis Cluster and a Sentinel-watched primary."""
    if request.param in REDIS_ENGINES:
        require_stack(f"the {request.param} broker")
        engine = new_redis_broker(request.param)
    else:
        engine = MemoryBroker()
    engine.set_handler(Recorder())
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(params=["memory", "kafka"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "kafka":
        require_stack("the Kafka bus")
        from tsunagu_core.bus.kafka import KafkaBus

        engine: Bus = KafkaBus(KAFKA_BOOTSTRAP, client_id="contract-tests", partitions=3)
    else:
        engine = MemoryBus(partitions=3)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
def topic() -> str:
    return f"test.contract.{uuid.uuid4().hex[:12]}"
