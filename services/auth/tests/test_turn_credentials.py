"""TURN credentials in the TURN REST API's scheme: `<expiry>:<user>` signed with HMAC-SHA1 of the shared secret,
what coturn's `use-auth-secret` checks (tests/e2e/test_turn.py runs them against coturn itself)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from tsunagu_auth.turn import IceServers

TURN = {"turn_secret": "s3cret", "turn_uris": ["turn:turn.example:3478"], "stun_uris": ["stun:turn.example:3478"]}


def test_the_credential_is_the_hmac_of_the_username_with_the_shared_secret() -> None:
    servers = IceServers("s3cret", ("turn:t:3478",), (), 600)
    issued = servers.credentials("ann", 1_000_000.0)
    assert issued["username"] == "1000600:ann" and issued["expires_at"] == 1_000_600
    expected = base64.b64encode(hmac.new(b"s3cret", b"1000600:ann", hashlib.sha1).digest()).decode()
    assert issued["credential"] == expected
    assert issued["iceServers"] == [{"urls": ["turn:t:3478"], "username": "1000600:ann", "credential": expected}]


def test_a_user_gets_credentials_for_themselves_only_with_an_access_token(make_auth: Any) -> None:
    auth = make_auth(turn_credential_ttl=120, **TURN)
    user = auth.user()
    token = auth.login(user).json()["access_token"]
    answer = auth.client.post("/v1/turn-credentials", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    issued = answer.json()
    expiry, name = issued["username"].split(":", 1)
    assert name == user and abs(int(expiry) - (time.time() + 120)) < 5
    assert issued["iceServers"][0] == {"urls": ["stun:turn.example:3478"]}
    assert auth.client.post("/v1/turn-credentials").status_code == 401
    bad = auth.client.post("/v1/turn-credentials", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401


def test_without_a_turn_server_the_answer_says_so(make_auth: Any) -> None:
    # (explicitly: `make test` exports the stack's TURN server for the e2e tests)
    auth = make_auth(turn_secret="", turn_uris=[])
    token = auth.login(auth.user()).json()["access_token"]
    answer = auth.client.post("/v1/turn-credentials", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 404 and answer.json()["error"] == "turn_not_configured"
