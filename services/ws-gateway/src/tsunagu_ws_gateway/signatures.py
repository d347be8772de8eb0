"""Signed publications (finance, medical): the client signs what it publishes, the gateway checks it.

In a namespace with `signed: true`, publish data must be

    {"payload": "<text>", "signature": {"kid": "...", "ts": <unix ms>, "nonce": "...", "sig": "<base64url>"}}

where `sig` is the Ed25519 signature of

    b"tsunagu-signed-v1\\n" + channel + "\\n" + user + "\\n" + ts + "\\n" + nonce + "\\n" + payload

(UTF-8) with the private key whose public half auth registered for the user: auth puts the user's keys in
the access token's `sig_keys` claim ([{kid, key}], key = base64url of the 32 raw bytes), so the gateway
checks signatures without asking anyone. The payload is signed as the exact text the client sent (no JSON
canonicalisation to disagree about); channel and user are signed too, so a signature cannot be moved to
another channel or replayed by another user. `ts` must be within the window of the gateway's clock and the
nonce is claimed once across every replica (Redis), so a captured message cannot be published again.
Subscribers receive the data as published and can check the signature themselves.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tsunagu_core.nonces import NonceRegistry, NonceRegistryError

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ReplyError

CONTEXT = "tsunagu-signed-v1"
MAX_NONCE_LENGTH = 128


@dataclass(frozen=True, slots=True)
class SignedPublication:
    payload: str
    kid: str
    ts: int
    nonce: str
    sig: str


def signing_input(channel: str, user: str, ts: int, nonce: str, payload: str) -> bytes:
    return "\n".join((CONTEXT, channel, user, str(ts), nonce, payload)).encode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse(data: bytes) -> SignedPublication:
    """The signed form of publish data, or a 440 (not signed) / 441 (malformed) error."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ReplyError(codes.SIGNATURE_REQUIRED, "this namespace takes signed publications only") from None
    if not isinstance(body, dict) or "signature" not in body:
        raise ReplyError(codes.SIGNATURE_REQUIRED, "this namespace takes signed publications only")
    signature = body["signature"]
    payload = body.get("payload")
    if not isinstance(payload, str):
        raise ReplyError(codes.BAD_SIGNATURE, "payload must be the signed text (a string)")
    if not isinstance(signature, dict):
        raise ReplyError(codes.BAD_SIGNATURE, "signature must be an object with kid, ts, nonce and sig")
    kid, ts, nonce, sig = (signature.get(k) for k in ("kid", "ts", "nonce", "sig"))
    if not isinstance(kid, str) or not isinstance(sig, str):
        raise ReplyError(codes.BAD_SIGNATURE, "signature.kid and signature.sig must be strings")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ReplyError(codes.BAD_SIGNATURE, "signature.ts must be an integer (unix milliseconds)")
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= MAX_NONCE_LENGTH:
        raise ReplyError(codes.BAD_SIGNATURE, f"signature.nonce must be a string of 8 to {MAX_NONCE_LENGTH} characters")
    return SignedPublication(payload=payload, kid=kid, ts=ts, nonce=nonce, sig=sig)


def user_keys(claims: dict[str, Any]) -> dict[str, str]:
    keys = claims.get("sig_keys")
    if not isinstance(keys, list):
        return {}
    return {
        entry["kid"]: entry["key"]
        for entry in keys
        if isinstance(entry, dict) and isinstance(entry.get("kid"), str) and isinstance(entry.get("key"), str)
    }


class SignatureVerifier:
    def __init__(self, nonces: NonceRegistry, window: float) -> None:
        self.nonces = nonces
        self.window = window

    async def verify(self, channel: str, user: str, claims: dict[str, Any], data: bytes) -> SignedPublication:
        signed = parse(data)
        key_text = user_keys(claims).get(signed.kid)
        if key_text is None:
            raise ReplyError(codes.BAD_SIGNATURE, f"no signing key {signed.kid!r} is registered for this user")
        try:
            key = Ed25519PublicKey.from_public_bytes(_b64url_decode(key_text))
            key.verify(
                _b64url_decode(signed.sig), signing_input(channel, user, signed.ts, signed.nonce, signed.payload)
            )
        except (InvalidSignature, ValueError, binascii.Error):
            raise ReplyError(codes.BAD_SIGNATURE, "the signature does not match the payload and key") from None
        skew = abs(time.time() * 1000 - signed.ts) / 1000
        if skew > self.window:
            message = f"signature.ts is {skew:.0f}s from the server's clock (window {self.window:.0f}s)"
            raise ReplyError(codes.SIGNATURE_EXPIRED, message)
        try:
            # Held twice the window: any replay the clock check lets through still finds the nonce.
            first = await self.nonces.claim(f"{user}/{signed.kid}/{signed.nonce}", 2 * self.window)
        except NonceRegistryError:
            raise ReplyError(codes.INTERNAL, "cannot check the nonce now; retry") from None
        if not first:
            raise ReplyError(codes.SIGNATURE_REPLAYED, "this signed message was already published")
        return signed
