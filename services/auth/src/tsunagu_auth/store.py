"""What auth keeps: users, sessions with their refresh tokens, signing keys, users' message keys, and
second factors (a TOTP secret, recovery code hashes, WebAuthn credentials).

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
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    user: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    channels: tuple[str, ...] = ()
    # Where it was opened from, and how strongly it is authenticated (`acr`, `amr`; raised by a step-up).
    ip: str = ""
    user_agent: str = ""
    acr: str = "1"
    amr: tuple[str, ...] = ("pwd",)
    auth_time: float = 0.0
    last_seen_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Totp:
    secret: str  # base32, encrypted at rest when a key-encryption secret is set (factors.py)
    confirmed: bool = True
    last_step: int = -1  # the newest 30-second window a code was accepted for: older ones are replays


@dataclass(frozen=True, slots=True)
class WebauthnCredential:
    id: str  # base64url credential id
    user: str
    public_key: bytes  # COSE
    sign_count: int
    name: str
    created_at: float
    transports: tuple[str, ...] = ()
    last_used_at: float | None = None


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
    async def live_sessions(self, username: str | None, now: float) -> list[Session]:
        """Sessions neither revoked nor expired, of one user or (None) of everyone, newest first."""

    @abc.abstractmethod
    async def elevate_session(self, session_id: str, acr: str, amr: tuple[str, ...], now: float) -> Session | None:
        """A step-up: the session's `acr`/`amr` from now on (its refreshed tokens carry them)."""

    @abc.abstractmethod
    async def touch_session(self, session_id: str, now: float) -> None: ...

    # second factors

    @abc.abstractmethod
    async def totp(self, username: str) -> Totp | None:
        """The user's confirmed TOTP factor, if any."""

    @abc.abstractmethod
    async def pending_totp(self, username: str) -> str | None:
        """The secret of an enrolment not confirmed yet."""

    @abc.abstractmethod
    async def set_totp(self, username: str, secret: str) -> None:
        """A new, unconfirmed secret (replacing any earlier one once it is confirmed)."""

    @abc.abstractmethod
    async def confirm_totp(self, username: str, step: int) -> bool:
        """The pending secret becomes the user's, with `step` used; False when there is none."""

    @abc.abstractmethod
    async def spend_totp_step(self, username: str, step: int) -> bool:
        """Atomically: True when `step` is newer than the last accepted one (and record it), else a replay."""

    @abc.abstractmethod
    async def set_recovery_codes(self, username: str, hashes: list[str]) -> None: ...

    @abc.abstractmethod
    async def spend_recovery_code(self, username: str, code_hash: str) -> bool:
        """Atomically remove the code; False when it is not (or no longer) one of the user's."""

    @abc.abstractmethod
    async def recovery_codes_left(self, username: str) -> int: ...

    @abc.abstractmethod
    async def add_webauthn(self, credential: WebauthnCredential) -> bool:
        """False when the credential id is registered already."""

    @abc.abstractmethod
    async def webauthn_credentials(self, username: str) -> list[WebauthnCredential]: ...

    @abc.abstractmethod
    async def advance_sign_count(self, credential_id: str, seen: int, new: int, now: float) -> bool:
        """Atomically move the counter from `seen` to `new`; False when another use got there first."""

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
        self.totps: dict[str, Totp] = {}
        self.pending_totps: dict[str, str] = {}
        self.recovery: dict[str, set[str]] = {}
        self.credentials: dict[str, WebauthnCredential] = {}
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
        entry.session = replace(entry.session, expires_at=now + refresh_ttl, last_seen_at=now)
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

    async def live_sessions(self, username: str | None, now: float) -> list[Session]:
        found = [
            e.session
            for e in self.sessions.values()
            if e.session.revoked_at is None
            and e.session.expires_at > now
            and (username is None or e.session.user == username)
        ]
        return sorted(found, key=lambda s: s.created_at, reverse=True)

    async def elevate_session(self, session_id: str, acr: str, amr: tuple[str, ...], now: float) -> Session | None:
        entry = self.sessions.get(session_id)
        if entry is None or entry.session.revoked_at is not None:
            return None
        entry.session = replace(entry.session, acr=acr, amr=amr, auth_time=now, last_seen_at=now)
        return entry.session

    async def touch_session(self, session_id: str, now: float) -> None:
        entry = self.sessions.get(session_id)
        if entry is not None:
            entry.session = replace(entry.session, last_seen_at=now)

    async def totp(self, username: str) -> Totp | None:
        return self.totps.get(username)

    async def pending_totp(self, username: str) -> str | None:
        return self.pending_totps.get(username)

    async def set_totp(self, username: str, secret: str) -> None:
        self.pending_totps[username] = secret

    async def confirm_totp(self, username: str, step: int) -> bool:
        secret = self.pending_totps.pop(username, None)
        if secret is None:
            return False
        self.totps[username] = Totp(secret, confirmed=True, last_step=step)
        return True

    async def spend_totp_step(self, username: str, step: int) -> bool:
        current = self.totps.get(username)
        if current is None or step <= current.last_step:
            return False
        self.totps[username] = replace(current, last_step=step)
        return True

    async def set_recovery_codes(self, username: str, hashes: list[str]) -> None:
        self.recovery[username] = set(hashes)

    async def spend_recovery_code(self, username: str, code_hash: str) -> bool:
        codes = self.recovery.get(username, set())
        if code_hash not in codes:
            return False
        codes.discard(code_hash)
        return True

    async def recovery_codes_left(self, username: str) -> int:
        return len(self.recovery.get(username, ()))

    async def add_webauthn(self, credential: WebauthnCredential) -> bool:
        if credential.id in self.credentials:
            return False
        self.credentials[credential.id] = credential
        return True

    async def webauthn_credentials(self, username: str) -> list[WebauthnCredential]:
        return sorted((c for c in self.credentials.values() if c.user == username), key=lambda c: c.created_at)

    async def advance_sign_count(self, credential_id: str, seen: int, new: int, now: float) -> bool:
        credential = self.credentials.get(credential_id)
        if credential is None or credential.sign_count != seen:
            return False
        self.credentials[credential_id] = replace(credential, sign_count=new, last_used_at=now)
        return True

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
    Migration(
        2,
        "roles, session devices and levels, second factors",
        """
        ALTER TABLE auth_users ADD COLUMN roles text[] NOT NULL DEFAULT '{}';
        ALTER TABLE auth_sessions
            ADD COLUMN ip text NOT NULL DEFAULT '',
            ADD COLUMN user_agent text NOT NULL DEFAULT '',
            ADD COLUMN acr text NOT NULL DEFAULT '1',
            ADD COLUMN amr text[] NOT NULL DEFAULT '{pwd}',
            ADD COLUMN auth_time double precision NOT NULL DEFAULT 0,
            ADD COLUMN last_seen_at double precision NOT NULL DEFAULT 0;
        CREATE TABLE auth_totp (
            username text PRIMARY KEY REFERENCES auth_users ON DELETE CASCADE,
            secret text,
            pending_secret text,
            last_step bigint NOT NULL DEFAULT -1
        );
        CREATE TABLE auth_recovery_codes (
            username text NOT NULL REFERENCES auth_users ON DELETE CASCADE,
            hash text NOT NULL,
            PRIMARY KEY (username, hash)
        );
        CREATE TABLE auth_webauthn_credentials (
            id text PRIMARY KEY,
            username text NOT NULL REFERENCES auth_users ON DELETE CASCADE,
            public_key bytea NOT NULL,
            sign_count bigint NOT NULL,
            name text NOT NULL,
            transports text[] NOT NULL DEFAULT '{}',
            created_at double precision NOT NULL,
            last_used_at double precision
        );
        CREATE INDEX auth_webauthn_credentials_user ON auth_webauthn_credentials (username);
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
        ip=row["ip"],
        user_agent=row["user_agent"],
        acr=row["acr"],
        amr=tuple(row["amr"]),
        auth_time=row["auth_time"],
        last_seen_at=row["last_seen_at"],
    )


def _credential(row: Any) -> WebauthnCredential:
    return WebauthnCredential(
        id=row["id"],
        user=row["username"],
        public_key=bytes(row["public_key"]),
        sign_count=row["sign_count"],
        name=row["name"],
        created_at=row["created_at"],
        transports=tuple(row["transports"]),
        last_used_at=row["last_used_at"],
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
            "INSERT INTO auth_users (username, password_hash, channels, roles) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT DO NOTHING",
            user.username,
            user.password_hash,
            list(user.channels),
            list(user.roles),
        )
        return bool(result == "INSERT 0 1")

    async def get_user(self, username: str) -> User | None:
        row = await self.database.pool.fetchrow(
            "SELECT username, password_hash, channels, roles FROM auth_users WHERE username = $1", username
        )
        return User(row["username"], row["password_hash"], tuple(row["channels"]), tuple(row["roles"])) if row else None

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
                "INSERT INTO auth_sessions (id, username, channels, created_at, expires_at, ip, user_agent, acr, amr,"
                " auth_time, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                session.id,
                session.user,
                list(session.channels),
                session.created_at,
                session.expires_at,
                session.ip,
                session.user_agent,
                session.acr,
                list(session.amr),
                session.auth_time,
                session.last_seen_at,
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
            await conn.execute(
                "UPDATE auth_sessions SET expires_at = $2, last_seen_at = $3 WHERE id = $1",
                session.id,
                now + refresh_ttl,
                now,
            )
            return RefreshOutcome("ok", replace(session, expires_at=now + refresh_ttl, last_seen_at=now))

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

    async def live_sessions(self, username: str | None, now: float) -> list[Session]:
        rows = await self.database.pool.fetch(
            "SELECT * FROM auth_sessions WHERE revoked_at IS NULL AND expires_at > $1"
            " AND ($2::text IS NULL OR username = $2) ORDER BY created_at DESC",
            now,
            username,
        )
        return [_session(row) for row in rows]

    async def elevate_session(self, session_id: str, acr: str, amr: tuple[str, ...], now: float) -> Session | None:
        row = await self.database.pool.fetchrow(
            "UPDATE auth_sessions SET acr = $2, amr = $3, auth_time = $4, last_seen_at = $4"
            " WHERE id = $1 AND revoked_at IS NULL RETURNING *",
            session_id,
            acr,
            list(amr),
            now,
        )
        return _session(row) if row else None

    async def touch_session(self, session_id: str, now: float) -> None:
        await self.database.pool.execute("UPDATE auth_sessions SET last_seen_at = $2 WHERE id = $1", session_id, now)

    async def totp(self, username: str) -> Totp | None:
        row = await self.database.pool.fetchrow(
            "SELECT secret, last_step FROM auth_totp WHERE username = $1 AND secret IS NOT NULL", username
        )
        return Totp(row["secret"], confirmed=True, last_step=row["last_step"]) if row else None

    async def pending_totp(self, username: str) -> str | None:
        value = await self.database.pool.fetchval("SELECT pending_secret FROM auth_totp WHERE username = $1", username)
        return str(value) if value is not None else None

    async def set_totp(self, username: str, secret: str) -> None:
        await self.database.pool.execute(
            "INSERT INTO auth_totp (username, pending_secret) VALUES ($1, $2)"
            " ON CONFLICT (username) DO UPDATE SET pending_secret = $2",
            username,
            secret,
        )

    async def confirm_totp(self, username: str, step: int) -> bool:
        result = await self.database.pool.execute(
            "UPDATE auth_totp SET secret = pending_secret, pending_secret = NULL, last_step = $2"
            " WHERE username = $1 AND pending_secret IS NOT NULL",
            username,
            step,
        )
        return bool(result == "UPDATE 1")

    async def spend_totp_step(self, username: str, step: int) -> bool:
        result = await self.database.pool.execute(
            "UPDATE auth_totp SET last_step = $2 WHERE username = $1 AND secret IS NOT NULL AND last_step < $2",
            username,
            step,
        )
        return bool(result == "UPDATE 1")

    async def set_recovery_codes(self, username: str, hashes: list[str]) -> None:
        async with self.database.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM auth_recovery_codes WHERE username = $1", username)
            await conn.executemany(
                "INSERT INTO auth_recovery_codes (username, hash) VALUES ($1, $2)", [(username, h) for h in hashes]
            )

    async def spend_recovery_code(self, username: str, code_hash: str) -> bool:
        result = await self.database.pool.execute(
            "DELETE FROM auth_recovery_codes WHERE username = $1 AND hash = $2", username, code_hash
        )
        return bool(result == "DELETE 1")

    async def recovery_codes_left(self, username: str) -> int:
        count = await self.database.pool.fetchval(
            "SELECT count(*) FROM auth_recovery_codes WHERE username = $1", username
        )
        return int(count or 0)

    async def add_webauthn(self, credential: WebauthnCredential) -> bool:
        result = await self.database.pool.execute(
            "INSERT INTO auth_webauthn_credentials (id, username, public_key, sign_count, name, transports, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            credential.id,
            credential.user,
            credential.public_key,
            credential.sign_count,
            credential.name,
            list(credential.transports),
            credential.created_at,
        )
        return bool(result == "INSERT 0 1")

    async def webauthn_credentials(self, username: str) -> list[WebauthnCredential]:
        rows = await self.database.pool.fetch(
            "SELECT * FROM auth_webauthn_credentials WHERE username = $1 ORDER BY created_at", username
        )
        return [_credential(row) for row in rows]

    async def advance_sign_count(self, credential_id: str, seen: int, new: int, now: float) -> bool:
        result = await self.database.pool.execute(
            "UPDATE auth_webauthn_credentials SET sign_count = $3, last_used_at = $4 WHERE id = $1 AND sign_count = $2",
            credential_id,
            seen,
            new,
            now,
        )
        return bool(result == "UPDATE 1")

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
