"""Both stores behind one fixture, each with a way to tamper with it as someone with write access would."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from tsunagu_audit_log.chain import Head, NewEvent, Row, row_hash
from tsunagu_audit_log.store import AuditStore, MemoryStore, PostgresStore, database_for
from tsunagu_core.testing import POSTGRES_DSN, require_stack


def event(n: int, *, subject: str = "user-1", action: str = "auth.login", time_ms: int | None = None) -> NewEvent:
    return NewEvent(
        event_id=f"ev-{n}",
        time_ms=time_ms if time_ms is not None else 1_700_000_000_000 + n,
        source="auth/pod-1",
        type="audit.event",
        actor="alice",
        action=action,
        subject=subject,
        outcome="ok",
        client_ip="10.0.0.1",
        details=b'{"n":%d}' % n,
    )


class Tamperer:
    """Changes a store behind the writer's back."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store

    async def all_rows(self) -> list[Row]:
        head = await self.store.head()
        return [row async for row in self.store.rows(0, head.seq + 1000)]

    async def update_details(self, seq: int, details: bytes) -> None:
        if isinstance(self.store, MemoryStore):
            self.store.log[seq - 1] = dataclasses.replace(self.store.log[seq - 1], details=details)
        else:
            assert isinstance(self.store, PostgresStore)
            await self.store.database.pool.execute(
                f"UPDATE {self.store.schema}.audit_log SET details = $1 WHERE seq = $2", details, seq
            )

    async def delete(self, seq: int) -> None:
        if isinstance(self.store, MemoryStore):
            del self.store.log[seq - 1]
        else:
            assert isinstance(self.store, PostgresStore)
            await self.store.database.pool.execute(f"DELETE FROM {self.store.schema}.audit_log WHERE seq = $1", seq)

    async def insert_after_head(self, row: Row) -> None:
        if isinstance(self.store, MemoryStore):
            self.store.log.append(row)
        else:
            assert isinstance(self.store, PostgresStore)
            await self.store.database.pool.execute(
                f"INSERT INTO {self.store.schema}.audit_log (seq, event_id, time_ms, source, type, actor, action,"
                " subject, outcome, client_ip, details, prev_hash, hash)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                *dataclasses.astuple(row),
            )

    async def rewrite(self, seq: int, details: bytes) -> None:
        """Change one row and recompute every hash after it, and the head: a careful attacker."""
        rows = await self.all_rows()
        prev = rows[seq - 2].hash if seq > 1 else bytes(32)
        rewritten = []
        for row in rows[seq - 1 :]:
            changed = dataclasses.replace(row, details=details) if row.seq == seq else row
            digest = row_hash(prev, changed.seq, changed)
            rewritten.append(dataclasses.replace(changed, prev_hash=prev, hash=digest))
            prev = digest
        head = Head(rewritten[-1].seq, rewritten[-1].hash)
        if isinstance(self.store, MemoryStore):
            self.store.log[seq - 1 :] = rewritten
            self.store.chain_head = head
            return
        assert isinstance(self.store, PostgresStore)
        s = self.store.schema
        async with self.store.database.pool.acquire() as conn, conn.transaction():
            for row in rewritten:
                await conn.execute(
                    f"UPDATE {s}.audit_log SET details = $1, prev_hash = $2, hash = $3 WHERE seq = $4",
                    row.details,
                    row.prev_hash,
                    row.hash,
                    row.seq,
                )
            await conn.execute(f"UPDATE {s}.audit_head SET seq = $1, hash = $2 WHERE id = 1", head.seq, head.hash)


async def postgres_store() -> AsyncIterator[PostgresStore]:
    require_stack("the PostgreSQL audit store")
    schema = f"audit_t_{uuid.uuid4().hex[:12]}"
    database = database_for(POSTGRES_DSN, schema)
    await database.start()
    try:
        yield PostgresStore(database, schema)
    finally:
        await database.close()
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.execute("DELETE FROM tsunagu_migrations WHERE service = $1", database.service)
        finally:
            await conn.close()


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[AuditStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    async for found in postgres_store():
        yield found


@pytest.fixture
def tamper(store: AuditStore) -> Tamperer:
    return Tamperer(store)


@pytest.fixture
def make_event() -> object:
    return event


@pytest.fixture
async def pg_store() -> AsyncIterator[PostgresStore]:
    async for found in postgres_store():
        yield found
