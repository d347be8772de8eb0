"""The PostgreSQL dependency: migrations applied once, also when replicas start together."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from tsunagu_core.database import DatabaseUnavailable, Migration, Postgres
from tsunagu_core.testing import POSTGRES_DSN, require_stack


def test_unconnected_pool_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable):
        _ = Postgres(POSTGRES_DSN, service="x").pool


def test_migrations_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="unique and ascending"):
        Postgres(POSTGRES_DSN, service="x", migrations=[Migration(2, "b", ""), Migration(1, "a", "")])


async def test_migrations_apply_once_across_concurrent_replicas() -> None:
    require_stack("PostgreSQL")
    service = f"test-{uuid.uuid4().hex[:8]}"
    table = f"t_{service.replace('-', '_')}"
    migrations = [
        Migration(1, "create", f"CREATE TABLE {table} (id int PRIMARY KEY)"),
        Migration(2, "seed", f"INSERT INTO {table} VALUES (1)"),
    ]
    replicas = [Postgres(POSTGRES_DSN, service=service, migrations=migrations) for _ in range(3)]
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        await replicas[0].ping()
        assert await replicas[0].pool.fetchval(f"SELECT count(*) FROM {table}") == 1
        # A later version adds only its own migration.
        later = Postgres(
            POSTGRES_DSN,
            service=service,
            migrations=[*migrations, Migration(3, "more", f"INSERT INTO {table} VALUES (2)")],
        )
        await later.start()
        assert await later.pool.fetchval(f"SELECT count(*) FROM {table}") == 2
        await later.pool.execute(f"DROP TABLE {table}")
        await later.pool.execute("DELETE FROM tsunagu_migrations WHERE service = $1", service)
        await later.close()
    finally:
        for replica in replicas:
            await replica.close()
