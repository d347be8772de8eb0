"""Password and client-credential grants, refresh rotation, lock-out, bad input (memory and Postgres)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import orjson
from tsunagu_core.wire.events_pb2 import AuditEvent, Revocation


def decode(auth: Any, token: str) -> dict[str, object]:
    keys = jwt.PyJWKSet.from_dict(auth.client.get("/.well-known/jwks.json").json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, object] = jwt.decode(token, key.key, algorithms=[key.algorithm_name], audience="tsunagu")
    return claims


def test_password_grant_issues_eddsa_access_and_refresh_tokens(auth: Any) -> None:
    name = auth.user(["chat:*", "news"])
    response = auth.login(name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "refresh_token", "expires_in", "token_type", "acr", "amr"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert body["acr"] == "1" and body["amr"] == ["pwd"], "a password alone is one factor"
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "EdDSA" and header["kid"]
    claims = decode(auth, body["access_token"])
    assert claims["sub"] == name and claims["channels"] == ["chat:*", "news"]
    assert claims["sid"] and claims["jti"] and claims["aud"] == "tsunagu"
    assert claims["acr"] == "1" and claims["amr"] == ["pwd"] and "roles" not in claims
    assert isinstance(claims["exp"], int) and 899 < claims["exp"] - claims["iat"] <= 900  # type: ignore[operator]
    audits = [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit") if e.type == "auth.login"]
    assert any(a.subject == name and a.outcome == "ok" and a.client_ip for a in audits)


def test_form_encoded_requests_work_like_json(auth: Any) -> None:
    name = auth.user()
    form = {"grant_type": "password", "username": name, "password": "correct horse"}
    assert auth.client.post("/v1/token", data=form).status_code == 200


def test_wrong_password_and_unknown_user_get_the_same_answer(auth: Any) -> None:
    name = auth.user()
    wrong = auth.login(name, "not the password")
    unknown = auth.login(name + "x", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert (
        wrong.json()
        == unknown.json()
        == {"error": "invalid_grant", "error_description": "invalid username or password"}
    )
    audits = [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit")]
    assert any(a.action == "auth.login" and a.outcome == "failed" and a.subject == name for a in audits)
    details = [orjson.loads(a.details) for a in audits if a.action == "auth.login"]
    assert all(d["grant"] == "password" for d in details)


def test_failed_logins_lock_the_username_with_429_and_retry_after(make_auth) -> None:  # type: ignore[no-untyped-def]
    auth = make_auth(login_max_failures=3, login_window=30)
    name = auth.user()
    for _ in range(3):
        assert auth.login(name, "bad password").status_code == 401
    locked = auth.login(name)  # even the right password, while locked
    assert locked.status_code == 429
    assert locked.json()["error"] == "too_many_requests"
    assert 1 <= int(locked.headers["Retry-After"]) <= 30
    other = auth.user()
    assert auth.login(other).status_code == 200, "other users are not locked"


def test_failed_logins_from_one_ip_are_limited(make_auth) -> None:  # type: ignore[no-untyped-def]
    auth = make_auth(login_max_failures_per_ip=4, login_window=30)
    for n in range(4):
        assert auth.login(f"nobody{n}-{time.time_ns()}", "bad password").status_code == 401
    limited = auth.login(auth.user())
    assert limited.status_code == 429 and "Retry-After" in limited.headers


def test_a_successful_login_clears_the_failures(make_auth) -> None:  # type: ignore[no-untyped-def]
    auth = make_auth(login_max_failures=3)
    name = auth.user()
    for _ in range(2):
        assert auth.login(name, "bad password").status_code == 401
    assert auth.login(name).status_code == 200
    for _ in range(2):
        assert auth.login(name, "bad password").status_code == 401
    assert auth.login(name).status_code == 200


def test_refresh_rotates_and_reuse_revokes_the_whole_session(auth: Any) -> None:
    name = auth.user()
    first = auth.login(name).json()
    sid = decode(auth, first["access_token"])["sid"]
    second = auth.client.post("/v1/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200, second.text
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert decode(auth, rotated["access_token"])["sid"] == sid
    # The spent token again: theft. The session dies, its newest refresh token too.
    reuse = auth.client.post("/v1/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401 and reuse.json()["error"] == "invalid_grant"
    after = auth.client.post("/v1/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert after.status_code == 401
    revocations = [Revocation.FromString(e.payload) for e in auth.events("tsunagu.auth.revocations")]
    assert any(r.scope == Revocation.SESSION and r.value == sid for r in revocations)
    audits = [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit")]
    assert any(a.action == "auth.refresh.reuse_detected" and a.subject == name for a in audits)
    # Access tokens of that session are refused by auth itself too.
    sub = auth.client.post(
        "/v1/subscription-token",
        json={"channel": "chat:x"},
        headers={"Authorization": f"Bearer {rotated['access_token']}"},
    )
    assert sub.status_code == 401
    assert auth.login(name).status_code == 200, "a new login makes a new session"


def test_unknown_refresh_token_is_refused(auth: Any) -> None:
    response = auth.client.post("/v1/refresh", json={"refresh_token": "nope"})
    assert response.status_code == 401 and response.json()["error"] == "invalid_grant"


def test_client_credentials_grant(make_auth) -> None:  # type: ignore[no-untyped-def]
    clients = {"billing": {"secret": "s3cret-value", "scopes": ["publish", "history"], "channels": ["orders:*"]}}
    auth = make_auth(clients=clients)
    form = {"grant_type": "client_credentials", "client_id": "billing", "client_secret": "s3cret-value"}
    response = auth.client.post("/v1/token", data={**form, "scope": "publish"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "refresh_token" not in body
    claims = decode(auth, body["access_token"])
    assert claims["sub"] == "client:billing" and claims["scope"] == "publish" and claims["channels"] == ["orders:*"]
    basic = auth.client.post("/v1/token", data={"grant_type": "client_credentials"}, auth=("billing", "s3cret-value"))
    assert basic.status_code == 200 and decode(auth, basic.json()["access_token"])["scope"] == "publish history"
    assert auth.client.post("/v1/token", data={**form, "scope": "admin"}).json()["error"] == "invalid_scope"
    bad = auth.client.post("/v1/token", data={**form, "client_secret": "wrong"})
    unknown = auth.client.post("/v1/token", data={**form, "client_id": "nobody"})
    assert bad.status_code == unknown.status_code == 401 and bad.json() == unknown.json()


def test_bad_input_is_a_clear_4xx(auth: Any) -> None:
    post = auth.client.post
    cases = [
        (post("/v1/token", content=b"{", headers={"content-type": "application/json"}), 400),
        (post("/v1/token", json=[1, 2]), 400),
        (post("/v1/token", json={"grant_type": "magic"}), 400),
        (post("/v1/token", json={"grant_type": "password", "username": "a"}), 400),
        (post("/v1/token", json={"grant_type": "password", "username": 5, "password": "x"}), 400),
        (post("/v1/refresh", json={}), 400),
        (post("/v1/revoke", json={"session": "x"}), 401),
        (post("/v1/revoke", json={"session": "x"}, headers={"Authorization": "Bearer wrong"}), 403),
        (post("/v1/revoke", json={"session": "x", "user": "y"}, headers=auth.admin()), 400),
        (post("/v1/revoke", json={"session": "no-such"}, headers=auth.admin()), 404),
        (post("/v1/users", json={"username": "a b", "password": "long enough"}, headers=auth.admin()), 400),
        (post("/v1/users", json={"username": "ok", "password": "short"}, headers=auth.admin()), 400),
        (
            post(
                "/v1/users", json={"username": "ok", "password": "long enough", "channels": "x"}, headers=auth.admin()
            ),
            400,
        ),
        (post("/v1/subscription-token", json={"channel": "x"}), 401),
        (post("/v1/subscription-token", json={"channel": "x"}, headers={"Authorization": "Bearer junk"}), 401),
        (post("/v1/keys/rotate"), 401),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["error"] and response.json()["error_description"]
    name = auth.user()
    again = post("/v1/users", json={"username": name, "password": "long enough"}, headers=auth.admin())
    assert again.status_code == 409


def test_readiness_names_its_dependencies(auth: Any) -> None:
    checks = auth.client.get("/readyz").json()["checks"]
    expected = {"bus", "broker", "revocations", "login-limits", "auth-nonces", "auth-connections"}
    expected |= {"auth-database"} if auth.engine == "postgres" else set()
    assert set(checks) == expected
    metrics = auth.client.get("/metrics").text
    assert "tsunagu_auth_logins_total" in metrics and "tsunagu_auth_token_issue_seconds" in metrics


def test_a_browser_app_on_an_allowed_origin_may_log_in(make_auth) -> None:  # type: ignore[no-untyped-def]
    auth = make_auth(cors_origins=["http://127.0.0.1:8080"])
    preflight = auth.client.options(
        "/v1/token",
        headers={
            "Origin": "http://127.0.0.1:8080",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
    login = auth.client.post(
        "/v1/token",
        json={"grant_type": "password", "username": auth.user(), "password": "correct horse"},
        headers={"Origin": "http://127.0.0.1:8080"},
    )
    assert login.status_code == 200 and login.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
    stranger = auth.client.options(
        "/v1/token", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in stranger.headers


def test_a_browser_app_may_read_how_long_a_locked_login_waits(make_auth) -> None:  # type: ignore[no-untyped-def]
    auth = make_auth(cors_origins=["http://127.0.0.1:8080"], login_max_failures=1)
    user = auth.user()
    attempt = {"grant_type": "password", "username": user, "password": "wrong"}
    origin = {"Origin": "http://127.0.0.1:8080"}
    assert auth.client.post("/v1/token", json=attempt, headers=origin).status_code == 401
    locked = auth.client.post("/v1/token", json=attempt, headers=origin)
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert "retry-after" in locked.headers["access-control-expose-headers"].lower()
