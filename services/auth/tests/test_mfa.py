"""Second factors as a user meets them: TOTP enrolled from its QR code's URI and used at the next login,
replayed and stale codes refused, wrong codes locking the user's factors, recovery codes good once,
step-up raising a session's `acr` for its refreshed tokens too; on memory and on PostgreSQL + Redis."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import jwt
import orjson
import pyotp
from tsunagu_core.wire.events_pb2 import AuditEvent


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def code(secret: str, windows_ahead: int = 0) -> str:
    """What an authenticator app shows now (or `windows_ahead` 30-second windows from now)."""
    return pyotp.TOTP(secret).at(time.time() + 30 * windows_ahead)


def audits(auth: Any, action: str) -> list[AuditEvent]:
    return [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit") if e.type == action]


def enrol_totp(auth: Any, user: str) -> tuple[str, dict[str, Any]]:
    """Enrols TOTP as the web app does: the secret from the otpauth URI the QR code encodes, then a code."""
    access = auth.login(user).json()["access_token"]
    begun = auth.client.post("/v1/mfa/totp", headers=bearer(access))
    assert begun.status_code == 200, begun.text
    body = begun.json()
    assert body["qr_svg"].startswith("data:image/svg+xml"), "a QR code an authenticator app scans"
    uri = urllib.parse.urlparse(body["otpauth_uri"])
    assert uri.scheme == "otpauth" and uri.netloc == "totp" and user in urllib.parse.unquote(uri.path)
    secret = urllib.parse.parse_qs(uri.query)["secret"][0]
    assert secret == body["secret"]
    confirmed = auth.client.post("/v1/mfa/totp/confirm", json={"otp": code(secret)}, headers=bearer(access))
    assert confirmed.status_code == 200, confirmed.text
    return secret, confirmed.json()


def mfa_login(auth: Any, user: str) -> str:
    """The password step of a login with a second factor: its mfa_token."""
    response = auth.login(user)
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "mfa_required" and "totp" in body["factors"], body
    return str(body["mfa_token"])


def test_totp_enrolment_then_login_with_a_code(auth: Any) -> None:
    user = auth.user()
    secret, confirmed = enrol_totp(auth, user)
    assert len(confirmed["recovery_codes"]) == 10 and len(set(confirmed["recovery_codes"])) == 10
    assert confirmed["acr"] == "2", "the enrolling session proved the factor"
    assert claims_of(confirmed["access_token"])["amr"] == ["pwd", "otp"]
    assert [a.outcome for a in audits(auth, "auth.mfa.enrolled")] == ["ok"]

    mfa_token = mfa_login(auth, user)
    # The code the enrolment used is spent; the authenticator's next one (within the skew) is not.
    body = {"grant_type": "mfa_otp", "mfa_token": mfa_token, "otp": code(secret, 1)}
    tokens = auth.client.post("/v1/token", json=body)
    assert tokens.status_code == 200, tokens.text
    claims = claims_of(tokens.json()["access_token"])
    assert claims["acr"] == "2" and claims["amr"] == ["pwd", "otp"] and claims["sub"] == user
    refreshed = auth.client.post("/v1/refresh", json={"refresh_token": tokens.json()["refresh_token"]})
    assert claims_of(refreshed.json()["access_token"])["acr"] == "2", "a refreshed token keeps the level"
    assert auth.client.post("/v1/token", json=body).status_code == 401, "an mfa_token is good for one login"


def test_a_replayed_or_stale_code_is_refused_and_audited(auth: Any) -> None:
    user = auth.user()
    secret, _ = enrol_totp(auth, user)
    used = code(secret, 1)
    first = auth.client.post(
        "/v1/token", json={"grant_type": "mfa_otp", "mfa_token": mfa_login(auth, user), "otp": used}
    )
    assert first.status_code == 200, first.text

    replay = auth.client.post(
        "/v1/token", json={"grant_type": "mfa_otp", "mfa_token": mfa_login(auth, user), "otp": used}
    )
    assert replay.status_code == 401
    assert replay.json()["reason"] == "replayed" and "used already" in replay.json()["error_description"]

    old = code(secret, -3)  # three windows back: beyond the one window of skew
    stale = auth.client.post(
        "/v1/token", json={"grant_type": "mfa_otp", "mfa_token": mfa_login(auth, user), "otp": old}
    )
    assert stale.status_code == 401 and stale.json()["reason"] == "stale", stale.text
    assert "earlier 30-second window" in stale.json()["error_description"]
    outcomes = [a.outcome for a in audits(auth, "auth.mfa.otp")]
    assert outcomes == ["ok", "replayed", "stale"], outcomes


def test_wrong_codes_lock_the_users_second_factors(make_auth: Any) -> None:
    auth = make_auth(mfa_max_failures=3)
    user = auth.user()
    secret, _ = enrol_totp(auth, user)
    right = code(secret, 1)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(3):
        refused = auth.client.post(
            "/v1/token", json={"grant_type": "mfa_otp", "mfa_token": mfa_login(auth, user), "otp": wrong}
        )
        assert refused.status_code == 401 and refused.json()["reason"] == "wrong", refused.text
    locked = auth.client.post(
        "/v1/token", json={"grant_type": "mfa_otp", "mfa_token": mfa_login(auth, user), "otp": right}
    )
    assert locked.status_code == 429, "even the right code waits for the window to end"
    assert int(locked.headers["retry-after"]) > 0
    assert [a.outcome for a in audits(auth, "auth.mfa.otp")] == ["wrong", "wrong", "wrong", "limited"]


def test_recovery_codes_work_once_each(auth: Any) -> None:
    user = auth.user()
    _, confirmed = enrol_totp(auth, user)
    recovery = confirmed["recovery_codes"][3]
    body = {"grant_type": "mfa_recovery_code", "mfa_token": mfa_login(auth, user), "recovery_code": recovery.lower()}
    tokens = auth.client.post("/v1/token", json=body)
    assert tokens.status_code == 200, tokens.text
    assert claims_of(tokens.json()["access_token"])["acr"] == "2"
    status = auth.client.get("/v1/mfa", headers=bearer(tokens.json()["access_token"])).json()
    assert status["totp"] is True and status["recovery_codes_left"] == 9

    again = {"grant_type": "mfa_recovery_code", "mfa_token": mfa_login(auth, user), "recovery_code": recovery}
    refused = auth.client.post("/v1/token", json=again)
    assert refused.status_code == 401 and "used already" in refused.json()["error_description"]


def test_step_up_raises_the_sessions_level_for_its_refreshed_tokens(auth: Any) -> None:
    user = auth.user()
    earlier = auth.login(user).json()  # a session from before the factor: acr 1
    assert claims_of(earlier["access_token"])["acr"] == "1"
    secret, _ = enrol_totp(auth, user)

    # A user with a factor adds another only from a session that proved one.
    refused = auth.client.post("/v1/mfa/totp", headers=bearer(earlier["access_token"]))
    assert refused.status_code == 401 and refused.json()["error"] == "insufficient_user_authentication"
    assert 'acr_values="2"' in refused.headers["www-authenticate"]

    stepped = auth.client.post("/v1/step-up", json={"otp": code(secret, 1)}, headers=bearer(earlier["access_token"]))
    assert stepped.status_code == 200, stepped.text
    assert stepped.json()["acr"] == "2"
    before, after = claims_of(earlier["access_token"]), claims_of(stepped.json()["access_token"])
    assert after["sid"] == before["sid"] and after["amr"] == ["pwd", "otp"], "the same session, stronger"
    refreshed = auth.client.post("/v1/refresh", json={"refresh_token": earlier["refresh_token"]})
    assert claims_of(refreshed.json()["access_token"])["acr"] == "2"
    stepped_sessions = [orjson.loads(a.details)["session"] for a in audits(auth, "auth.step_up")]
    assert before["sid"] in stepped_sessions


def test_a_bootstrap_admin_with_a_totp_secret_must_present_a_code(make_auth: Any) -> None:
    secret = pyotp.random_base32()
    admin = {"password": "admin-password-1", "roles": ["admin"], "totp_secret": secret}
    auth = make_auth(bootstrap_users={"root-admin": admin})
    for _ in range(100):
        response = auth.login("root-admin", "admin-password-1")
        if response.status_code != 401:
            break
        time.sleep(0.05)  # the bootstrap runs once the bus is ready
    assert response.status_code == 403 and response.json()["error"] == "mfa_required", response.text
    body = {"grant_type": "mfa_otp", "mfa_token": response.json()["mfa_token"], "otp": code(secret)}
    tokens = auth.client.post("/v1/token", json=body)
    assert tokens.status_code == 200, tokens.text
    claims = claims_of(tokens.json()["access_token"])
    assert claims["roles"] == ["admin"] and claims["acr"] == "2"


def test_bad_second_factor_input_is_a_clear_4xx(auth: Any) -> None:
    user = auth.user()
    access = auth.login(user).json()["access_token"]
    early = auth.client.post("/v1/mfa/totp/confirm", json={"otp": "123456"}, headers=bearer(access))
    assert early.status_code == 400 and early.json()["reason"] == "no_enrolment", early.text
    secret, _ = enrol_totp(auth, user)
    mfa_token = mfa_login(auth, user)
    cases = [
        ({"grant_type": "mfa_otp", "mfa_token": mfa_token}, 400, "otp is required"),
        ({"grant_type": "mfa_otp", "mfa_token": "not-a-token", "otp": "123456"}, 401, "invalid or expired mfa token"),
        ({"grant_type": "mfa_otp", "mfa_token": mfa_token, "otp": "12ab56"}, 401, "wrong code"),
        ({"grant_type": "mfa_otp", "mfa_token": access, "otp": code(secret, 1)}, 401, "invalid or expired mfa token"),
        ({"grant_type": "mfa_webauthn", "mfa_token": mfa_token, "credential": "x"}, 400, "a passkey needs"),
    ]
    for body, status, words in cases:
        response = auth.client.post("/v1/token", json=body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error_description"], (body, response.text)
    assert auth.client.get("/readyz").status_code == 200
