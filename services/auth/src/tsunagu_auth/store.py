"""What auth keeps: users, sessions with their refresh tokens, signing keys, users' message keys.

Two engines with one contract: PostgreSQL (`TSUNAGU_DATABASE=postgres`, tables `auth_*`, migrations
below) and memory (embedded mode and unit tests). Refresh tokens are stored as SHA-256 hashes only.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from tsunagu_core.database import Migration, Postgres
from tsunagu_core.dependency import NothingToConnect

from tsunagu_auth.keys import SigningKey


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str
    channels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    user: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    channels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    status: Literal["ok", "reused", "invalid"]
    session: Session | None = None


@dataclass(frozen=True, slots=True)
class MessageKey:
    kid: str
    key: str  # base64url of the raw 32-byte Ed25519 public key


# Given every stored key, the keys to insert or update (None: nothing to do).
KeyRotation = Callable[[list[SigningKey]], list[SigningKey] | None]


class Store(NothingToConnect, abc.ABC):
    @abc.abstractmethod
    async def create_user(self, user: User) -> bool:
        """False when the username is taken."""

    @abc.abstractmethod
    async def get_user(self, username: str) -> User | None: ...

    @abc.abstractmethod
    async def add_message_key(self, username: str, key: MessageKey) -> bool:
        """False when this user already has a key with that kid."""

    @abc.abstractmethod
    async def message_keys(self, username: str) -> list[MessageKey]: ...

    @abc.abstractmethod
    async def create_session(self, session: Session, refresh_hash: str) -> None: ...

    @abc.abstractmethod
    async def rotate_refresh(self, old_hash: str, new_hash: str, now: float, refresh_ttl: float) -> RefreshOutcome:
        """Spend `old_hash` for `new_hash`. A spent token used again revokes its session ("reused")."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> Session | None: ...

    @abc.abstractmethod
    async def revoke_session(self, session_id: str, now: float) -> Session | None: ...

    @abc.abstractmethod
    async def revoke_user_sessions(self, username: str, now: float) -> list[str]: ...

    @abc.abstractmethod
    async def signing_keys(self) -> list[SigningKey]: ...

    @abc.abstractmethod
    async def rotate_keys(self, rotation: KeyRotation) -> list[SigningKey]:
        """Apply `rotation` to the stored keys atomically (one replica at a time); return all keys after."""

    @abc.abstractmethod
    async def purge(self, now: float) -> None:
        """Forget expired sessions, refresh tokens and signing keys."""


@dataclass
class _MemorySession:
    session: Session
    refresh: dict[str, bool] = field(default_factory=dict)  # hash -> spent


class MemoryStore(Store):
    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.keys_of_users: dict[str, dict[str, MessageKey]] = {}
        self.sessions: dict[str, _MemorySession] = {}
        self.refresh_index: dict[str, str] = {}  # hash -> session id
        self.keys: dict[str, SigningKey] = {}
        self._lock = asyncio.Lock()

    async def create_user(self, user: User) -> bool:
        if user.username in self.users:
            return False
        self.users[user.username] = user
        return True

    async def get_user(self, username: str) -> User | None:
        return self.users.get(username)

    async def add_message_key(self, username: str, key: MessageKey) -> bool:
        keys = self.keys_of_users.setdefault(username, {})
        if key.kid in keys:
            return False
        keys[key.kid] = key
        return True

    async def message_keys(self, username: str) -> list[MessageKey]:
        return list(self.keys_of_users.get(username, {}).values())

    async def create_session(self, session: Session, refresh_hash: str) -> None:
        self.sessions[session.id] = _MemorySession(session, {refresh_hash: False})
        self.refresh_index[refresh_hash] = session.id

    async def rotate_refresh(self, old_hash: str, new_hash: str, now: float, refresh_ttl: float) -> RefreshOutcome:
        entry = self.sessions.get(self.refresh_index.get(old_hash, ""))
        if entry is None or entry.session.expires_at <= now:
            return RefreshOutcome("invalid")
        if entry.refresh[old_hash]:
            if entry.session.revoked_at is None:
                entry.session = replace(entry.session, revoked_at=now)
            return RefreshOutcome("reused", entry.session)
        if entry.session.revoked_at is not None:
            return RefreshOutcome("invalid", entry.session)
        entry.refresh[old_hash] = True
        entry.refresh[new_hash] = False
        self.refresh_index[new_hash] = entry.session.id
        entry.session = replace(entry.session, expires_at=now + refresh_ttl)
        return RefreshOutcome("ok", entry.session)

    async def get_session(self, session_id: str) -> Session | None:
        entry = self.sessions.get(session_id)
        return entry.session if entry is not None else None

    async def revoke_session(self, session_id: str, now: float) -> Session | None:
        entry = self.sessions.get(session_id)
        if entry is None:
            return None
        if entry.session.revoked_at is None:
            entry.session = replace(entry.session, revoked_at=now)
        return entry.session

    async def revoke_user_sessions(self, username: str, now: float) -> list[str]:
        revoked = []
        for entry in self.sessions.values():
            if entry.session.user == username and entry.session.revoked_at is None:
                entry.session = replace(entry.session, revoked_at=now)
                revoked.append(entry.session.id)
        return revoked

    async def signing_keys(self) -> list[SigningKey]:
        return list(self.keys.values())

    async def rotate_keys(self, rotation: KeyRotation) -> list[SigningKey]:
        async with self._lock:
            for key in rotation(list(self.keys.values())) or []:
                self.keys[key.kid] = key
            return list(self.keys.values())

    async def purge(self, now: float) -> None:
        for sid in [s for s, e in self.sessions.items() if e.session.expires_at <= now]:
            for token_hash in self.sessions.pop(sid).refresh:
                self.refresh_index.pop(token_hash, None)
        for kid in [k for k, key in self.keys.items() if key.state(now) == "expired"]:
            del self.keys[kid]


MIGRATIONS = (
    Migration(
        1,
        "users, sessions, refresh tokens, signing keys",
        """
        CREATE TABLE auth_users (
            username text PRIMARY KEY,
            password_hash text NOT NULL,
            channels text[] NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE auth_user_keys (
            username text NOT NULL REFERENCES auth_users ON DELETE CASCADE,
            kid text NOT NULL,
            public_key text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (username, kid)
        );
        CREATE TABLE auth_sessions (
            id text PRIMARY KEY,
            username text NOT NULL,
            channels text[] NOT NULL DEFAULT '{}',
            created_at double precision NOT NULL,
            expires_at double precision NOT NULL,
            revoked_at double precision
        );
        CREATE INDEX auth_sessions_user ON auth_sessions (username);
        CREATE TABLE auth_refresh_tokens (
            hash text PRIMARY KEY,
            session_id text NOT NULL REFERENCES auth_sessions ON DELETE CASCADE,
            spent boolean NOT NULL DEFAULT false
        );
        CREATE INDEX auth_refresh_tokens_session ON auth_refresh_tokens (session_id);
        CREATE TABLE auth_signing_keys (
            kid text PRIMARY KEY,
            algorithm text NOT NULL,
            private_pem bytea NOT NULL,
            public_jwk text NOT NULL,
            created_at double precision NOT NULL,
            activated_at double precision,
            retired_at double precision,
            expires_at double precision
        );
        """,
    ),
)

# Serialises key rotations of all replicas (a transaction-scoped advisory lock).
_KEYS_LOCK = 0x7473756E61677501


def _session(row: Any) -> Session:
    return Session(
        id=row["id"],
        user=row["username"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        channels=tuple(row["channels"]),
    )


def _key(row: Any) -> SigningKey:
    return SigningKey(
        kid=row["kid"],
        algorithm=row["algorithm"],
        private_pem=bytes(row["private_pem"]),
        public_jwk=json.loads(row["public_jwk"]),
        created_at=row["created_at"],
        activated_at=row["activated_at"],
        retired_at=row["retired_at"],
        expires_at=row["expires_at"],
    )


class PostgresStore(Store):
    def __init__(self, database: Postgres) -> None:
        self.database = database

    async def start(self) -> None:
        await self.database.start()

    async def ping(self) -> None:
        await self.database.ping()

    async def close(self) -> None:
        await self.database.close()

    async def create_user(self, user: User) -> bool:
        result = await self.database.pool.execute(
            "INSERT INTO auth_users (username, password_hash, channels) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            user.username,
            user.password_hash,
            list(user.channels),
        )
        return bool(result == "INSERT 0 1")

    async def get_user(self, username: str) -> User | None:
        row = await self.database.pool.fetchrow(
            "SELECT username, password_hash, channels FROM auth_users WHERE username = $1", username
        )
        return User(row["username"], row["password_hash"], tuple(row["channels"])) if row else None

    async def add_message_key(self, username: str, key: MessageKey) -> bool:
        result = await self.database.pool.execute(
            "INSERT INTO auth_user_keys (username, kid, public_key) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            username,
            key.kid,
            key.key,
        )
        return bool(result == "INSERT 0 1")

    async def message_keys(self, username: str) -> list[MessageKey]:
        rows = await self.database.pool.fetch(
            "SELECT kid, public_key FROM auth_user_keys WHERE username = $1 ORDER BY created_at, kid", username
        )
        return [MessageKey(row["kid"], row["public_key"]) for row in rows]

    async def create_session(self, session: Session, refresh_hash: str) -> None:
        async with self.database.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO auth_sessions (id, username, channels, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                session.id,
                session.user,
                list(session.channels),
                session.created_at,
                session.expires_at,
            )
            await conn.execute(
                "INSERT INTO auth_refresh_tokens (hash, session_id) VALUES ($1, $2)", refresh_hash, session.id
            )

    async def rotate_refresh(self, old_hash: str, new_hash: str, now: float, refresh_ttl: float) -> RefreshOutcome:
        async with self.database.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT t.spent, s.* FROM auth_refresh_tokens t JOIN auth_sessions s ON s.id = t.session_id "
                "WHERE t.hash = $1 FOR UPDATE",
                old_hash,
            )
            if row is None or row["expires_at"] <= now:
                return RefreshOutcome("invalid")
            session = _session(row)
            if row["spent"]:
                if session.revoked_at is None:
                    await conn.execute("UPDATE auth_sessions SET revoked_at = $2 WHERE id = $1", session.id, now)
                    session = replace(session, revoked_at=now)
                return RefreshOutcome("reused", session)
            if session.revoked_at is not None:
                return RefreshOutcome("invalid", session)
            await conn.execute("UPDATE auth_refresh_tokens SET spent = true WHERE hash = $1", old_hash)
            await conn.execute(
                "INSERT INTO auth_refresh_tokens (hash, session_id) VALUES ($1, $2)", new_hash, session.id
            )
            await conn.execute("UPDATE auth_sessions SET expires_at = $2 WHERE id = $1", session.id, now + refresh_ttl)
            return RefreshOutcome("ok", replace(session, expires_at=now + refresh_ttl))

    async def get_session(self, session_id: str) -> Session | None:
        row = await self.database.pool.fetchrow("SELECT * FROM auth_sessions WHERE id = $1", session_id)
        return _session(row) if row else None

    async def revoke_session(self, session_id: str, now: float) -> Session | None:
        row = await self.database.pool.fetchrow(
            "UPDATE auth_sessions SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1 RETURNING *", session_id, now
        )
        return _session(row) if row else None

    async def revoke_user_sessions(self, username: str, now: float) -> list[str]:
        rows = await self.database.pool.fetch(
            "UPDATE auth_sessions SET revoked_at = $2 WHERE username = $1 AND revoked_at IS NULL RETURNING id",
            username,
            now,
        )
        return [row["id"] for row in rows]

    async def signing_keys(self) -> list[SigningKey]:
        return [_key(row) for row in await self.database.pool.fetch("SELECT * FROM auth_signing_keys")]

    async def rotate_keys(self, rotation: KeyRotation) -> list[SigningKey]:
        async with self.database.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEYS_LOCK)
            keys = [_key(row) for row in await conn.fetch("SELECT * FROM auth_signing_keys")]
            for key in rotation(keys) or []:
                await conn.execute(
                    """
                    INSERT INTO auth_signing_keys
                        (kid, algorithm, private_pem, public_jwk, created_at, activated_at, retired_at, expires_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                    ON CONFLICT (kid) DO UPDATE SET activated_at = $6, retired_at = $7, expires_at = $8
                    """,
                    key.kid,
                    key.algorithm,
                    key.private_pem,
                    json.dumps(key.public_jwk),
                    key.created_at,
                    key.activated_at,
                    key.retired_at,
                    key.expires_at,
                )
            return [_key(row) for row in await conn.fetch("SELECT * FROM auth_signing_keys")]

    async def purge(self, now: float) -> None:
        await self.database.pool.execute("DELETE FROM auth_sessions WHERE expires_at <= $1", now)
        await self.database.pool.execute("DELETE FROM auth_signing_keys WHERE expires_at <= $1", now)
