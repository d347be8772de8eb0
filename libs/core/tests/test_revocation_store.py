"""What both RevocationStore engines promise (memory and real Redis run the same tests)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.revocation_store import (
    MemoryRevocationStore,
    RedisRevocationStore,
    RevocationStore,
    TokenIdentity,
    create_revocation_store,
    shared_revocation_store,
)
from tsunagu_core.testing import REDIS_ENGINES, REDIS_URL, redis_engine_url, require_stack


@pytest.fixture(params=["memory", *REDIS_ENGINES])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RevocationStore]:
    if request.param == "memory":
        yield MemoryRevocationStore()
        return
    require_stack(f"the {request.param} revocation store")
    redis_store = RedisRevocationStore(redis_engine_url(request.param))
    await redis_store.start()
    yield redis_store
    await redis_store.close()


def uid() -> str:
    return uuid.uuid4().hex[:12]


async def test_a_revoked_session_covers_its_tokens_only(store: RevocationStore) -> None:
    user, sid = uid(), uid()
    await store.revoke("session", sid, ttl=60)
    assert await store.revoked(TokenIdentity(user, session_id=sid, token_id=uid(), issued_at=time.time()))
    assert not await store.revoked(TokenIdentity(user, session_id=uid(), token_id=uid(), issued_at=time.time()))
    assert not await store.revoked(TokenIdentity(user))


async def test_a_revoked_token_id(store: RevocationStore) -> None:
    jti = uid()
    await store.revoke("token", jti, ttl=60)
    assert await store.revoked(TokenIdentity(uid(), session_id=uid(), token_id=jti))
    assert not await store.revoked(TokenIdentity(uid(), session_id=uid(), token_id=uid()))


async def test_a_revoked_user_covers_tokens_issued_before_the_cutoff(store: RevocationStore) -> None:
    user = uid()
    cutoff = time.time()
    await store.revoke("user", user, ttl=60, issued_before=cutoff)
    assert await store.revoked(TokenIdentity(user, issued_at=cutoff - 10))
    assert await store.revoked(TokenIdentity(user, issued_at=None)), "no iat: treated as issued long ago"
    assert not await store.revoked(TokenIdentity(user, issued_at=cutoff + 1))
    assert not await store.revoked(TokenIdentity(uid(), issued_at=cutoff - 10))
    # A second, older revocation never moves the cutoff back.
    await store.revoke("user", user, ttl=60, issued_before=cutoff - 100)
    assert await store.revoked(TokenIdentity(user, issued_at=cutoff - 10))


async def test_entries_expire_with_their_ttl(store: RevocationStore) -> None:
    sid, user = uid(), uid()
    await store.revoke("session", sid, ttl=0.2)
    await store.revoke("user", user, ttl=0.2)
    assert await store.revoked(TokenIdentity(user, session_id=sid))
    await asyncio.sleep(0.35)
    assert not await store.revoked(TokenIdentity(user, session_id=sid))


async def test_a_shorter_ttl_never_shortens_a_revocation(store: RevocationStore) -> None:
    sid = uid()
    await store.revoke("session", sid, ttl=60)
    await store.revoke("session", sid, ttl=0.1)
    await asyncio.sleep(0.2)
    assert await store.revoked(TokenIdentity(uid(), session_id=sid))


async def test_bad_arguments_are_refused(store: RevocationStore) -> None:
    with pytest.raises(ValueError):
        await store.revoke("device", "x", ttl=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.revoke("session", "", ttl=10)
    with pytest.raises(ValueError):
        await store.revoke("session", "x", ttl=0)


async def test_redis_keys_carry_the_remaining_lifetime() -> None:
    require_stack("the Redis revocation store")
    store = RedisRevocationStore(REDIS_URL)
    sid = uid()
    await store.revoke("session", sid, ttl=30)
    left = await store.redis.pttl(f"{store.key_prefix}session:{sid}")
    assert 25_000 < left <= 30_000
    await store.close()


def test_engine_follows_the_broker_and_is_shared_per_runtime() -> None:
    assert isinstance(create_revocation_store(CoreSettings(broker="memory")), MemoryRevocationStore)
    assert isinstance(create_revocation_store(CoreSettings(broker="redis")), RedisRevocationStore)
    runtime = Runtime(CoreSettings())
    assert shared_revocation_store(runtime) is shared_revocation_store(runtime)
    assert shared_revocation_store(Runtime(CoreSettings())) is not shared_revocation_store(runtime)
