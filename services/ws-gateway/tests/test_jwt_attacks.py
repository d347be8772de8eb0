"""The JWT attack corpus: tokens an attacker can forge or replay, each refused with its documented code.

The gateway trusts auth's Ed25519 keys through a real JWKS endpoint and requires `aud`, as deployed.
Refusals of forged tokens are close 3500 "invalid token" (the SDKs do not reconnect with it); an expired
but genuine token is reply error 109, on which the SDKs fetch a fresh token; a revoked session's token is
close 3500 "token revoked".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
import uvicorn
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tsunagu_core import topics
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import Revocation

AUDIENCE = "tsunagu"
KID = "auth-key-1"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Auth:
    """Auth as the gateway sees it: one Ed25519 key, published at a JWKS URL."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.jwk = {
            **json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.key.public_key())),
            "kid": KID,
            "use": "sig",
            "alg": "EdDSA",
        }

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base = {"sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + 600, "sid": "s-alice", "jti": "t-1"}
        base["channels"] = ["chat:*"]
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def sign(self, **overrides: Any) -> str:
        return jwt.encode(self.claims(**overrides), self.key, algorithm="EdDSA", headers={"kid": KID})

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse({"keys": [self.jwk]})


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signature)}"


@contextlib.asynccontextmanager
async def serve_jwks(auth: Auth) -> AsyncIterator[str]:
    port = free_port()
    app = Starlette(routes=[Route("/.well-known/jwks.json", auth.jwks)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/.well-known/jwks.json"
    finally:
        server.should_exit = True
        await task


async def outcome(url: str, token: str) -> tuple[str, Any]:
    """("connected", None), ("error", code) for an error reply, or ("closed", (code, reason))."""
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        try:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            return "closed", (closed.rcvd.code, closed.rcvd.reason)
        if "connect" in reply:
            return "connected", None
        return "error", reply["error"]["code"]


def alg_none(auth: Auth) -> str:
    return unsigned({"alg": "none", "typ": "JWT", "kid": KID}, auth.claims(sub="admin"))


def alg_none_capitalised(auth: Auth) -> str:
    return unsigned({"alg": "None", "typ": "JWT", "kid": KID}, auth.claims(sub="admin"))


def hmac_signed(key: bytes, auth: Auth) -> str:
    # Signed by hand: PyJWT itself refuses to use public keys as HMAC secrets, an attacker's tool does not.
    header = {"alg": "HS256", "typ": "JWT", "kid": KID}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(auth.claims(sub='admin')).encode())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def hs256_with_public_key(auth: Auth) -> str:
    # The classic key confusion: HMAC keyed with the public key the attacker downloaded from the JWKS.
    return hmac_signed(base64.urlsafe_b64decode(auth.jwk["x"] + "=="), auth)


def hs256_with_jwk_json(auth: Auth) -> str:
    return hmac_signed(json.dumps(auth.jwk).encode(), auth)


def not_yet_valid(auth: Auth) -> str:
    return auth.sign(nbf=int(time.time()) + 3600)


def issued_in_the_future(auth: Auth) -> str:
    return auth.sign(iat=int(time.time()) + 3600)


def wrong_audience(auth: Auth) -> str:
    return auth.sign(aud="another-app")


def no_audience(auth: Auth) -> str:
    return auth.sign(aud=None)


def unknown_kid(auth: Auth) -> str:
    stranger = Ed25519PrivateKey.generate()
    return jwt.encode(auth.claims(sub="admin"), stranger, algorithm="EdDSA", headers={"kid": "k-unknown"})


def known_kid_foreign_key(auth: Auth) -> str:
    stranger = Ed25519PrivateKey.generate()
    return jwt.encode(auth.claims(sub="admin"), stranger, algorithm="EdDSA", headers={"kid": KID})


def tampered_payload(auth: Auth) -> str:
    head, _, signature = auth.sign().split(".")
    forged_body = b64url(json.dumps(auth.claims(sub="admin", channels=["*"])).encode())
    return f"{head}.{forged_body}.{signature}"


def stripped_signature(auth: Auth) -> str:
    head, body, _ = auth.sign().split(".")
    return f"{head}.{body}."


def attacker_jwks_url(auth: Auth) -> str:
    # A `jku`/`jwk` header pointing at the attacker's own key must be ignored, not fetched or trusted.
    stranger = Ed25519PrivateKey.generate()
    own = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(stranger.public_key()))
    headers = {"kid": "evil", "jku": "http://127.0.0.1:9/jwks.json", "jwk": own}
    return jwt.encode(auth.claims(sub="admin"), stranger, algorithm="EdDSA", headers=headers)


def rs256_from_attacker(auth: Auth) -> str:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return jwt.encode(auth.claims(sub="admin"), pem, algorithm="RS256", headers={"kid": KID})


def missing_subject(auth: Auth) -> str:
    return auth.sign(sub=None)


def garbage(auth: Auth) -> str:
    return "not.a.jwt"


INVALID = ("closed", (3500, "invalid token"))

CORPUS: list[tuple[str, Callable[[Auth], str], tuple[str, Any]]] = [
    ("alg none", alg_none, INVALID),
    ("alg None", alg_none_capitalised, INVALID),
    ("HS256 keyed with the public key", hs256_with_public_key, INVALID),
    ("HS256 keyed with the JWK text", hs256_with_jwk_json, INVALID),
    ("RS256 from an attacker's key", rs256_from_attacker, INVALID),
    ("expired", lambda auth: auth.sign(exp=int(time.time()) - 60, iat=int(time.time()) - 660), ("error", 109)),
    ("not yet valid (nbf)", not_yet_valid, INVALID),
    ("issued in the future", issued_in_the_future, INVALID),
    ("wrong aud", wrong_audience, INVALID),
    ("no aud", no_audience, INVALID),
    ("unknown kid", unknown_kid, INVALID),
    ("known kid, foreign key", known_kid_foreign_key, INVALID),
    ("tampered payload", tampered_payload, INVALID),
    ("signature stripped", stripped_signature, INVALID),
    ("jku/jwk headers of the attacker", attacker_jwks_url, INVALID),
    ("no sub", missing_subject, INVALID),
    ("garbage", garbage, INVALID),
]


@pytest.fixture
async def deployed(start_gateway) -> AsyncIterator[tuple[Auth, Any]]:  # type: ignore[no-untyped-def]
    auth = Auth()
    async with (
        serve_jwks(auth) as jwks_url,
        start_gateway(token_hmac_secret="", token_jwks_url=jwks_url, token_audience=AUDIENCE) as gateway,
    ):
        yield auth, gateway


async def test_a_genuine_token_connects(deployed: tuple[Auth, Any]) -> None:
    auth, gateway = deployed
    assert await outcome(gateway.ws_url, auth.sign()) == ("connected", None)


@pytest.mark.parametrize(("forge", "expected"), [(f, e) for _, f, e in CORPUS], ids=[n for n, _, _ in CORPUS])
async def test_attack_is_refused_with_its_documented_code(
    deployed: tuple[Auth, Any], forge: Callable[[Auth], str], expected: tuple[str, Any]
) -> None:
    auth, gateway = deployed
    assert await outcome(gateway.ws_url, forge(auth)) == expected


async def test_revoked_session_cannot_be_replayed(deployed: tuple[Auth, Any]) -> None:
    auth, gateway = deployed
    token = auth.sign(sid="s-stolen", iat=int(time.time()) - 5)
    assert await outcome(gateway.ws_url, token) == ("connected", None)
    bus = gateway.server.config.app.state.runtime.bus
    revocation = Revocation(scope=Revocation.SESSION, value="s-stolen", reason="stolen", actor="admin")
    await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="alice", source="test")
    for _ in range(50):
        result = await outcome(gateway.ws_url, token)
        if result != ("connected", None):
            break
        await asyncio.sleep(0.05)
    assert result == ("closed", (3500, "token revoked"))
    # Another session of the same user is not affected.
    assert await outcome(gateway.ws_url, auth.sign(sid="s-other")) == ("connected", None)
