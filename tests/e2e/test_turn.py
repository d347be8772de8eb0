"""TURN credentials from auth, used against the stack's real coturn (`tsunagu stack up turn`) by aioice's TURN
client (aiortc's ICE library): an allocation relays a datagram between two users' relayed addresses, a
tampered credential is refused, and a credential is refused once its time has passed."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from tsunagu_core.testing import POSTGRES_DSN, require_stack

ADMIN = "e2e-turn-admin-key"
PASSWORD = "correct horse battery"


def turn_server() -> tuple[str, int, str]:
    """The stack's coturn, as `tsunagu stack env turn` names it (make test exports it)."""
    require_stack("the TURN tests")
    uris = json.loads(os.environ.get("TSUNAGU_AUTH_TURN_URIS", "[]"))
    secret = os.environ.get("TSUNAGU_AUTH_TURN_SECRET", "")
    if not uris or not secret:
        pytest.fail("no TURN server in the environment: `tsunagu stack up turn` and `eval $(tsunagu stack env turn)`")
    host, port = uris[0].split(":", 1)[1].split("?", 1)[0].rsplit(":", 1)
    return host, int(port), secret


class Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))


async def credentials(http: httpx.AsyncClient, base: str, user: str) -> dict[str, Any]:
    body = {"username": user, "password": PASSWORD, "channels": []}
    assert (await http.post(f"{base}/v1/users", json=body, headers={"X-API-Key": ADMIN})).status_code == 201
    login = await http.post(f"{base}/v1/token", json={"grant_type": "password", "username": user, "password": PASSWORD})
    token = login.json()["access_token"]
    answer = await http.post(f"{base}/v1/turn-credentials", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    result: dict[str, Any] = answer.json()
    return result


async def start_auth(start_service, real_env, schema: str, ttl: float):  # type: ignore[no-untyped-def]
    host, port, secret = turn_server()
    dsn = f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}"
    env = {
        **real_env,
        "TSUNAGU_POSTGRES_DSN": dsn,
        "TSUNAGU_AUTH_ADMIN_API_KEY": ADMIN,
        "TSUNAGU_AUTH_ARGON2_TIME_COST": "1",
        "TSUNAGU_AUTH_ARGON2_MEMORY_COST": "8192",
        "TSUNAGU_AUTH_TURN_SECRET": secret,
        "TSUNAGU_AUTH_TURN_URIS": json.dumps([f"turn:{host}:{port}?transport=udp"]),
        "TSUNAGU_AUTH_STUN_URIS": json.dumps([f"stun:{host}:{port}"]),
        "TSUNAGU_AUTH_TURN_CREDENTIAL_TTL": str(ttl),
    }
    auth = start_service(["serve", "auth"], env)
    await asyncio.to_thread(auth.wait_ready, 60)
    return auth, (host, port)


async def with_schema() -> str:
    schema = f"turn_e2e_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(POSTGRES_DSN)
    await connection.execute(f"CREATE SCHEMA {schema}")
    await connection.close()
    return schema


async def drop(schema: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN)
    await connection.execute(f"DROP SCHEMA {schema} CASCADE")
    await connection.close()


async def test_turn_credentials_from_auth_relay_through_coturn_and_tampered_ones_are_refused(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    schema = await with_schema()
    try:
        auth, server = await start_auth(start_service, real_env, schema, ttl=600)
        suffix = uuid.uuid4().hex[:6]
        async with httpx.AsyncClient() as http:
            ann = await credentials(http, auth.base, f"ann{suffix}")
            bob = await credentials(http, auth.base, f"bob{suffix}")
            # Without an access token, nothing.
            assert (await http.post(f"{auth.base}/v1/turn-credentials")).status_code == 401
        assert ann["username"].endswith(f":ann{suffix}") and ann["ttl"] == 600
        assert ann["iceServers"][0] == {"urls": [f"stun:{server[0]}:{server[1]}"]}
        assert ann["iceServers"][1]["username"] == ann["username"]

        ann_inbox, bob_inbox = Inbox(), Inbox()
        ann_relay, _ = await create_turn_endpoint(lambda: ann_inbox, server, ann["username"], ann["credential"])
        bob_relay, _ = await create_turn_endpoint(lambda: bob_inbox, server, bob["username"], bob["credential"])
        try:
            ann_address = ann_relay.get_extra_info("sockname")
            bob_address = bob_relay.get_extra_info("sockname")
            # Permissions are per peer: each sends once, then the relay lets the other's datagrams in.
            bob_relay.sendto(b"hello from bob", ann_address)
            ann_relay.sendto(b"hello from ann", bob_address)
            await asyncio.sleep(0.3)
            bob_relay.sendto(b"hello from bob", ann_address)
            data, _ = await asyncio.wait_for(ann_inbox.received.get(), 5)
            assert data == b"hello from bob"
        finally:
            ann_relay.close()
            bob_relay.close()

        tampered = ann["credential"][:-4] + ("AAA=" if not ann["credential"].endswith("AAA=") else "BBB=")
        with pytest.raises(stun.TransactionFailed) as refused:
            await create_turn_endpoint(Inbox, server, ann["username"], tampered)
        assert refused.value.response.attributes["ERROR-CODE"][0] == 401
    finally:
        await drop(schema)


async def test_a_turn_credential_is_refused_once_its_time_has_passed(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    schema = await with_schema()
    try:
        auth, server = await start_auth(start_service, real_env, schema, ttl=2)
        async with httpx.AsyncClient() as http:
            issued = await credentials(http, auth.base, f"eve{uuid.uuid4().hex[:6]}")
        relay, _ = await create_turn_endpoint(Inbox, server, issued["username"], issued["credential"])
        relay.close()  # accepted while fresh
        await asyncio.sleep(3.5)
        with pytest.raises(stun.TransactionFailed) as refused:
            await create_turn_endpoint(Inbox, server, issued["username"], issued["credential"])
        assert refused.value.response.attributes["ERROR-CODE"][0] == 401
    finally:
        await drop(schema)
