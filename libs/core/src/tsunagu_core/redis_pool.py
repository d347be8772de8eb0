"""Redis clients for every Redis user of the platform (broker, stores, registries, ledgers).

One way to build them: a bounded pool whose callers wait for a free connection. redis-py's default
pool fails a caller outright once its connections are taken ("Too many connections"), which a burst of
clients (a reconnect storm: a thousand subscribes or connect-time lookups at once) turned into errors.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis


def redis_client(
    url: str,
    *,
    max_connections: int = 64,
    wait: float = 10.0,
    socket_timeout: float | None = None,
    connect_timeout: float = 3.0,
) -> Redis:
    """A client that connects lazily; `wait` is how long a caller waits for a free connection."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=10,
    )
    return Redis(connection_pool=pool)


async def connect_redis(
    url: str,
    *,
    max_connections: int = 64,
    wait: float = 10.0,
    socket_timeout: float | None = None,
    connect_timeout: float = 3.0,
) -> Redis:
    """A client that has answered a PING; closed again, and the error raised, when it did not."""
    client = redis_client(
        url, max_connections=max_connections, wait=wait, socket_timeout=socket_timeout, connect_timeout=connect_timeout
    )
    try:
        await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client
