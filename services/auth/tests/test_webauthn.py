"""Passkeys end to end against auth's WebAuthn ceremonies, verified by the `webauthn` library: a software
authenticator (a P-256 key, "none" attestation, as a platform authenticator answers
navigator.credentials.create/get) registers, then logs in at acr 3; an assertion from another origin, one
that reuses the sign counter and one for an old challenge are refused and audited."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tsunagu_core.wire.events_pb2 import AuditEvent
from webauthn.helpers import encode_cbor

ORIGIN = "http://localhost:8080"  # auth's default TSUNAGU_AUTH_WEBAUTHN_ORIGINS
FLAG_UP, FLAG_UV, FLAG_AT = 0x01, 0x04, 0x40


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class SoftwareAuthenticator:
    """One passkey, answering the options auth sends as a browser's authenticator would."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    counter: int = 0

    def _client_data(self, kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}).encode()

    def create(self, options: dict[str, Any], origin: str = ORIGIN) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        cose = {1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")}
        attested = bytes(16) + struct.pack(">H", len(self.credential_id)) + self.credential_id + encode_cbor(cose)
        rp_hash = hashlib.sha256(options["rp"]["id"].encode()).digest()
        auth_data = rp_hash + bytes([FLAG_UP | FLAG_UV | FLAG_AT]) + struct.pack(">I", self.counter) + attested
        attestation = encode_cbor({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(self._client_data("webauthn.create", options["challenge"], origin)),
                "attestationObject": b64url(attestation),
                "transports": ["internal"],
            },
        }

    def get(self, options: dict[str, Any], origin: str = ORIGIN, counter: int | None = None) -> dict[str, Any]:
        if counter is None:
            self.counter += 1
        count = self.counter if counter is None else counter
        rp_hash = hashlib.sha256(options["rpId"].encode()).digest()
        auth_data = rp_hash + bytes([FLAG_UP | FLAG_UV]) + struct.pack(">I", count)
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
            },
        }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(auth: Any, user: str) -> SoftwareAuthenticator:
    access = auth.login(user).json()["access_token"]
    begun = auth.client.post("/v1/mfa/webauthn/register-options", headers=bearer(access))
    assert begun.status_code == 200, begun.text
    authenticator = SoftwareAuthenticator()
    body = {"ceremony": begun.json()["ceremony"], "credential": authenticator.create(begun.json()["options"])}
    registered = auth.client.post("/v1/mfa/webauthn/register", json=body | {"name": "laptop"}, headers=bearer(access))
    assert registered.status_code == 201, registered.text
    assert registered.json() == {"id": b64url(authenticator.credential_id), "name": "laptop"}
    return authenticator


def passkey_login(auth: Any, user: str) -> tuple[dict[str, Any], str]:
    """The password step and the passkey challenge: the options for navigator.credentials.get and the
    mfa_token to send the assertion with."""
    password = auth.login(user)
    assert password.status_code == 403 and password.json()["factors"] == ["webauthn"], password.text
    options = auth.client.post("/v1/mfa/webauthn/login-options", json={"mfa_token": password.json()["mfa_token"]})
    assert options.status_code == 200, options.text
    return options.json()["options"], options.json()["mfa_token"]


def grant(auth: Any, mfa_token: str, credential: dict[str, Any]) -> Any:
    return auth.client.post(
        "/v1/token", json={"grant_type": "mfa_webauthn", "mfa_token": mfa_token, "credential": credential}
    )


def test_a_passkey_registers_and_logs_in_at_level_3(auth: Any) -> None:
    user = auth.user()
    authenticator = register(auth, user)
    options, mfa_token = passkey_login(auth, user)
    assert options["allowCredentials"][0]["id"] == b64url(authenticator.credential_id)
    tokens = grant(auth, mfa_token, authenticator.get(options))
    assert tokens.status_code == 200, tokens.text
    claims = jwt.decode(tokens.json()["access_token"], options={"verify_signature": False})
    assert claims["acr"] == "3" and claims["amr"] == ["pwd", "hwk", "user"]
    status = auth.client.get("/v1/mfa", headers=bearer(tokens.json()["access_token"])).json()
    assert [p["name"] for p in status["passkeys"]] == ["laptop"] and status["passkeys"][0]["last_used_at"]


def test_another_origin_a_reused_counter_or_an_old_challenge_is_refused(auth: Any) -> None:
    user = auth.user()
    authenticator = register(auth, user)
    options, mfa_token = passkey_login(auth, user)
    phished = grant(auth, mfa_token, authenticator.get(options, origin="https://login.example-phish.net"))
    assert phished.status_code == 401 and phished.json()["reason"] == "origin", phished.text

    first = authenticator.get(options)
    assert grant(auth, mfa_token, first).status_code == 200
    options, mfa_token = passkey_login(auth, user)
    cloned = grant(auth, mfa_token, authenticator.get(options, counter=authenticator.counter))
    assert cloned.status_code == 401 and cloned.json()["reason"] == "counter", cloned.text

    replayed = grant(auth, mfa_token, first)  # the earlier login's assertion, for its challenge
    assert replayed.status_code == 401 and replayed.json()["reason"] == "challenge", replayed.text
    outcomes = [
        AuditEvent.FromString(e.payload).outcome for e in auth.events("tsunagu.audit") if e.type == "auth.mfa.webauthn"
    ]
    assert outcomes == ["origin", "ok", "counter", "challenge"], outcomes
