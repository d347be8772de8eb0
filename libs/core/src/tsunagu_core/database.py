"""PostgreSQL for the services that keep state (auth, collab, audit-log).

`Postgres` is a runtime `Dependency`: the service registers it (`runtime.add_dependency("database",
...)`), the runtime connects it in the background with retries and shows it in /readyz. Each service
owns its tables and brings its schema as numbered migrations; `start()` applies the missing ones
in one transaction each, under an advisory lock so replicas starting together do not race.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tsunagu_core.config import TlsSettings
from tsunagu_core.tls import postgres_ssl

log = logging.getLogger("tsunagu.database")

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
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
        tls: TlsSettings | None = None,
        schema: str | None = None,
    ) -> None:
        """`schema`: where the migration history lives, next to the tables of a service that keeps them in
        a schema of its own (else the first schema of the search path, which may not be the same)."""
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)):
            raise ValueError(f"{service}: migration versions must be unique and ascending: {versions}")
        self.dsn = dsn
        self.service = service
        self.schema = schema
        self.migrations_table = f'"{schema}".tsunagu_migrations' if schema else "tsunagu_migrations"
        self.migrations = tuple(migrations)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        # `sslmode=require|verify-ca|verify-full` in the DSN: TLS with the TSUNAGU_TLS_* CA and client
        # certificate (checked here, so a missing file stops the service at start with one line)
        self.ssl: ssl.SSLContext | None = postgres_ssl(dsn, tls)
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseUnavailable("database not connected")
        return self._pool

    async def start(self) -> None:
        pool = await asyncpg.create_pool(
            self.dsn,
            ssl=self.ssl,
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
                if self.schema:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                table = self.migrations_table
                await conn.execute(MIGRATIONS_TABLE.format(table=table))
                if self.schema:
                    await self._adopt_earlier_history(conn, table)
                rows = await conn.fetch(f"SELECT version FROM {table} WHERE service = $1", self.service)
                applied = {row["version"] for row in rows}
                for migration in self.migrations:
                    if migration.version in applied:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            f"INSERT INTO {table} (service, version, name) VALUES ($1, $2, $3)",
                            self.service,
                            migration.version,
                            migration.name,
                        )
                    log.info("%s: applied migration %d (%s)", self.service, migration.version, migration.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)

    async def _adopt_earlier_history(self, conn: PoolConnectionProxy[Any], table: str) -> None:
        """Earlier versions kept every history in the search path's table: a schema's rows found there
        are copied into its own table once, so its applied migrations are not run again."""
        own = await conn.fetchval(f"SELECT to_regclass('{table}')::oid")
        shared = await conn.fetchval("SELECT to_regclass('tsunagu_migrations')::oid")
        if shared is None or shared == own:
            return
        await conn.execute(
            f"INSERT INTO {table} (service, version, name, applied_at) "
            "SELECT service, version, name, applied_at FROM tsunagu_migrations WHERE service = $1 "
            "ON CONFLICT DO NOTHING",
            self.service,
        )

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
