"""Connection and subscription JWTs: verified with an HS256 secret, a PEM public key, or the keys
auth publishes at its JWKS URL (fetched on first use, refetched every `token_jwks_refresh_interval`
seconds so a key removed from it stops working, and whenever a token names a `kid` we do not know yet,
so a key auth has just rotated in works on the first token it signs).

The two kinds never stand in for each other: a subscription token has a `channel` claim (as Centrifugo
tells them apart) and, when it has a `typ` claim, `typ: "subscription"`; a connection token has no
`channel` claim and no `typ`, or `typ: "access"`. `exp` is required (unless `token_allow_no_exp`), `iss`
checked when `token_issuer` is set, `aud` when `token_audience` is."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import orjson
from tsunagu_core.tls import client_context

from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.protocol.codes import (
    INVALID_TOKEN,
    PERMISSION_DENIED,
    TOKEN_EXPIRED,
    Disconnect,
    ProtocolError,
    ReplyError,
)

LEEWAY_SECONDS = 5
# An unknown kid refetches the JWKS at most this often, so garbage tokens cannot hammer auth.
JWKS_MIN_REFETCH_SECONDS = 5.0
CONNECTION_TYPES = ("access",)
SUBSCRIPTION_TYPE = "subscription"

log = logging.getLogger("tsunagu.gateway.tokens")

# A gateway with no key refuses every token; the close reason says why, so a newcomer sees more than 3500.
NO_TOKEN_KEY = Disconnect(INVALID_TOKEN.code, "invalid token: the gateway has no key to verify tokens")
NO_TOKEN_KEY_HINT = (
    "no key verifies tokens: set TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET, TSUNAGU_GATEWAY_TOKEN_PUBLIC_KEY or"
    " TSUNAGU_GATEWAY_TOKEN_JWKS_URL; until then every connection with a token is refused (3500)"
)


@dataclass(frozen=True, slots=True)
class ConnectionGrant:
    user: str
    session_id: str = ""
    token_id: str = ""
    expires_at: float | None = None
    issued_at: float | None = None
    channel_patterns: Sequence[str] = ()
    server_subs: Sequence[str] = ()
    info: bytes = b""
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubscriptionGrant:
    expires_at: float | None
    info: bytes = b""


class JwksKeys:
    """The public keys at auth's JWKS URL, by kid."""

    def __init__(self, url: str, timeout: float = 5.0, refresh_interval: float = 300.0) -> None:
        self.url = url
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.keys: dict[str, tuple[Any, list[str]]] = {}
        self.fetched_at = 0.0
        self._lock = asyncio.Lock()
        # an https JWKS URL is checked against the platform CA (TSUNAGU_TLS_CA_FILE), with our certificate
        self._tls = client_context()

    async def refresh(self) -> None:
        async with self._lock:
            self.fetched_at = time.monotonic()
            try:
                async with httpx.AsyncClient(timeout=self.timeout, verify=self._tls) as http:
                    response = await http.get(self.url)
                response.raise_for_status()
                published = response.json()
                if isinstance(published, dict) and published.get("keys") == []:
                    self.keys = {}  # every key retired (pyjwt calls an empty set unusable)
                    return
                keyset = jwt.PyJWKSet.from_dict(published)
            except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
                log.warning("JWKS at %s not usable: %s", self.url, exc)
                return
            self.keys = {
                key.key_id: (key.key, [key.algorithm_name])
                for key in keyset.keys
                if key.key_id and key.public_key_use in (None, "sig")
            }

    async def key_for(self, kid: str) -> tuple[Any, list[str]] | None:
        age = time.monotonic() - self.fetched_at
        # A JWKS that fails to load keeps the keys it had (auth down is no reason to refuse everyone);
        # one that loads without a key drops it.
        if age >= self.refresh_interval or (kid not in self.keys and age >= JWKS_MIN_REFETCH_SECONDS):
            await self.refresh()
        return self.keys.get(kid)


class TokenVerifier:
    def __init__(self, settings: GatewaySettings) -> None:
        self.audience = settings.token_audience or None
        self.issuer = settings.token_issuer or None
        self.required = ["sub"] if settings.token_allow_no_exp else ["sub", "exp"]
        self.keys: list[tuple[Any, list[str]]] = []
        if settings.token_public_key:
            self.keys.append((settings.token_public_key, ["RS256", "EdDSA"]))
        if settings.token_hmac_secret:
            self.keys.append((settings.token_hmac_secret, ["HS256"]))
        self.jwks = (
            JwksKeys(settings.token_jwks_url, refresh_interval=settings.token_jwks_refresh_interval)
            if settings.token_jwks_url
            else None
        )

    @property
    def configured(self) -> bool:
        return bool(self.keys) or self.jwks is not None

    async def _candidate_keys(self, token: str) -> list[tuple[Any, list[str]]]:
        if self.jwks is None:
            return self.keys
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise ProtocolError(INVALID_TOKEN, f"invalid token: {exc}") from None
        found = await self.jwks.key_for(kid) if isinstance(kid, str) else None
        return [found, *self.keys] if found is not None else self.keys

    async def _decode(self, token: str) -> dict[str, Any]:
        if not self.configured:
            raise ProtocolError(NO_TOKEN_KEY, NO_TOKEN_KEY_HINT)
        keys = await self._candidate_keys(token)
        if not keys:
            raise ProtocolError(INVALID_TOKEN, "no key verifies this token (its kid is not in the JWKS)")
        last_error: Exception | None = None
        for key, algorithms in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=LEEWAY_SECONDS,
                    options={
                        "require": self.required + (["iss"] if self.issuer else []),
                        "verify_aud": self.audience is not None,
                        "verify_iss": self.issuer is not None,
                    },
                )
                return claims
            except jwt.ExpiredSignatureError:
                raise ReplyError(TOKEN_EXPIRED) from None
            except jwt.InvalidTokenError as exc:
                last_error = exc
        raise ProtocolError(INVALID_TOKEN, f"invalid token: {last_error}")

    async def verify_connection(self, token: str) -> ConnectionGrant:
        claims = await self._decode(token)
        if "channel" in claims or claims.get("typ", CONNECTION_TYPES[0]) not in CONNECTION_TYPES:
            raise ProtocolError(INVALID_TOKEN, "invalid token: not a connection token")
        subs = claims.get("subs") or []
        patterns = claims.get("channels") or []
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ProtocolError(INVALID_TOKEN, "the channels claim must be a list of strings")
        return ConnectionGrant(
            user=str(claims["sub"]),
            session_id=str(claims.get("sid", "")),
            token_id=str(claims.get("jti", "")),
            expires_at=float(claims["exp"]) if "exp" in claims else None,
            issued_at=float(claims["iat"]) if "iat" in claims else None,
            channel_patterns=tuple(patterns),
            server_subs=tuple(subs) if isinstance(subs, list | dict) else (),
            info=orjson.dumps(claims["info"]) if "info" in claims else b"",
            claims=claims,
        )

    async def verify_subscription(self, token: str, user: str, channel: str) -> SubscriptionGrant:
        claims = await self._decode(token)
        if "channel" not in claims or claims.get("typ", SUBSCRIPTION_TYPE) != SUBSCRIPTION_TYPE:
            raise ReplyError(PERMISSION_DENIED, "not a subscription token")
        if str(claims["sub"]) != user or claims.get("channel") != channel:
            raise ReplyError(PERMISSION_DENIED, "the subscription token is for another user or channel")
        return SubscriptionGrant(
            expires_at=float(claims["exp"]) if "exp" in claims else None,
            info=orjson.dumps(claims["info"]) if "info" in claims else b"",
        )
