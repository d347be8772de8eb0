"""Failed-login counters per username and per client IP, in Redis across replicas or in memory.

A counter starts with the first failure and lives for the window; once it reaches its limit every
login for that username (or from that IP) is answered 429 with Retry-After until the window ends,
whether or not the password is right. A successful login clears the username's counter.
"""

from __future__ import annotations

import abc
import time

from tsunagu_core.config import CoreSettings

PREFIX = "tsunagu:auth:login-failures:"

_FAIL = """
local n = redis.call('incr', KEYS[1])
if n == 1 then redis.call('pexpire', KEYS[1], ARGV[1]) end
return n
"""


class Counters(abc.ABC):
    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def hit(self, key: str, window: float) -> None: ...

    @abc.abstractmethod
    async def get(self, keys: list[str]) -> list[tuple[int, float]]:
        """(count, seconds left) of each key; (0, 0) when absent."""

    @abc.abstractmethod
    async def clear(self, key: str) -> None: ...


class MemoryCounters(Counters):
    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, float]] = {}

    async def hit(self, key: str, window: float) -> None:
        now = time.monotonic()
        count, until = self.entries.get(key, (0, 0.0))
        if until <= now:
            count, until = 0, now + window
        self.entries[key] = (count + 1, until)
        if len(self.entries) > 100_000:
            for stale in [k for k, (_, u) in self.entries.items() if u <= now]:
                del self.entries[stale]

    async def get(self, keys: list[str]) -> list[tuple[int, float]]:
        now = time.monotonic()
        result = []
        for key in keys:
            count, until = self.entries.get(key, (0, 0.0))
            result.append((count, until - now) if until > now else (0, 0.0))
        return result

    async def clear(self, key: str) -> None:
        self.entries.pop(key, None)


class RedisCounters(Counters):
    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis
        from tsunagu_core.redis_pool import redis_client

        self.redis: Redis = redis_client(url, socket_timeout=2.0, connect_timeout=2.0)
        self._fail = self.redis.register_script(_FAIL)

    async def start(self) -> None:
        await self.redis.ping()

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    async def hit(self, key: str, window: float) -> None:
        await self._fail(keys=[key], args=[max(1, int(window * 1000))])

    async def get(self, keys: list[str]) -> list[tuple[int, float]]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        raw = await pipe.execute()
        result = []
        for value, ttl in zip(raw[::2], raw[1::2], strict=True):
            result.append((int(value), max(0.0, ttl / 1000)) if value is not None and ttl > 0 else (0, 0.0))
        return result

    async def clear(self, key: str) -> None:
        await self.redis.delete(key)


def create_counters(settings: CoreSettings) -> Counters:
    return RedisCounters(settings.redis_url) if settings.broker == "redis" else MemoryCounters()


class LoginLimiter:
    def __init__(self, counters: Counters, *, per_user: int, per_ip: int, window: float) -> None:
        self.counters = counters
        self.per_user = per_user
        self.per_ip = per_ip
        self.window = window

    @staticmethod
    def _keys(username: str, ip: str) -> list[str]:
        return [f"{PREFIX}user:{username}", f"{PREFIX}ip:{ip}"]

    async def retry_after(self, username: str, ip: str) -> float | None:
        """Seconds until a login for `username` from `ip` is allowed again; None: allowed now."""
        (user_count, user_left), (ip_count, ip_left) = await self.counters.get(self._keys(username, ip))
        waits = []
        if user_count >= self.per_user:
            waits.append(user_left)
        if ip_count >= self.per_ip:
            waits.append(ip_left)
        return max(waits) if waits else None

    async def failed(self, username: str, ip: str) -> None:
        for key in self._keys(username, ip):
            await self.counters.hit(key, self.window)

    async def succeeded(self, username: str) -> None:
        await self.counters.clear(self._keys(username, "")[0])
