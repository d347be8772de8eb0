"""The one way the platform builds Redis clients: bounded pools whose callers wait, and a connect that
answers or fails cleanly."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from tsunagu_core.redis_pool import connect_redis, redis_client
from tsunagu_core.testing import REDIS_URL, require_stack


async def test_more_callers_than_connections_wait_their_turn() -> None:
    require_stack("Redis")
    client = await connect_redis(REDIS_URL, max_connections=2)
    try:
        answers = await asyncio.gather(*(client.ping() for _ in range(200)))
        assert all(answers)
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_an_error_at_connect() -> None:
    with pytest.raises((RedisConnectionError, OSError)):
        await connect_redis("redis://127.0.0.1:1/0", connect_timeout=0.5)


def test_a_lazy_client_is_built_without_connecting() -> None:
    client = redis_client("redis://127.0.0.1:1/0", max_connections=3, wait=1.0)
    assert client.connection_pool.max_connections == 3
