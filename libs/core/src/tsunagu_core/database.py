"""PostgreSQL for the services that keep state (auth, collab, audit-log).

`Postgres` is a runtime `Dependency`: the service registers it (`runtime.add_dependency("database",
...)`), the runtime connects it in the background with retries and shows it in /readyz. Each service
owns its tables and brings its schema as numbered migrations; `start()` applies the missing ones
in one transaction each, under an advisory lock so replicas starting together do not race.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

log = logging.getLogger("tsunagu.database")

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS tsunagu_migrations (
    service text NOT NULL,
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, version)
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


class DatabaseUnavailable(RuntimeError):
    """The pool is not connected (yet); the caller answers 503."""


class Postgres:
    def __init__(
        self,
        dsn: str,
        *,
        service: str,
        migrations: Sequence[Migration] = (),
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 10.0,
    ) -> None:
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)):
            raise ValueError(f"{service}: migration versions must be unique and ascending: {versions}")
        self.dsn = dsn
        self.service = service
        self.migrations = tuple(migrations)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseUnavailable("database not connected")
        return self._pool

    async def start(self) -> None:
        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            command_timeout=self.command_timeout,
            timeout=5.0,
        )
        try:
            await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        lock_key = int.from_bytes(hashlib.sha256(f"tsunagu:{self.service}".encode()).digest()[:8], "big", signed=True)
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
            try:
                await conn.execute(MIGRATIONS_TABLE)
                rows = await conn.fetch("SELECT version FROM tsunagu_migrations WHERE service = $1", self.service)
                applied = {row["version"] for row in rows}
                for migration in self.migrations:
                    if migration.version in applied:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO tsunagu_migrations (service, version, name) VALUES ($1, $2, $3)",
                            self.service,
                            migration.version,
                            migration.name,
                        )
                    log.info("%s: applied migration %d (%s)", self.service, migration.version, migration.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
