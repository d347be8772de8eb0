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


async def test_a_schema_keeps_its_own_history_and_adopts_what_earlier_versions_recorded() -> None:
    """audit-log's history lives in its schema; one recorded in the search path's table by an earlier
    version is taken over, so an upgrade does not run migration 1 again on existing tables."""
    require_stack("PostgreSQL")
    run = uuid.uuid4().hex[:8]
    schema, service = f"hist_{run}", f"test-hist/{run}"
    migrations = [
        Migration(1, "create", f'CREATE TABLE "{schema}".t (id int PRIMARY KEY)'),
        Migration(2, "seed", f'INSERT INTO "{schema}".t VALUES (1)'),
    ]
    # what an earlier version left: the tables, and its history in the shared table only
    setup = Postgres(POSTGRES_DSN, service=f"setup-{run}")
    await setup.start()
    try:
        await setup.pool.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".t (id int PRIMARY KEY)')
        await setup.pool.execute(
            "INSERT INTO tsunagu_migrations (service, version, name) VALUES ($1, 1, 'create')", service
        )
        upgraded = Postgres(POSTGRES_DSN, service=service, migrations=migrations, schema=schema)
        await upgraded.start()
        own = await upgraded.pool.fetch(
            f'SELECT version FROM "{schema}".tsunagu_migrations WHERE service = $1', service
        )
        assert sorted(r["version"] for r in own) == [1, 2]
        assert await upgraded.pool.fetchval(f'SELECT count(*) FROM "{schema}".t') == 1
        await upgraded.close()
    finally:
        await setup.pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await setup.pool.execute("DELETE FROM tsunagu_migrations WHERE service = $1", service)
        await setup.close()
