"""One-time keys: "has this nonce been used before?", answered once across every replica.

Signed publications carry a nonce; a replay of the same signed message must be refused on any gateway,
so with the Redis engine the claim is one `SET key 1 NX PX ttl` (atomic across replicas). The memory
engine serves one process (`tsunagu run`, unit tests).
"""

from __future__ import annotations

import time
from typing import Protocol

from redis.exceptions import RedisError

from tsunagu_core.redis_store import RedisStore


class NonceRegistryError(RuntimeError):
    """The registry could not answer (Redis unreachable): callers refuse rather than risk a replay."""


class NonceRegistry(Protocol):
    async def start(self) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, key: str, ttl: float) -> bool:
        """True the first time `key` is claimed within `ttl` seconds, False for every later claim."""
        ...


class MemoryNonceRegistry:
    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._expiry.clear()

    async def claim(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        expires = self._expiry.get(key)
        if expires is not None and expires > now:
            return False
        if len(self._expiry) >= self.max_entries:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            if len(self._expiry) >= self.max_entries:
                raise NonceRegistryError("too many live nonces")
        self._expiry[key] = now + ttl
        return True


class RedisNonceRegistry(RedisStore):
    unavailable = NonceRegistryError

    def __init__(self, url: str, prefix: str = "tsunagu:nonce") -> None:
        super().__init__(url, max_connections=32, wait=3.0, socket_timeout=3.0)
        self.prefix = prefix

    async def claim(self, key: str, ttl: float) -> bool:
        try:
            created = await self.redis.set(f"{self.prefix}:{key}", b"1", nx=True, px=max(1, int(ttl * 1000)))
        except RedisError as exc:
            raise NonceRegistryError(f"nonce registry unavailable: {exc}") from exc
        return bool(created)
