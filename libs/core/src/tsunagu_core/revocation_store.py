"""Revoked sessions, users and tokens, looked up by key: Redis across replicas, memory in one process.

auth writes a revocation here before it publishes it on Kafka `tsunagu.auth.revocations`; a gateway
asks here when a client connects, so a replica that has just (re)started refuses a revoked token
before its Kafka consumer has caught up. Every entry expires when the tokens it can affect have
expired (its TTL is their remaining lifetime), so the store never grows without bound.

Keys (Redis): `tsunagu:revoked:session:<sid>` and `tsunagu:revoked:token:<jti>` hold `1`;
`tsunagu:revoked:user:<user>` holds the time (ms) before which that user's tokens are revoked.
"""

from __future__ import annotations

import abc
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tsunagu_core.dependency import NothingToConnect
from tsunagu_core.redis_store import RedisStore

if TYPE_CHECKING:
    from tsunagu_core.config import CoreSettings
    from tsunagu_core.lifecycle import Runtime

Scope = Literal["session", "user", "token"]
SCOPES: tuple[Scope, ...] = ("session", "user", "token")
KEY_PREFIX = "tsunagu:revoked:"
DEPENDENCY = "revocations"


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """What a revocation can name in a token: its user, session (`sid`), id (`jti`) and issue time."""

    user: str
    session_id: str = ""
    token_id: str = ""
    issued_at: float | None = None


class RevocationStore(NothingToConnect, abc.ABC):
    """Dependency protocol (start/ping/close) plus revoke and the connect-time check."""

    @abc.abstractmethod
    async def revoke(self, scope: Scope, value: str, *, ttl: float, issued_before: float | None = None) -> None:
        """Revoke for `ttl` seconds; for a user, tokens issued before `issued_before` (default: now)."""

    @abc.abstractmethod
    async def revoked(self, token: TokenIdentity) -> bool:
        """Whether any stored revocation covers this token."""


def _check_args(scope: str, value: str, ttl: float) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown revocation scope {scope!r}")
    if not value:
        raise ValueError("a revocation needs a value")
    if ttl <= 0:
        raise ValueError("a revocation needs a positive ttl")


class MemoryRevocationStore(RevocationStore):
    def __init__(self) -> None:
        # (scope, value) -> (issued_before seconds, expires at, monotonic-free wall clock)
        self._entries: dict[tuple[str, str], tuple[float, float]] = {}

    async def revoke(self, scope: Scope, value: str, *, ttl: float, issued_before: float | None = None) -> None:
        _check_args(scope, value, ttl)
        now = time.time()
        before = issued_before if issued_before is not None else now
        old = self._entries.get((scope, value))
        if old is not None and old[1] > now:
            before, until = max(before, old[0]), max(now + ttl, old[1])
        else:
            until = now + ttl
        self._entries[(scope, value)] = (before, until)
        self._forget_expired(now)

    def _live(self, scope: str, value: str, now: float) -> tuple[float, float] | None:
        entry = self._entries.get((scope, value)) if value else None
        return entry if entry is not None and entry[1] > now else None

    async def revoked(self, token: TokenIdentity) -> bool:
        now = time.time()
        if self._live("session", token.session_id, now) or self._live("token", token.token_id, now):
            return True
        user = self._live("user", token.user, now)
        return user is not None and (token.issued_at or 0.0) < user[0]

    def _forget_expired(self, now: float) -> None:
        if len(self._entries) > 1024:
            for key in [k for k, (_, until) in self._entries.items() if until <= now]:
                del self._entries[key]


# Keep the later cutoff and the longer life when a user is revoked twice.
_REVOKE_USER = """
local old = tonumber(redis.call('get', KEYS[1]) or '0')
local ttl = tonumber(ARGV[2])
local left = redis.call('pttl', KEYS[1])
if left > ttl then ttl = left end
local before = tonumber(ARGV[1])
if old > before then before = old end
redis.call('set', KEYS[1], before, 'PX', ttl)
return before
"""


class RedisRevocationStore(RedisStore, RevocationStore):
    """Connects lazily: usable before `start()`, which only checks that Redis answers."""

    def __init__(self, url: str) -> None:
        from tsunagu_core.redis_pool import slot_tagged

        RedisStore.__init__(self, url, max_connections=32, wait=5.0, socket_timeout=5.0, connect_timeout=2.0)
        # One MGET reads a token's three entries: on Redis Cluster they share the prefix's slot.
        self.key_prefix = slot_tagged(KEY_PREFIX, self.redis)
        self._revoke_user = self.redis.register_script(_REVOKE_USER)

    async def revoke(self, scope: Scope, value: str, *, ttl: float, issued_before: float | None = None) -> None:
        _check_args(scope, value, ttl)
        key = f"{self.key_prefix}{scope}:{value}"
        ttl_ms = max(1, int(ttl * 1000))
        if scope == "user":
            before = issued_before if issued_before is not None else time.time()
            await self._revoke_user(keys=[key], args=[int(before * 1000), ttl_ms])
            return
        # Never shorten a longer revocation already there.
        left = await self.redis.pttl(key)
        await self.redis.set(key, b"1", px=max(ttl_ms, int(left)))

    async def revoked(self, token: TokenIdentity) -> bool:
        keys = [
            f"{self.key_prefix}session:{token.session_id}" if token.session_id else f"{self.key_prefix}session:",
            f"{self.key_prefix}token:{token.token_id}" if token.token_id else f"{self.key_prefix}token:",
            f"{self.key_prefix}user:{token.user}",
        ]
        session, token_id, user = await self.redis.mget(keys)
        if (token.session_id and session is not None) or (token.token_id and token_id is not None):
            return True
        if user is None or not token.user:
            return False
        return (token.issued_at or 0.0) * 1000 < int(user)


def create_revocation_store(settings: CoreSettings) -> RevocationStore:
    """Redis when the broker is Redis (the replicas share it), memory otherwise."""
    if settings.broker == "redis":
        return RedisRevocationStore(settings.redis_url)
    return MemoryRevocationStore()


_SHARED: weakref.WeakKeyDictionary[Runtime, RevocationStore] = weakref.WeakKeyDictionary()


def shared_revocation_store(runtime: Runtime) -> RevocationStore:
    """One store per runtime, so auth and gateway in one process (`tsunagu run`) see the same entries.

    It is also registered as the runtime dependency `revocations`, for services that list it in
    their needs (and so in /readyz).
    """
    store = _SHARED.get(runtime)
    if store is None:
        store = create_revocation_store(runtime.settings)
        _SHARED[runtime] = store
        runtime.add_dependency(DEPENDENCY, store)
    return store
