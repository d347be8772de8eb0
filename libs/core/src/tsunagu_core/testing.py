"""Helpers for the tests of the core and of every service (imported by tests only).

`make test` brings the real stack up and sets TSUNAGU_TEST_STACK=1, which turns tests that need
real Redis or Kafka from skipped into required: if a server does not answer then, they fail.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from tsunagu_core.broker import ClientInfo, Publication
from tsunagu_core.tls import merge_server_options

REAL_STACK = os.environ.get("TSUNAGU_TEST_STACK") == "1"
REDIS_URL = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")
KAFKA_BOOTSTRAP = os.environ.get("TSUNAGU_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
POSTGRES_DSN = os.environ.get("TSUNAGU_POSTGRES_DSN", "postgresql://tsunagu:tsunagu@127.0.0.1:5432/tsunagu")


def require_stack(what: str) -> None:
    if not REAL_STACK:
        import pytest

        pytest.skip(f"{what} needs the real stack: run `make test` (or `tsunagu stack up` and TSUNAGU_TEST_STACK=1)")


# The Redis engines the contract suites run on: the stack's one server, and private sets started here.
REDIS_ENGINES = ("redis", "redis-cluster", "redis-sentinel")
_redis_sets: dict[str, Any] = {}


def redis_engine_url(engine: str) -> str:
    """`TSUNAGU_REDIS_URL` of a Redis engine: `redis` is the stack's server; `redis-cluster` (3 primaries,
    3 replicas) and `redis-sentinel` (a primary, 2 replicas, 3 sentinels) are private servers on free
    ports, started once per test process (~2 s each), stopped and removed when it exits. The tests that kill a
    primary start sets of their own (`tsunagu.stack.redis_sets`)."""
    if engine == "redis":
        return REDIS_URL
    require_stack(f"the {engine} engine")
    if engine not in _redis_sets:
        from tsunagu.stack.redis_sets import PrivateRedisCluster, PrivateRedisSentinel

        directory = Path(tempfile.mkdtemp(prefix=f"tsunagu-{engine}-"))
        kind = PrivateRedisCluster if engine == "redis-cluster" else PrivateRedisSentinel
        servers = kind(directory)
        _redis_sets[engine] = servers.start()

        def remove() -> None:
            servers.stop()
            shutil.rmtree(directory, ignore_errors=True)

        atexit.register(remove)
    return str(_redis_sets[engine].url)


class Recorder:
    """A broker event handler that keeps what it was given."""

    def __init__(self) -> None:
        self.publications: list[tuple[str, Publication]] = []
        self.presence: list[tuple[str, bool, ClientInfo]] = []
        self.resubscribed = 0

    async def on_publication(self, channel: str, publication: Publication) -> None:
        self.publications.append((channel, publication))

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        self.presence.append((channel, join, info))

    async def on_resubscribed(self) -> None:
        self.resubscribed += 1


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `condition()` holds; fail with TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _InProcessServer(uvicorn.Server):
    """A uvicorn server that leaves the test's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Any, port: int, **options: Any) -> AsyncIterator[uvicorn.Server]:
    """Serve an ASGI app on 127.0.0.1:`port` in the running loop until the block ends; `options` go to
    `uvicorn.Config` (e.g. `tsunagu_core.tls.uvicorn_options(...)` for https/wss)."""
    own = getattr(getattr(app, "state", None), "server_options", None) or {}  # as tsunagu serve honours them
    merged = merge_server_options(own, options)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", **merged)
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def drop_schema(schema: str, dsn: str = POSTGRES_DSN) -> None:
    """Remove a test's PostgreSQL schema with everything in it (audit-log's history lives there too)."""
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()
