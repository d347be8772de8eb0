"""Sessions a user can see and end: each with its device, its connections on every gateway (from the
gateways' connection events) and their channels; ending one publishes the revocation the gateways close
its connections on, and tells the user's own channel. Who sees whose sessions; on both engine sets."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pyotp
from tsunagu_core import topics
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent, Revocation

CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sid(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["sid"])


def gateway_event(auth: Any, node: str, kind: int, **fields: Any) -> None:
    event = GatewayEvent(kind=kind, node=node, **fields)  # type: ignore[arg-type]
    name = GatewayEvent.Kind.Name(kind).lower()
    auth.client.portal.call(
        lambda: publish_event(auth.bus, topics.GATEWAY_EVENTS, f"gateway.{name}", event, key=node, source=node)
    )


def wait_for(check: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def notices(auth: Any, user: str) -> list[dict[str, Any]]:
    broker = auth.auth.notices.broker
    history = auth.client.portal.call(lambda: broker.history(f"user:#{user}"))
    return [orjson.loads(p.data) for p in history.publications]


def test_a_user_sees_their_sessions_with_connections_on_two_gateways(auth: Any) -> None:
    user = auth.user()
    laptop = auth.login(user, **{"user-agent": CHROME}).json()
    phone = auth.login(user, **{"user-agent": FIREFOX}).json()
    phone_sid = sid(phone["access_token"])
    # Ids of their own: the Redis index (and its tombstones of closed connections) is shared by every run.
    c1, c2 = f"c1-{phone_sid}", f"c2-{phone_sid}"
    gw_a, gw_b = f"gw-a-{user}", f"gw-b-{user}"
    for node in (gw_a, gw_b):
        gateway_event(auth, node, GatewayEvent.NODE_HEARTBEAT)
    gateway_event(auth, gw_a, GatewayEvent.CONNECTED, client_id=c1, user_id=user, session_id=phone_sid,
                  transport="websocket", client_ip="203.0.113.9")  # fmt: skip
    gateway_event(auth, gw_a, GatewayEvent.SUBSCRIBED, client_id=c1, user_id=user, session_id=phone_sid,
                  channel="chat:lobby")  # fmt: skip
    gateway_event(auth, gw_b, GatewayEvent.CONNECTED, client_id=c2, user_id=user, session_id=phone_sid,
                  transport="sse")  # fmt: skip

    def listed() -> list[dict[str, Any]] | None:
        response = auth.client.get("/v1/sessions", headers=bearer(laptop["access_token"]))
        assert response.status_code == 200, response.text
        sessions: list[dict[str, Any]] = response.json()["sessions"]
        ours = next(s for s in sessions if s["id"] == phone_sid)
        return sessions if len(ours["connections"]) == 2 and ours["channels"] else None

    sessions = wait_for(listed, "the phone's two connections")
    assert len(sessions) == 2 and {s["user"] for s in sessions} == {user}
    by_id = {s["id"]: s for s in sessions}
    phone_entry, laptop_entry = by_id[phone_sid], by_id[sid(laptop["access_token"])]
    assert phone_entry["device"] == "Firefox on Windows" and laptop_entry["device"] == "Chrome on Linux"
    assert laptop_entry["current"] is True and phone_entry["current"] is False
    assert phone_entry["gateways"] == [gw_a, gw_b] and phone_entry["channels"] == ["chat:lobby"]
    assert {c["ip"] for c in phone_entry["connections"]} == {"203.0.113.9", ""}
    assert laptop_entry["connections"] == [] and laptop_entry["acr"] == "1"

    gateway_event(auth, gw_b, GatewayEvent.DISCONNECTED, client_id=c2, user_id=user, session_id=phone_sid)

    def connections() -> int:
        sessions = auth.client.get("/v1/sessions", headers=bearer(laptop["access_token"])).json()["sessions"]
        return sum(len(s["connections"]) for s in sessions)

    wait_for(lambda: connections() == 1, "the closed connection to go")


def test_ending_a_session_revokes_it_and_tells_the_users_other_sessions(auth: Any) -> None:
    user = auth.user()
    laptop = auth.login(user, **{"user-agent": CHROME}).json()
    phone = auth.login(user, **{"user-agent": FIREFOX}).json()
    phone_sid = sid(phone["access_token"])
    wait_for(lambda: len(notices(auth, user)) == 2, "a login notice per login")
    logins = notices(auth, user)
    assert [n["type"] for n in logins] == ["login", "login"]
    assert logins[1]["session"]["device"] == "Firefox on Windows", "was this you?"

    ended = auth.client.delete(f"/v1/sessions/{phone_sid}", headers=bearer(laptop["access_token"]))
    assert ended.status_code == 200, ended.text
    assert ended.json()["scope"] == "session" and ended.json()["user"] == user
    revocations = [Revocation.FromString(e.payload) for e in auth.events("tsunagu.auth.revocations")]
    assert [(r.scope, r.value, r.actor) for r in revocations] == [(Revocation.SESSION, phone_sid, user)]
    refused = auth.client.post("/v1/refresh", json={"refresh_token": phone["refresh_token"]})
    assert refused.status_code == 401, "the ended session cannot refresh"
    remaining = auth.client.get("/v1/sessions", headers=bearer(laptop["access_token"])).json()["sessions"]
    assert [s["id"] for s in remaining] == [sid(laptop["access_token"])]

    told = wait_for(lambda: [n for n in notices(auth, user) if n["type"] == "session_ended"], "the notice")
    assert told[0]["session"]["id"] == phone_sid and told[0]["by"] == user
    revokes = [AuditEvent.FromString(e.payload) for e in auth.events("tsunagu.audit") if e.type == "auth.revoke"]
    assert [(a.actor, a.subject, a.outcome) for a in revokes] == [(user, user, "ok")]
    again = auth.client.delete(f"/v1/sessions/{phone_sid}", headers=bearer(laptop["access_token"]))
    assert again.status_code == 404 and "no live session" in again.json()["error_description"]


def test_who_may_see_and_end_whose_sessions(make_auth: Any) -> None:
    secret = pyotp.random_base32()
    admin = {"password": "admin-password-1", "roles": ["admin"], "totp_secret": secret}
    auth = make_auth(bootstrap_users={"ops": admin})
    alice, mallory = auth.user(), auth.user()
    alice_tokens = auth.login(alice).json()
    mallory_token = auth.login(mallory).json()["access_token"]
    alice_sid = sid(alice_tokens["access_token"])

    peek = auth.client.get(f"/v1/sessions?user={alice}", headers=bearer(mallory_token))
    assert peek.status_code == 403 and "their own sessions" in peek.json()["error_description"]
    kill = auth.client.delete(f"/v1/sessions/{alice_sid}", headers=bearer(mallory_token))
    assert kill.status_code == 403
    console = auth.client.get("/v1/console/gateways", headers=bearer(mallory_token))
    assert console.status_code == 403 and console.json()["error_description"] == "the console is for admins"

    # An admin with a password alone is asked for the second factor (RFC 9470), then sees everyone's.
    password_only = wait_for(
        lambda: (r := auth.login("ops", "admin-password-1")).status_code == 403 and r, "the bootstrap admin"
    )
    mfa_token = password_only.json()["mfa_token"]
    otp = pyotp.TOTP(secret).now()
    admin_tokens = auth.client.post("/v1/token", json={"grant_type": "mfa_otp", "mfa_token": mfa_token, "otp": otp})
    assert admin_tokens.status_code == 200, admin_tokens.text
    admin_token = admin_tokens.json()["access_token"]
    everyone = auth.client.get("/v1/sessions", headers=bearer(admin_token)).json()["sessions"]
    assert {alice, mallory, "ops"} <= {s["user"] for s in everyone}
    only_alice = auth.client.get(f"/v1/sessions?user={alice}", headers=bearer(admin_token)).json()["sessions"]
    assert [s["id"] for s in only_alice] == [alice_sid]
    ended = auth.client.delete(f"/v1/sessions/{alice_sid}?reason=lost+laptop", headers=bearer(admin_token))
    assert ended.status_code == 200, ended.text
    revocation = Revocation.FromString(auth.events("tsunagu.auth.revocations")[-1].payload)
    assert (revocation.value, revocation.actor, revocation.reason) == (alice_sid, "ops", "lost laptop")

    # The admin API key (scripts) counts as an admin too.
    scripted = auth.client.get(f"/v1/sessions?user={mallory}", headers=auth.admin())
    assert [s["user"] for s in scripted.json()["sessions"]] == [mallory]
