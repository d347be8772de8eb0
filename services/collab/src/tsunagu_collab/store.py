"""Where documents live: a snapshot (one merged Yjs update) plus the updates appended since, and versions.

Appending is cheap and compaction folds the appended updates into the snapshot, so the stored
bytes of a document stay within about twice its encoded size.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field

from pycrdt import Doc
from tsunagu_core.database import Migration, Postgres

MIGRATIONS = (
    Migration(
        1,
        "documents, updates and versions",
        """
        CREATE TABLE collab_documents (
            doc text PRIMARY KEY,
            snapshot bytea NOT NULL DEFAULT ''::bytea,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE collab_updates (
            doc text NOT NULL,
            seq bigserial NOT NULL,
            update bytea NOT NULL,
            PRIMARY KEY (doc, seq)
        );
        CREATE TABLE collab_versions (
            doc text NOT NULL,
            version integer NOT NULL,
            label text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL DEFAULT now(),
            state bytea NOT NULL,
            PRIMARY KEY (doc, version)
        );
        """,
    ),
)


def fold(stored: bytes, updates: list[bytes], snapshot: bytes) -> bytes:
    """One Yjs update holding everything in the stored snapshot, the updates and the new snapshot (applied
    to a Doc rather than `merge_updates`d, so deleted content is collected as in any snapshot)."""
    parts = [part for part in (stored, *updates, snapshot) if part]
    if len(parts) <= 1:
        return parts[0] if parts else b""
    ydoc: Doc = Doc()
    for part in parts:
        ydoc.apply_update(part)
    return ydoc.get_update()


@dataclass(frozen=True, slots=True)
class StoredDoc:
    snapshot: bytes
    updates: list[bytes]
    last_seq: int

    @property
    def stored_bytes(self) -> int:
        return len(self.snapshot) + sum(len(u) for u in self.updates)


@dataclass(frozen=True, slots=True)
class Version:
    version: int
    label: str
    created_at: float
    size: int


class Store(abc.ABC):
    @abc.abstractmethod
    async def load(self, doc: str) -> StoredDoc: ...

    @abc.abstractmethod
    async def append(self, doc: str, update: bytes) -> int:
        """Append an update; returns its sequence number."""

    @abc.abstractmethod
    async def compact(self, doc: str, snapshot: bytes, through_seq: int) -> None:
        """Fold `snapshot` (which includes every update up to `through_seq`) into the stored snapshot and
        drop those updates. Merged, not replaced: `snapshot` may come from a replica whose copy missed
        updates another replica compacted meanwhile, and Yjs updates merge without loss."""

    @abc.abstractmethod
    async def delete(self, doc: str) -> bool: ...

    @abc.abstractmethod
    async def add_version(self, doc: str, state: bytes, label: str) -> Version: ...

    @abc.abstractmethod
    async def versions(self, doc: str) -> list[Version]: ...

    @abc.abstractmethod
    async def version_state(self, doc: str, version: int) -> bytes | None: ...


@dataclass(slots=True)
class _MemoryDoc:
    snapshot: bytes = b""
    updates: list[tuple[int, bytes]] = field(default_factory=list)
    versions: list[tuple[Version, bytes]] = field(default_factory=list)


class MemoryStore(Store):
    def __init__(self) -> None:
        self.docs: dict[str, _MemoryDoc] = {}
        self.seq = 0

    async def load(self, doc: str) -> StoredDoc:
        state = self.docs.get(doc, _MemoryDoc())
        last = state.updates[-1][0] if state.updates else 0
        return StoredDoc(state.snapshot, [u for _, u in state.updates], last)

    async def append(self, doc: str, update: bytes) -> int:
        self.seq += 1
        self.docs.setdefault(doc, _MemoryDoc()).updates.append((self.seq, update))
        return self.seq

    async def compact(self, doc: str, snapshot: bytes, through_seq: int) -> None:
        state = self.docs.setdefault(doc, _MemoryDoc())
        state.snapshot = fold(state.snapshot, [u for s, u in state.updates if s <= through_seq], snapshot)
        state.updates = [(s, u) for s, u in state.updates if s > through_seq]

    async def delete(self, doc: str) -> bool:
        return self.docs.pop(doc, None) is not None

    async def add_version(self, doc: str, state: bytes, label: str) -> Version:
        entry = self.docs.setdefault(doc, _MemoryDoc())
        version = Version(len(entry.versions) + 1, label, time.time(), len(state))
        entry.versions.append((version, state))
        return version

    async def versions(self, doc: str) -> list[Version]:
        return [v for v, _ in self.docs.get(doc, _MemoryDoc()).versions]

    async def version_state(self, doc: str, version: int) -> bytes | None:
        for v, state in self.docs.get(doc, _MemoryDoc()).versions:
            if v.version == version:
                return state
        return None


class PostgresStore(Store):
    def __init__(self, database: Postgres) -> None:
        self.database = database

    async def load(self, doc: str) -> StoredDoc:
        async with self.database.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            snapshot = await conn.fetchval("SELECT snapshot FROM collab_documents WHERE doc = $1", doc)
            rows = await conn.fetch("SELECT seq, update FROM collab_updates WHERE doc = $1 ORDER BY seq", doc)
        return StoredDoc(bytes(snapshot or b""), [bytes(r["update"]) for r in rows], rows[-1]["seq"] if rows else 0)

    async def append(self, doc: str, update: bytes) -> int:
        seq: int = await self.database.pool.fetchval(
            "INSERT INTO collab_updates (doc, update) VALUES ($1, $2) RETURNING seq", doc, update
        )
        return seq

    async def compact(self, doc: str, snapshot: bytes, through_seq: int) -> None:
        async with self.database.pool.acquire() as conn, conn.transaction():
            # The row lock orders concurrent compactions of one document (two replicas around a rebalance).
            await conn.execute("INSERT INTO collab_documents (doc) VALUES ($1) ON CONFLICT DO NOTHING", doc)
            stored = await conn.fetchval("SELECT snapshot FROM collab_documents WHERE doc = $1 FOR UPDATE", doc)
            rows = await conn.fetch(
                "SELECT update FROM collab_updates WHERE doc = $1 AND seq <= $2 ORDER BY seq", doc, through_seq
            )
            merged = fold(bytes(stored or b""), [bytes(r["update"]) for r in rows], snapshot)
            await conn.execute(
                "UPDATE collab_documents SET snapshot = $2, updated_at = now() WHERE doc = $1", doc, merged
            )
            await conn.execute("DELETE FROM collab_updates WHERE doc = $1 AND seq <= $2", doc, through_seq)

    async def delete(self, doc: str) -> bool:
        async with self.database.pool.acquire() as conn, conn.transaction():
            documents = await conn.execute("DELETE FROM collab_documents WHERE doc = $1", doc)
            updates = await conn.execute("DELETE FROM collab_updates WHERE doc = $1", doc)
            await conn.execute("DELETE FROM collab_versions WHERE doc = $1", doc)
        return documents != "DELETE 0" or updates != "DELETE 0"

    async def add_version(self, doc: str, state: bytes, label: str) -> Version:
        row = await self.database.pool.fetchrow(
            """INSERT INTO collab_versions (doc, version, label, state)
               VALUES ($1, (SELECT COALESCE(MAX(version), 0) + 1 FROM collab_versions WHERE doc = $1), $2, $3)
               RETURNING version, label, created_at""",
            doc,
            label,
            state,
        )
        assert row is not None
        return Version(row["version"], row["label"], row["created_at"].timestamp(), len(state))

    async def versions(self, doc: str) -> list[Version]:
        rows = await self.database.pool.fetch(
            """SELECT version, label, created_at, length(state) AS size FROM collab_versions
               WHERE doc = $1 ORDER BY version""",
            doc,
        )
        return [Version(r["version"], r["label"], r["created_at"].timestamp(), r["size"]) for r in rows]

    async def version_state(self, doc: str, version: int) -> bytes | None:
        state = await self.database.pool.fetchval(
            "SELECT state FROM collab_versions WHERE doc = $1 AND version = $2", doc, version
        )
        return bytes(state) if state is not None else None
