"""Binding tokens of `$get-ws-binding-token`: opaque, short-lived, for one or more subscriptions.

A token is 32 random bytes (URL-safe base64). What it stands for (subscriptions, user, the user's
connection JWT or client certificate, FHIR version, expiry) is kept in the broker under a channel named
after the token's SHA-256, as a one-publication history that expires with the token, so every replica sharing the Redis
broker accepts a token any of them issued, and the token itself tells nothing. The websocket binds
by connecting an ordinary client session with that JWT, so the gateway's own checks (signature,
expiry, revocation, channel permission) run again at bind time and keep running while it is bound.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass

import orjson
from tsunagu_core.broker import Broker, PublishOptions

from tsunagu_ws_gateway.protocols.fhir.model import VERSIONS, FhirError

CHANNEL_PREFIX = "__tsunagu:fhir-binding:"


@dataclass(frozen=True, slots=True)
class BindingRecord:
    subscriptions: tuple[str, ...]
    user: str
    jwt: str
    version: str
    expires_at: float
    # A binding issued to a client certificate (no JWT): the SHA-256 of the certificate, which the
    # socket that binds must present too.
    certificate: str = ""

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> BindingRecord:
        try:
            raw = orjson.loads(data)
            subscriptions = raw["subscriptions"]
            if not isinstance(subscriptions, list) or not subscriptions:
                raise TypeError("no subscriptions")
            record = cls(
                subscriptions=tuple(str(subscription) for subscription in subscriptions),
                user=str(raw["user"]),
                jwt=str(raw["jwt"]),
                version=str(raw["version"]),
                expires_at=float(raw["expires_at"]),
                certificate=str(raw.get("certificate") or ""),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise FhirError(401, "security", "the binding token is not valid") from None
        if record.version not in VERSIONS:
            raise FhirError(401, "security", "the binding token is not valid")
        return record


def new_token() -> str:
    return secrets.token_urlsafe(32)


def record_channel(token: str) -> str:
    return CHANNEL_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def expiry(now: float, ttl: float, jwt_expires_at: float | None) -> float:
    """A binding token lives `ttl` seconds, and never longer than the connection token it came from."""
    end = now + ttl
    return min(end, jwt_expires_at) if jwt_expires_at is not None else end


class BindingTokens:
    def __init__(self, broker: Broker, ttl: float) -> None:
        self.broker = broker
        self.ttl = ttl

    async def issue(self, record: BindingRecord) -> str:
        token = new_token()
        ttl = max(1.0, record.expires_at - time.time())
        options = PublishOptions(history_size=1, history_ttl=ttl, meta_ttl=ttl)
        await self.broker.publish(record_channel(token), record.encode(), options)
        return token

    async def resolve(self, token: str) -> BindingRecord:
        """The record of a live token; FhirError(401) when unknown or expired."""
        history = await self.broker.history(record_channel(token), limit=1, reverse=True, meta_ttl=self.ttl)
        if not history.publications:
            raise FhirError(401, "security", "unknown or expired binding token")
        record = BindingRecord.decode(history.publications[0].data)
        if record.expires_at <= time.time():
            raise FhirError(401, "expired", "the binding token has expired: get a new one")
        return record

    async def revoke(self, token: str) -> None:
        await self.broker.remove_history(record_channel(token))
