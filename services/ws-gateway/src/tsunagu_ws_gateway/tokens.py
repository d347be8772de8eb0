"""Connection and subscription JWTs: verified with an HS256 secret or auth's public key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson

from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.protocol.codes import INVALID_TOKEN, PERMISSION_DENIED, TOKEN_EXPIRED, ProtocolError, ReplyError

LEEWAY_SECONDS = 5


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


class TokenVerifier:
    def __init__(self, settings: GatewaySettings) -> None:
        self.audience = settings.token_audience or None
        self.keys: list[tuple[Any, list[str]]] = []
        if settings.token_public_key:
            self.keys.append((settings.token_public_key, ["RS256", "EdDSA"]))
        if settings.token_hmac_secret:
            self.keys.append((settings.token_hmac_secret, ["HS256"]))

    @property
    def configured(self) -> bool:
        return bool(self.keys)

    def _decode(self, token: str) -> dict[str, Any]:
        if not self.keys:
            raise ProtocolError(INVALID_TOKEN, "this gateway has no token key configured")
        last_error: Exception | None = None
        for key, algorithms in self.keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self.audience,
                    leeway=LEEWAY_SECONDS,
                    options={"require": ["sub"], "verify_aud": self.audience is not None},
                )
                return claims
            except jwt.ExpiredSignatureError:
                raise ReplyError(TOKEN_EXPIRED) from None
            except jwt.InvalidTokenError as exc:
                last_error = exc
        raise ProtocolError(INVALID_TOKEN, f"invalid token: {last_error}")

    def verify_connection(self, token: str) -> ConnectionGrant:
        claims = self._decode(token)
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

    def verify_subscription(self, token: str, user: str, channel: str) -> SubscriptionGrant:
        claims = self._decode(token)
        if str(claims["sub"]) != user or claims.get("channel") != channel:
            raise ReplyError(PERMISSION_DENIED, "the subscription token is for another user or channel")
        return SubscriptionGrant(
            expires_at=float(claims["exp"]) if "exp" in claims else None,
            info=orjson.dumps(claims["info"]) if "info" in claims else b"",
        )
