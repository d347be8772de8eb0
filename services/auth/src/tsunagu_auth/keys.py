"""Signing keys of access tokens and their rotation.

A key goes through three states, all kept in the store so every auth replica agrees:
  next     published in the JWKS but not signing yet, so gateways may learn it before its first token;
  active   signs new tokens (the newest activated key that is not retired);
  retired  signs nothing, stays in the JWKS until every token it signed has expired, then drops out.
A rotation (timer or `POST /v1/keys/rotate`) activates the next key, retires the active one and
creates a new next key, in one store transaction.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    private_pem: bytes  # PKCS8, encrypted with the key-encryption secret when one is set
    public_jwk: dict[str, Any]
    created_at: float
    activated_at: float | None = None
    retired_at: float | None = None
    # Out of the JWKS after this (retired_at + the longest life of a token it signed).
    expires_at: float | None = None

    def state(self, now: float) -> str:
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.retired_at is not None:
            return "retired"
        if self.activated_at is None:
            return "next"
        return "active"

    def private_key(self, passphrase: str) -> PrivateKey:
        key = serialization.load_pem_private_key(self.private_pem, password=passphrase.encode() or None)
        if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"key {self.kid} is not an Ed25519 or RSA key")
        return key


def generate_key(algorithm: str, passphrase: str, now: float | None = None) -> SigningKey:
    private: PrivateKey
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        jwk: dict[str, Any] = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    elif algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    else:
        raise ValueError(f"unsupported algorithm {algorithm!r}")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    kid = f"{time.strftime('%Y%m%d', time.gmtime(now))}-{secrets.token_hex(6)}"
    jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
    return SigningKey(kid, algorithm, pem, jwk, now if now is not None else time.time())


def rotation(
    keys: list[SigningKey], algorithm: str, passphrase: str, token_life: float, now: float
) -> list[SigningKey]:
    """The keys that change in one rotation: retire active, activate next, create the following next.

    With no next key yet (the very first start) a new key is activated at once.
    """
    changed: list[SigningKey] = []
    live = [k for k in keys if k.state(now) != "expired"]
    for key in live:
        if key.state(now) == "active":
            changed.append(replace(key, retired_at=now, expires_at=now + token_life))
    upcoming = sorted((k for k in live if k.state(now) == "next"), key=lambda k: k.created_at)
    if upcoming and upcoming[0].algorithm == algorithm:
        changed.append(replace(upcoming[0], activated_at=now))
        stale_next = upcoming[1:]
    else:
        changed.append(replace(generate_key(algorithm, passphrase, now), activated_at=now))
        stale_next = upcoming
    # A next key of another algorithm (the setting changed) is dropped at once: it never signed.
    changed += [replace(k, retired_at=now, expires_at=now) for k in stale_next]
    changed.append(generate_key(algorithm, passphrase, now))
    return changed


def active_key(keys: list[SigningKey], now: float) -> SigningKey | None:
    active = [k for k in keys if k.state(now) == "active"]
    return max(active, key=lambda k: k.activated_at or 0.0) if active else None


def jwks(keys: list[SigningKey], now: float) -> dict[str, Any]:
    """Next, active and retired-but-not-expired keys: all a gateway may need."""
    published = [k for k in keys if k.state(now) in ("next", "active", "retired")]
    published.sort(key=lambda k: k.created_at, reverse=True)
    return {"keys": [k.public_jwk for k in published]}
