"""Redis clients for every Redis user of the platform (broker, stores, registries, ledgers).

One way to build them: a bounded pool whose callers wait for a free connection. redis-py's default
pool fails a caller outright once its connections are taken ("Too many connections"), which a burst of
clients (a reconnect storm: a thousand subscribes or connect-time lookups at once) turned into errors.

A `rediss://` URL connects with TLS using the context of `tsunagu_core.tls.client_context` (the
`TSUNAGU_TLS_*` CA, and client certificate for a Redis with `tls-auth-clients yes`).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from tsunagu_core.config import TlsSettings
from tsunagu_core.tls import redis_tls


class _ContextSSLConnection(SSLConnection):
    """redis-py's TLS connection, on a context built once by `tsunagu_core.tls` instead of per connection."""

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls_context = tls_context

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(Connection._connection_arguments(self))
        arguments["ssl"] = self.tls_context
        arguments["server_hostname"] = self.host
        return arguments


def redis_client(
    url: str,
    *,
    max_connections: int = 64,
    wait: float = 10.0,
    socket_timeout: float | None = None,
    connect_timeout: float = 3.0,
    tls: TlsSettings | None = None,
) -> Redis:
    """A client that connects lazily; `wait` is how long a caller waits for a free connection."""
    context = redis_tls(url, tls)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=10,
    )
    if context is not None:
        pool.connection_class = _ContextSSLConnection
        pool.connection_kwargs["tls_context"] = context
    # from_pool: the client owns the pool, so its aclose() closes the connections (Redis(connection_pool=...)
    # leaves them open).
    return Redis.from_pool(pool)


async def connect_redis(
    url: str,
    *,
    max_connections: int = 64,
    wait: float = 10.0,
    socket_timeout: float | None = None,
    connect_timeout: float = 3.0,
    tls: TlsSettings | None = None,
) -> Redis:
    """A client that has answered a PING; closed again, and the error raised, when it did not."""
    client = redis_client(
        url,
        max_connections=max_connections,
        wait=wait,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        tls=tls,
    )
    try:
        await client.ping()
    except RedisConnectionError as exc:
        await client.aclose()
        raise RedisConnectionError(explain_connection_error(url, exc)) from exc
    except BaseException:
        await client.aclose()
        raise
    return client


def explain_connection_error(url: str, exc: Exception) -> str:
    """The error, with the likely cause when a plaintext client met a TLS-only port (or the reverse)."""
    parts = urlsplit(url)
    where = f"Redis at {parts.hostname}:{parts.port or 6379}"
    text = str(exc)
    lowered = text.lower()
    if parts.scheme == "redis" and ("reset by peer" in lowered or "closed by server" in lowered):
        return f"{where} closed a plaintext connection: the port requires TLS? use rediss:// ({text})"
    if parts.scheme == "rediss" and ("ssl" in lowered or "certificate" in lowered):
        return f"{where}: TLS handshake failed: {text}"
    return f"{where}: {text}"
