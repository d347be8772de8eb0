"""WebRTC through the platform: two Chromium pages on two gateways signal a data channel over a user-limited
`webrtc:` channel with the clients/js PeerLink helper on the stock centrifuge SDK, directly and relayed
through the stack's coturn with credentials from auth; a third user can neither read nor inject signaling."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from centrifuge import Client, SubscriptionState
from tsunagu_core.testing import POSTGRES_DSN, require_stack
from tsunagu_core.testing_clients import Inbox

REPO = Path(__file__).resolve().parents[2]
JS = Path(__file__).parent / "js"
ADMIN = "e2e-webrtc-admin-key"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/js compiled as a browser imports it."""
    out = tmp_path_factory.mktemp("peerlink")
    tsc = REPO / "clients" / "js" / "node_modules" / ".bin" / "tsc"
    config = REPO / "clients" / "js" / "tsconfig.build.json"
    flags = ["--declaration", "false", "--declarationMap", "false", "--sourceMap", "false"]
    subprocess.run([str(tsc), "-p", str(config), "--outDir", str(out), *flags], check=True, timeout=120)
    return out


@pytest.fixture
async def platform(start_service, real_env):  # type: ignore[no-untyped-def]
    """auth (with the stack's TURN server) and two gateways trusting its tokens, in a schema of its own."""
    require_stack("the WebRTC tests")
    from tsunagu.browser import find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.fail("no Chromium: run `python -m tsunagu.browser` (make test does) or set TSUNAGU_CHROMIUM")
    turn = {key: os.environ[key] for key in ("TSUNAGU_AUTH_TURN_SECRET", "TSUNAGU_AUTH_TURN_URIS") if key in os.environ}
    if len(turn) < 2:
        pytest.fail("no TURN server in the environment: `tsunagu stack up turn` and `eval $(tsunagu stack env turn)`")
    schema = f"webrtc_e2e_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(POSTGRES_DSN)
    await connection.execute(f"CREATE SCHEMA {schema}")
    await connection.close()
    auth_env = {
        **real_env,
        **turn,
        "TSUNAGU_POSTGRES_DSN": f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}",
        "TSUNAGU_AUTH_ADMIN_API_KEY": ADMIN,
        "TSUNAGU_AUTH_ARGON2_TIME_COST": "1",
        "TSUNAGU_AUTH_ARGON2_MEMORY_COST": "8192",
    }
    auth = start_service(["serve", "auth"], auth_env)
    await asyncio.to_thread(auth.wait_ready, 60)
    gateway_env = {
        **real_env,
        "TSUNAGU_GATEWAY_TOKEN_JWKS_URL": f"{auth.base}/.well-known/jwks.json",
        "TSUNAGU_GATEWAY_TOKEN_AUDIENCE": "tsunagu",
    }
    gateways = [start_service(["serve", "ws-gateway"], gateway_env) for _ in range(2)]
    for gateway in gateways:
        await asyncio.to_thread(gateway.wait_ready, 60)
    try:
        yield {"auth": auth, "gateways": gateways, "chromium": chromium, "suffix": uuid.uuid4().hex[:6]}
    finally:
        connection = await asyncpg.connect(POSTGRES_DSN)
        await connection.execute(f"DROP SCHEMA {schema} CASCADE")
        await connection.close()


async def user(http: httpx.AsyncClient, auth_base: str, name: str) -> dict[str, Any]:
    """A user's access token and TURN credentials from auth."""
    body = {"username": name, "password": PASSWORD, "channels": []}
    assert (await http.post(f"{auth_base}/v1/users", json=body, headers={"X-API-Key": ADMIN})).status_code == 201
    grant = {"grant_type": "password", "username": name, "password": PASSWORD}
    token = (await http.post(f"{auth_base}/v1/token", json=grant)).json()["access_token"]
    turn = await http.post(f"{auth_base}/v1/turn-credentials", headers={"Authorization": f"Bearer {token}"})
    assert turn.status_code == 200, turn.text
    return {"user": name, "token": token, "iceServers": turn.json()["iceServers"]}


async def call(platform: dict[str, Any], helper: Path, parties: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    options = {
        "chromium": platform["chromium"],
        "helper": str(helper),
        "call": f"c{uuid.uuid4().hex[:8]}",
        "messages": 200,
        "parties": [
            {"user": p["user"], "token": p["token"], "base": g.base}
            for p, g in zip(parties, platform["gateways"], strict=True)
        ],
        **extra,
    }
    node = await asyncio.create_subprocess_exec(
        "node", "webrtc_call.mjs", json.dumps(options), cwd=JS, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(node.communicate(), 90)
    assert node.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    assert result["errors"] == [], result["errors"]
    return result


async def test_two_browsers_on_two_gateways_open_a_data_channel_directly_and_through_turn(  # type: ignore[no-untyped-def]
    platform, helper
) -> None:
    suffix = platform["suffix"]
    async with httpx.AsyncClient() as http:
        ann = await user(http, platform["auth"].base, f"ann{suffix}")
        bob = await user(http, platform["auth"].base, f"bob{suffix}")
    direct = await call(platform, helper, [ann, bob])
    assert direct["received"] == list(range(200)), "every message once, in order"
    assert direct["pair"]["local"] == "host"
    # Relayed only: the ICE servers auth gave, coturn in between.
    relayed = await call(platform, helper, [ann, bob], iceServers=ann["iceServers"], iceTransportPolicy="relay")
    assert relayed["received"] == list(range(200))
    assert relayed["pair"]["local"] == "relay"
    assert direct["ignored"] == relayed["ignored"] == [0, 0]


async def test_a_third_user_can_neither_read_nor_inject_a_calls_signaling(platform) -> None:  # type: ignore[no-untyped-def]
    suffix = platform["suffix"]
    async with httpx.AsyncClient() as http:
        ann = await user(http, platform["auth"].base, f"ann{suffix}")
        eve = await user(http, platform["auth"].base, f"eve{suffix}")
    gateway = platform["gateways"][0]
    url = f"ws://127.0.0.1:{gateway.port}/connection/websocket"
    channel = f"webrtc:c1#ann{suffix},bob{suffix}"
    mallory = Client(url, token=eve["token"])
    party = Client(url, token=ann["token"])
    await mallory.connect()
    await party.connect()
    try:
        # Reading: refused with 103.
        inbox = Inbox()
        spy = mallory.new_subscription(channel, events=inbox)
        await spy.subscribe()
        async with asyncio.timeout(10):
            while spy.state != SubscriptionState.UNSUBSCRIBED:
                await asyncio.sleep(0.02)
        # Injecting: refused with 103 as well; a channel that names no users is refused to everyone.
        for target in (channel, f"webrtc:open{suffix}"):
            with pytest.raises(Exception) as refused:
                await mallory.publish(target, {"type": "offer", "sdp": "v=0"})
            assert getattr(refused.value, "code", None) == 103, refused.value
        with pytest.raises(Exception) as unnamed:
            await party.publish(f"webrtc:open{suffix}", {"type": "hello"})
        assert getattr(unnamed.value, "code", None) == 103
        # A party may.
        await party.publish(channel, {"type": "hello"})
        assert inbox.data == []
    finally:
        await mallory.disconnect()
        await party.disconnect()
