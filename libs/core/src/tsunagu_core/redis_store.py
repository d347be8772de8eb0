"""The base of the platform's Redis-backed stores (presence, rooms, revocations, login counters, nonces)."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tsunagu_core.redis_pool import AnyRedis, explain_connection_error, redis_client


class RedisStore:
    """One lazily connecting client per store, so a store is usable before `start`; `start` and
    `ping` are a PING whose failure names the server. A subclass sets `unavailable` to raise its own
    error type, and registers its Lua scripts on `self.redis` in its `__init__`."""

    unavailable: type[Exception] = RedisConnectionError

    def __init__(self, url: str, **client_options: Any) -> None:
        self.url = url
        self.redis: AnyRedis = redis_client(url, **client_options)

    async def start(self) -> None:
        await self.ping()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise self.unavailable(explain_connection_error(self.url, exc)) from None

    async def close(self) -> None:
        await self.redis.aclose()
