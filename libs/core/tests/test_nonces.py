"""One-time nonces: claimed once, refused after, free again when their time is up; on Redis, across clients."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from tsunagu_core.nonces import MemoryNonceRegistry, NonceRegistry, NonceRegistryError, RedisNonceRegistry
from tsunagu_core.testing import REDIS_URL, require_stack


@pytest.fixture(params=["memory", "redis"])
async def registries(request: pytest.FixtureRequest) -> AsyncIterator[tuple[NonceRegistry, NonceRegistry]]:
    if request.param == "redis":
        require_stack("the Redis nonce registry")
        prefix = f"test-nonce-{uuid.uuid4().hex[:8]}"
        first: NonceRegistry = RedisNonceRegistry(REDIS_URL, prefix=prefix)
        second: NonceRegistry = RedisNonceRegistry(REDIS_URL, prefix=prefix)
    else:
        first = second = MemoryNonceRegistry()
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


async def test_a_nonce_is_claimed_once_on_any_replica(registries: tuple[NonceRegistry, NonceRegistry]) -> None:
    first, second = registries
    results = await asyncio.gather(*(r.claim("alice/n-1", 5) for r in (first, second, first, second)))
    assert sorted(results) == [False, False, False, True]
    assert await second.claim("bob/n-1", 5), "another user's nonce is another key"


async def test_a_nonce_is_free_again_after_its_ttl(registries: tuple[NonceRegistry, NonceRegistry]) -> None:
    first, second = registries
    assert await first.claim("k", 0.05)
    await asyncio.sleep(0.12)
    assert await second.claim("k", 5)


async def test_unreachable_redis_is_an_error_not_a_yes() -> None:
    registry = RedisNonceRegistry("redis://127.0.0.1:1/0")
    with pytest.raises(NonceRegistryError):
        await registry.claim("k", 1)
    with pytest.raises(NonceRegistryError, match=r"Redis at 127\.0\.0\.1:1"):
        await registry.start()


async def test_memory_registry_bounds_its_size() -> None:
    registry = MemoryNonceRegistry(max_entries=2)
    assert await registry.claim("a", 60) and await registry.claim("b", 60)
    with pytest.raises(NonceRegistryError):
        await registry.claim("c", 60)
