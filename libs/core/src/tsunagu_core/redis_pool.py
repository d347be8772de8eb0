"""Redis clients for every Redis user of the platform (broker, stores, registries, ledgers).

One way to build them, from one URL whose scheme says what kind of Redis it is:

- `redis://host:port/db` (`rediss://` with TLS): one server, or a primary reached by a fixed address;
- `redis-cluster://host:port,host:port` (`rediss-cluster://`): Redis Cluster, from any of its nodes (the
  client learns the others and the slot map, and follows MOVED/ASK and failovers);
- `redis-sentinel://host:26379,host:26380/db#primary` (`rediss-sentinel://`): the primary named after `#`
  as Sentinel reports it; after a failover new connections go to the promoted replica. The URL's
  credentials are those of the Redis servers; the sentinels are reached without a password.
  (Lettuce's `redis-sentinel://` form.)

A single server's and Sentinel's pools are bounded and their callers wait for a free connection: redis-py's
default pool fails a caller outright once its connections are taken ("Too many connections"), which a
burst of clients (a reconnect storm) turned into errors. A cluster client holds up to `max_connections`
per node.

TLS uses the `TSUNAGU_TLS_*` CA and client certificate (`tsunagu_core.tls`) for every server, sentinels
and cluster nodes included.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from tsunagu_core.config import TlsSettings
from tsunagu_core.tls import client_settings, redis_tls

Mode = Literal["single", "cluster", "sentinel"]
# What every Redis user of the platform holds: one server (or Sentinel's primary) or a cluster.
AnyRedis = Redis | RedisCluster

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis-cluster": ("cluster", False),
    "rediss-cluster": ("cluster", True),
    "redis-sentinel": ("sentinel", False),
    "rediss-sentinel": ("sentinel", True),
}
_DEFAULT_PORT: dict[Mode, int] = {"single": 6379, "cluster": 6379, "sentinel": 26379}


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """What a Redis URL names."""

    mode: Mode
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0
    service: str = ""  # Sentinel: the monitored primary's name


def parse_redis_url(url: str) -> RedisAddress:
    """The parts of a `redis[s]://`, `redis[s]-cluster://` or `redis[s]-sentinel://` URL; ValueError
    with the reason for any other."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"Redis URL {url!r}: the scheme must be one of {', '.join(_SCHEMES)}")
    mode, tls = _SCHEMES[scheme]
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    nodes = []
    for entry in hosts.split(","):
        host, _, port = entry.strip().rpartition(":") if ":" in entry else (entry.strip(), "", "")
        if not host:
            raise ValueError(f"Redis URL {url!r}: {entry!r} is not host[:port]")
        try:
            nodes.append((host.strip("[]"), int(port) if port else _DEFAULT_PORT[mode]))
        except ValueError:
            raise ValueError(f"Redis URL {url!r}: the port of {entry!r} is not a number") from None
    if mode == "single" and len(nodes) > 1:
        raise ValueError(f"Redis URL {url!r}: several hosts need redis-cluster:// or redis-sentinel://")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"Redis URL {url!r}: the path must be a database number, not {path!r}") from None
    if mode == "cluster" and db:
        raise ValueError(f"Redis URL {url!r}: Redis Cluster has database 0 only")
    service = unquote(parts.fragment)
    if mode == "sentinel" and not service:
        raise ValueError(f"Redis URL {url!r}: name the primary after '#' (redis-sentinel://host:26379#mymaster)")
    return RedisAddress(
        mode=mode,
        tls=tls,
        nodes=tuple(nodes),
        username=unquote(username) or None,
        password=unquote(password) or None,
        db=db,
        service=service,
    )


def redis_mode(url: str) -> Mode:
    return parse_redis_url(url).mode


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)


def slot_tagged(prefix: str, client: AnyRedis) -> str:
    """`prefix` as a hash tag on a cluster, so that every key built from it shares one slot (the stores
    whose scripts touch several of their keys at once); unchanged on one server, where the keys stay
    what they were."""
    return f"{{{prefix}}}" if is_cluster(client) else prefix


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


class _ContextSentinelSSLConnection(SentinelManagedConnection, _ContextSSLConnection):
    """A connection to Sentinel's current primary, with the shared TLS context."""


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections follow the primary) whose callers wait for a free connection."""


def _ssl_files(tls: TlsSettings | None) -> dict[str, Any]:
    """redis-py's own TLS arguments, from the same files (the cluster client builds its connections itself)."""
    settings = tls if tls is not None else client_settings()
    return {
        "ssl": True,
        "ssl_ca_certs": settings.tls_ca_file or None,
        "ssl_certfile": settings.tls_cert_file or None,
        "ssl_keyfile": settings.tls_key_file or None,
        "ssl_check_hostname": settings.tls_check_hostname,
    }


def redis_client(
    url: str,
    *,
    max_connections: int = 64,
    wait: float = 10.0,
    socket_timeout: float | None = None,
    connect_timeout: float = 3.0,
    tls: TlsSettings | None = None,
) -> AnyRedis:
    """A client that connects lazily; `wait` is how long a caller waits for a free connection."""
    address = parse_redis_url(url)
    context = redis_tls(url, tls)  # the same checks and one-line errors for every kind of Redis
    if address.mode == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
            max_connections=max_connections,
            username=address.username,
            password=address.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=10,
            **(_ssl_files(tls) if address.tls else {}),
        )
    if address.mode == "sentinel":
        common: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
        sentinel = Sentinel(list(address.nodes), sentinel_kwargs={**common, **(_ssl_files(tls) if address.tls else {})})
        extra: dict[str, Any] = {}
        if context is not None:
            extra = {"connection_class": _ContextSentinelSSLConnection, "tls_context": context}
        return sentinel.master_for(
            address.service,
            redis_class=Redis,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=max_connections,
            timeout=wait,
            db=address.db,
            username=address.username,
            password=address.password,
            health_check_interval=10,
            **common,
            **extra,
        )
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
) -> AnyRedis:
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
    try:
        address = parse_redis_url(url)
        where = "Redis at " + ",".join(f"{host}:{port}" for host, port in address.nodes)
        if address.mode != "single":
            where = f"Redis {address.mode} at " + where.removeprefix("Redis at ")
    except ValueError:
        where = f"Redis at {parts.netloc}"
    text = str(exc)
    lowered = text.lower()
    if not parts.scheme.startswith("rediss") and ("reset by peer" in lowered or "closed by server" in lowered):
        return f"{where} closed a plaintext connection: the port requires TLS? use rediss:// ({text})"
    if parts.scheme.startswith("rediss") and ("ssl" in lowered or "certificate" in lowered):
        return f"{where}: TLS handshake failed: {text}"
    return f"{where}: {text}"
