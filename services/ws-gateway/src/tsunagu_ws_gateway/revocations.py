"""Revoked sessions, users and tokens, learnt from Kafka `tsunagu.auth.revocations`.

Every gateway process reads the whole topic in a consumer group of its own (a new group per start,
reading from the earliest offset), so a restarted gateway rebuilds the list before it matters and each
live revocation reaches every replica; connections it names are closed as soon as the event arrives.
Entries are forgotten once every token they can affect has expired.

At connect the gateway also asks the shared RevocationStore (Redis when the broker is Redis), which
auth writes before it publishes: a gateway that has just started refuses a revoked token before its
Kafka consumer has caught up. If Redis does not answer in time, the client is closed with 3004 and
reconnects later: a token is never let through unchecked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter
from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.revocation_store import RevocationStore, TokenIdentity
from tsunagu_core.wire.events_pb2 import Revocation

from tsunagu_ws_gateway.protocol.codes import SERVER_ERROR, ProtocolError
from tsunagu_ws_gateway.tokens import ConnectionGrant

log = logging.getLogger("tsunagu.gateway.revocations")

REVOCATIONS_APPLIED = Counter("tsunagu_gateway_revocations_total", "Revocations received from auth", ["scope"])
STORE_ERRORS = Counter("tsunagu_gateway_revocation_store_errors_total", "Connect-time revocation lookups that failed")
NEVER = float("inf")
# Generous: when Redis is down the broker (same Redis) fails connects anyway, and a busy event loop
# (1,000 connects at once) can take seconds to get to the answer.
STORE_TIMEOUT = 5.0


@dataclass
class RevocationList:
    sessions: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    # user -> (tokens issued before this time are revoked, forget after)
    users: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Asked at connect too (see the module doc); None: the Kafka-fed list only.
    store: RevocationStore | None = None
    store_timeout: float = STORE_TIMEOUT

    def apply(self, revocation: Revocation) -> None:
        until = revocation.expires_unix_ms / 1000 if revocation.expires_unix_ms else NEVER
        if revocation.scope == Revocation.SESSION:
            self.sessions[revocation.value] = until
        elif revocation.scope == Revocation.TOKEN:
            self.tokens[revocation.value] = until
        elif revocation.scope == Revocation.USER:
            before = revocation.issued_before_unix_ms / 1000 if revocation.issued_before_unix_ms else NEVER
            self.users[revocation.value] = (before, until)

    def revokes(self, grant: ConnectionGrant) -> bool:
        now = time.time()
        if grant.session_id and self.sessions.get(grant.session_id, 0) > now:
            return True
        if grant.token_id and self.tokens.get(grant.token_id, 0) > now:
            return True
        entry = self.users.get(grant.user)
        if entry is not None and entry[1] > now:
            issued = grant.issued_at if grant.issued_at is not None else 0.0
            return issued < entry[0]
        return False

    async def refuses(self, grant: ConnectionGrant) -> bool:
        """At connect and refresh: revoked by what this replica has learnt, or by what the shared store
        holds. When the store cannot answer, the token is not let through unchecked: the client is told
        to come back (3004, the SDKs reconnect with backoff), which also spreads a connect storm."""
        if self.revokes(grant):
            return True
        if self.store is None:
            return False
        identity = TokenIdentity(grant.user, grant.session_id, grant.token_id, grant.issued_at)
        try:
            async with asyncio.timeout(self.store_timeout):
                return await self.store.revoked(identity)
        except Exception as exc:
            STORE_ERRORS.inc()
            log.warning("revocation store not answering (%r): client asked to reconnect", exc)
            raise ProtocolError(SERVER_ERROR) from None

    def forget_expired(self) -> None:
        now = time.time()
        for table in (self.sessions, self.tokens):
            for key in [k for k, until in table.items() if until <= now]:
                del table[key]
        for user in [u for u, (_, until) in self.users.items() if until <= now]:
            del self.users[user]


class RevocationFeed:
    """Bus handler: applies each revocation and hands it to `on_revoked` to close live connections."""

    def __init__(self, revoked: RevocationList, on_revoked: Callable[[Revocation], None]) -> None:
        self.revoked = revoked
        self.on_revoked = on_revoked

    async def __call__(self, message: BusMessage) -> None:
        try:
            revocation = payload_of(envelope_of(message), Revocation)
        except EnvelopeError as exc:
            log.warning("ignoring an undecodable revocation at %s/%d: %s", message.topic, message.offset, exc)
            return
        self.revoked.apply(revocation)
        REVOCATIONS_APPLIED.labels(Revocation.Scope.Name(revocation.scope).lower()).inc()
        self.on_revoked(revocation)
        self.revoked.forget_expired()
