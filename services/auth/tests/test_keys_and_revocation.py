"""JWKS rotation, RS256, subscription tokens, users' message keys and admin revocation."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tsunagu_auth.keys import SigningKey, generate_key
from tsunagu_core.revocation_store import TokenIdentity
from tsunagu_core.wire.events_pb2 import AuditEvent, Revocation


def kids(auth: Any) -> list[str]:
    return [k["kid"] for k in auth.client.get("/.well-known/jwks.json").json()["keys"]]


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def verify_with_jwks(auth: Any, token: str) -> dict[str, Any]:
    keyset = jwt.PyJWKSet.from_dict(auth.client.get("/.well-known/jwks.json").json())
    key = next(k for k in keyset.keys if k.key_id == kid_of(token))
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience="tsunagu")
    return claims


def test_rotation_publishes_the_next_key_first_and_keeps_the_old_one(auth: Any) -> None:
    name = auth.user()
    old_token = auth.login(name).json()["access_token"]
    old_kid = kid_of(old_token)
    published = kids(auth)
    assert len(published) == 2 and old_kid in published, "the active key and the next one"
    next_kid = next(k for k in published if k != old_kid)

    rotated = auth.client.post("/v1/keys/rotate", headers=auth.admin())
    assert rotated.status_code == 200, rotated.text
    new_token = auth.login(name).json()["access_token"]
    assert kid_of(new_token) == next_kid, "the key published as next is the one that signs now"
    after = kids(auth)
    assert old_kid in after and next_kid in after and len(after) == 3, "old stays, a new next appears"
    assert verify_with_jwks(auth, old_token)["sub"] == name
    assert verify_with_jwks(auth, new_token)["sub"] == name
    audits = [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit")]
    assert any(a.action == "auth.keys.rotated" and a.subject == next_kid for a in audits)


def test_a_retired_key_leaves_the_jwks_when_its_tokens_have_expired(make_auth: Any) -> None:
    auth = make_auth(access_token_ttl=5)
    name = auth.user()
    old_kid = kid_of(auth.login(name).json()["access_token"])
    assert auth.client.post("/v1/keys/rotate", headers=auth.admin()).status_code == 200
    keys = {k.kid: k for k in auth.client.portal.call(auth.auth.store.signing_keys)}
    retired: SigningKey = keys[old_kid]
    assert retired.retired_at is not None and retired.expires_at is not None
    # It stays as long as a token it signed can be used: access ttl plus the gateways' grace.
    assert retired.expires_at - retired.retired_at == pytest.approx(5 + 60)
    assert old_kid in kids(auth)
    later = retired.expires_at + 1
    from tsunagu_auth import keys as keyring

    assert old_kid not in [k["kid"] for k in keyring.jwks(list(keys.values()), later)["keys"]]
    auth.client.portal.call(auth.auth.store.purge, later)
    assert old_kid not in [k.kid for k in auth.client.portal.call(auth.auth.store.signing_keys)]


def test_the_timer_rotates_after_the_key_lifetime(make_auth: Any) -> None:
    auth = make_auth(key_lifetime=10)
    first = kid_of(auth.login(auth.user()).json()["access_token"])
    assert not auth.client.portal.call(auth.auth.rotate_keys), "not due yet"
    # A key activated long ago is due: move its activation back instead of waiting.
    import dataclasses

    def age(keys: list[SigningKey]) -> list[SigningKey]:
        return [dataclasses.replace(k, activated_at=time.time() - 11) for k in keys if k.kid == first]

    auth.client.portal.call(auth.auth.store.rotate_keys, age)
    assert auth.client.portal.call(auth.auth.rotate_keys)
    assert kid_of(auth.login(auth.user()).json()["access_token"]) != first


def test_rs256_option(make_auth: Any) -> None:
    auth = make_auth(algorithm="RS256")
    token = auth.login(auth.user()).json()["access_token"]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert all(
        k["kty"] == "RSA" and k["alg"] == "RS256" for k in auth.client.get("/.well-known/jwks.json").json()["keys"]
    )
    assert verify_with_jwks(auth, token)["sub"]


def test_private_keys_are_stored_encrypted_with_the_secret(make_auth: Any) -> None:
    auth = make_auth(key_encryption_secret="key-passphrase")
    auth.login(auth.user())
    stored = auth.client.portal.call(auth.auth.store.signing_keys)
    assert stored and all(b"ENCRYPTED PRIVATE KEY" in k.private_pem for k in stored)
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(stored[0].private_pem, password=None)
    plain = generate_key("EdDSA", "")
    assert b"BEGIN PRIVATE KEY" in plain.private_pem


def test_subscription_token_for_an_allowed_channel(auth: Any) -> None:
    name = auth.user(["secret:*"])
    access = auth.login(name).json()["access_token"]
    bearer = {"Authorization": f"Bearer {access}"}
    response = auth.client.post("/v1/subscription-token", json={"channel": "secret:room1"}, headers=bearer)
    assert response.status_code == 200, response.text
    claims = verify_with_jwks(auth, response.json()["token"])
    assert claims["sub"] == name and claims["channel"] == "secret:room1"
    denied = auth.client.post("/v1/subscription-token", json={"channel": "other:room"}, headers=bearer)
    assert denied.status_code == 403


def test_message_keys_ride_in_the_users_tokens(auth: Any) -> None:
    name = auth.user()
    other = auth.user()
    raw = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    key = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    own = {"Authorization": f"Bearer {auth.login(name).json()['access_token']}"}
    response = auth.client.post(f"/v1/users/{name}/signing-keys", json={"kid": "laptop", "key": key}, headers=own)
    assert response.status_code == 201, response.text
    by_admin = auth.client.post(f"/v1/users/{name}/signing-keys", json={"key": key}, headers=auth.admin())
    assert by_admin.status_code == 201 and by_admin.json()["kid"].startswith("k-")
    claims = verify_with_jwks(auth, auth.login(name).json()["access_token"])
    assert claims["sig_keys"] == [{"kid": "laptop", "key": key}, {"kid": by_admin.json()["kid"], "key": key}]
    assert "sig_keys" not in verify_with_jwks(auth, auth.login(other).json()["access_token"])
    post = auth.client.post
    assert post(f"/v1/users/{other}/signing-keys", json={"key": key}, headers=own).status_code == 403
    assert post(f"/v1/users/{name}/signing-keys", json={"kid": "laptop", "key": key}, headers=own).status_code == 409
    assert post(f"/v1/users/{name}/signing-keys", json={"key": "abc"}, headers=own).status_code == 400
    assert post("/v1/users/nobody-here/signing-keys", json={"key": key}, headers=auth.admin()).status_code == 404
    audits = [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit")]
    assert any(a.action == "auth.signing_key.registered" and a.subject == name and a.actor == name for a in audits)


def test_revoke_by_session_user_and_token(auth: Any) -> None:
    name = auth.user()
    body = auth.login(name).json()
    claims = verify_with_jwks(auth, body["access_token"])
    revoke = auth.client.post(
        "/v1/revoke", json={"session": claims["sid"], "reason": "lost phone"}, headers=auth.admin()
    )
    assert revoke.status_code == 200, revoke.text
    store = auth.auth.revocations
    assert auth.client.portal.call(store.revoked, TokenIdentity(name, claims["sid"], claims["jti"], claims["iat"]))
    assert auth.client.post("/v1/refresh", json={"refresh_token": body["refresh_token"]}).status_code == 401

    second = auth.login(name).json()
    user_claims = verify_with_jwks(auth, second["access_token"])
    revoke_user = auth.client.post("/v1/revoke", json={"user": name}, headers=auth.admin())
    assert revoke_user.status_code == 200 and revoke_user.json()["sessions"] == 1
    assert auth.client.portal.call(store.revoked, TokenIdentity(name, user_claims["sid"], "", user_claims["iat"]))
    assert auth.client.post("/v1/refresh", json={"refresh_token": second["refresh_token"]}).status_code == 401
    fresh = verify_with_jwks(auth, auth.login(name).json()["access_token"])
    assert not auth.client.portal.call(store.revoked, TokenIdentity(name, fresh["sid"], fresh["jti"], fresh["iat"]))

    by_jti = auth.client.post("/v1/revoke", json={"token": fresh["jti"], "user": name}, headers=auth.admin())
    assert by_jti.status_code == 200
    assert auth.client.portal.call(store.revoked, TokenIdentity(name, fresh["sid"], fresh["jti"], fresh["iat"]))

    events = [(e, Revocation.FromString(e.payload)) for e in auth.events("tsunagu.auth.revocations")]
    scopes = {r.scope for _, r in events if r.value in (claims["sid"], name, fresh["jti"])}
    assert scopes == {Revocation.SESSION, Revocation.USER, Revocation.TOKEN}
    keys = {m.key for m in auth.seen if m.topic == "tsunagu.auth.revocations"}
    assert keys == {name.encode()}, "keyed by user id"
    user_revocation = next(r for _, r in events if r.scope == Revocation.USER)
    assert user_revocation.issued_before_unix_ms > 0 and user_revocation.expires_unix_ms > time.time() * 1000
    assert user_revocation.actor == "admin"
