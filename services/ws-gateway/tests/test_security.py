"""The gateway's security findings (issue 21) replayed as attacks: each is refused with its documented
status, close code or error code, and the gateway stays healthy and bounded afterwards.

The admission checks across every transport (origin, revocation, expiry, connection limits, client
certificates) are in test_admission.py; the collab findings that need the collab service in
tests/e2e/test_gateway_security.py; the fuzzing of the decoders and the server API in test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tsunagu_core.testing import free_port, serving

from .admission_clients import Target, native
from .conftest import API_KEY, SECRET, RunningGateway, make_token, running_gateway
from .test_jwt_attacks import AUDIENCE, KID, Auth


async def healthy(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        assert (await http.get("/healthz")).status_code == 200
    assert (await native(Target(gateway.port), make_token("health", ["chat:*"]))).admitted


async def connected(gateway: RunningGateway, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(gateway.ws_url)
    await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert "connect" in reply, reply
    return ws


async def ask(ws: websockets.ClientConnection, command: dict[str, Any] | str, command_id: int) -> dict[str, Any]:
    """Send one command; its reply (pushes and pings on the way are skipped)."""
    await ws.send(command if isinstance(command, str) else json.dumps({"id": command_id, **command}))
    async with asyncio.timeout(5):
        while True:
            for line in str(await ws.recv()).splitlines():
                reply = json.loads(line)
                if reply.get("id") == command_id:
                    return dict(reply)


# critical


async def test_a_server_api_open_to_client_certificates_and_without_a_key_refuses_a_bare_request() -> None:
    async with running_gateway(api_key="", api_client_certs=["*-backend"]) as gw:
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            published = await http.post("/api/publish", json={"channel": "chat:x", "data": {"owned": True}})
            kicked = await http.post("/api/disconnect", json={"user": "alice"})
            empty_key = await http.post("/api/info", json={}, headers={"X-API-Key": ""})
        assert [published.status_code, kicked.status_code, empty_key.status_code] == [401, 401, 401]
        assert (await gw.broker.history("chat:x", limit=10)).publications == []
        await healthy(gw)


# high


async def test_a_subscription_token_does_not_connect_and_other_token_types_are_refused() -> None:
    async with running_gateway() as gw:
        subscription_token = make_token("alice", ["chat:*"], channel="chat:room")
        outcome = await native(Target(gw.port), subscription_token)
        assert (outcome.admitted, outcome.code) == (False, 3500)
        refresh_typed = make_token("alice", ["chat:*"], typ="refresh")
        outcome = await native(Target(gw.port), refresh_typed)
        assert (outcome.admitted, outcome.code) == (False, 3500)
        # auth's connection tokens may say what they are; stock Centrifugo-style ones need not
        assert (await native(Target(gw.port), make_token("alice", ["chat:*"], typ="access"))).admitted
        assert (await native(Target(gw.port), make_token("alice", ["chat:*"]))).admitted
        # and a connection token is no subscription token
        ws = await connected(gw, make_token("alice", []))
        refused = await ask(ws, {"subscribe": {"channel": "chat:room", "token": make_token("alice", [])}}, 2)
        assert refused["error"]["code"] == 103
        await ws.close()


async def test_an_expired_subscription_token_ends_the_subscription() -> None:
    async with running_gateway(pong_timeout=1) as gw:
        ws = await connected(gw, make_token("alice", []))
        # Valid for 2 s; verification allows 5 s of clock skew, then the subscription ends.
        sub_token = make_token("alice", None, ttl=-4, channel="chat:vip")
        subscribed = await ask(ws, {"subscribe": {"channel": "chat:vip", "token": sub_token}}, 2)
        assert "subscribe" in subscribed, subscribed
        pushes = []
        async with asyncio.timeout(15):
            while not any("unsubscribe" in p.get("push", {}) for p in pushes):
                pushes += [json.loads(line) for line in str(await ws.recv()).splitlines() if line != "{}"]
        unsubscribe = next(p["push"] for p in pushes if "unsubscribe" in p.get("push", {}))
        assert unsubscribe == {"channel": "chat:vip", "unsubscribe": {"code": 2501, "reason": "subscription expired"}}
        async with httpx.AsyncClient(base_url=gw.http_url, headers={"X-API-Key": API_KEY}) as api:
            await api.post("/api/publish", json={"channel": "chat:vip", "data": {"after": "expiry"}})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                while True:
                    assert "after" not in str(await ws.recv())
        await ws.close()


class Backend:
    """An RPC backend that records the paths it was asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def handle(self, request: Request) -> JSONResponse:
        self.paths.append(request.url.path)
        return JSONResponse({"ok": request.url.path})


@contextlib.asynccontextmanager
async def rpc_backend() -> AsyncIterator[tuple[Backend, str]]:
    backend = Backend()
    app = Starlette(routes=[Route("/{path:path}", backend.handle, methods=["POST"])])
    port = free_port()
    async with serving(app, port):
        yield backend, f"http://127.0.0.1:{port}"


async def test_client_rpc_is_an_allow_list_with_a_permission_per_method() -> None:
    async with rpc_backend() as (backend, url):
        routes = {
            "sim.rooms": {"url": f"{url}/v1/rooms", "allow": "claim"},
            "mqtt.request": {"url": f"{url}/mqtt.request", "allow": "authenticated", "publish_to": "mqtt:{topic}"},
        }
        async with running_gateway(rpc_routes=routes) as gw:
            nobody = await connected(gw, make_token("mallory", []))
            traversal = await ask(nobody, {"rpc": {"method": "sim./../v1/rooms", "data": {}}}, 2)
            assert traversal["error"]["code"] == 104
            not_granted = await ask(nobody, {"rpc": {"method": "sim.rooms", "data": {}}}, 3)
            assert not_granted["error"]["code"] == 103
            pump = {"rpc": {"method": "mqtt.request", "data": {"topic": "devices/pump-7/cmd", "payload": "open"}}}
            assert (await ask(nobody, pump, 4))["error"]["code"] == 103
            assert backend.paths == []
            # granted: each to the URL configured, nothing of the client's in it
            operator = await connected(gw, make_token("olga", ["rpc:sim.rooms", "mqtt:devices/pump-7/*"]))
            assert (await ask(operator, {"rpc": {"method": "sim.rooms", "data": {}}}, 2))["rpc"]["data"] == {
                "ok": "/v1/rooms"
            }
            assert "rpc" in await ask(operator, pump, 3)
            assert backend.paths == ["/v1/rooms", "/mqtt.request"]
            await nobody.close()
            await operator.close()
            await healthy(gw)


async def test_tokens_stay_out_of_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    token = make_token("alice", ["collab:*"])
    async with running_gateway() as gw:
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/collab/notes?token={token}") as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/rpc?token={token}") as ws:
            await ws.close()
    assert any("/collab/notes?token=" in r.getMessage() for r in caplog.records), "the log line is gone"
    assert not any(token in r.getMessage() for r in caplog.records)


# medium


async def test_a_socketio_polling_client_that_stops_polling_is_cut_off() -> None:
    async with running_gateway(send_buffer_bytes=256 * 1024) as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        opened = await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
        sid = json.loads(opened.text[1:])["sid"]
        poll = {"EIO": "4", "transport": "polling", "sid": sid}
        await http.post("/socket.io/", params=poll, content="40" + json.dumps({"token": make_token("ann", ["sio:*"])}))
        assert (await http.get("/socket.io/", params=poll)).text.startswith("40")
        await http.post("/socket.io/", params=poll, content='421["join","lobby"]')
        assert "ok" in (await http.get("/socket.io/", params=poll)).text
        # The client stops polling; 2 MiB are published to its room.
        async with httpx.AsyncClient(base_url=gw.http_url, headers={"X-API-Key": API_KEY}) as api:
            for n in range(64):
                await api.post("/api/publish", json={"channel": "sio:lobby", "data": {"n": n, "pad": "x" * 32_000}})
        engine = (await _socketio_server(gw)).eio
        async with asyncio.timeout(5):
            while sid in engine.sockets:
                await asyncio.sleep(0.05)
        gone = await http.get("/socket.io/", params=poll)
        assert gone.status_code == 400
        assert all(socket.queue.bytes <= 256 * 1024 for socket in engine.sockets.values())
        await healthy(gw)


async def _socketio_server(gw: RunningGateway) -> Any:
    mount = next(r for r in gw.server.config.app.routes if getattr(r, "path", "") == "/socket.io")
    return (await mount.app.app()).app.engineio_server


async def test_poison_input_gets_an_error_reply_and_the_connection_stays() -> None:
    async with running_gateway() as gw:
        ws = await connected(gw, make_token("alice", ["chat:*"]))
        deep = '{"id": 2, "publish": {"channel": "chat:x", "data": ' + "[" * 1000 + "]" * 1000 + "}}"
        assert (await ask(ws, deep, 2))["error"]["code"] == 107
        since = {"history": {"channel": "chat:x", "since": {"offset": "abc", "epoch": "e"}}}
        assert (await ask(ws, since, 3))["error"]["code"] == 107
        recover = {"subscribe": {"channel": "chat:x", "recover": True, "epoch": "e", "offset": [1]}}
        assert (await ask(ws, recover, 4))["error"]["code"] == 107
        assert "ping" in await ask(ws, {"ping": {}}, 5)
        await ws.close()
        async with httpx.AsyncClient(base_url=gw.http_url, headers={"X-API-Key": API_KEY}) as api:
            body = '{"channel": "chat:x", "data": ' + "[" * 300 + "]" * 300 + "}"
            answer = await api.post("/api/publish", content=body)
            assert answer.status_code == 200 and answer.json()["error"]["code"] == 107
            since_api = await api.post("/api/history", json={"channel": "chat:x", "since": {"offset": "abc"}})
            assert since_api.status_code == 200 and since_api.json()["error"]["code"] == 107
            kick = await api.post("/api/disconnect", json={"user": "a", "disconnect": {"code": "x"}})
            assert kick.status_code == 200 and kick.json()["error"]["code"] == 107
        await healthy(gw)


async def test_connection_limits_per_user_per_ip_and_in_total() -> None:
    async with running_gateway() as gw:  # the defaults: 100 per user
        held = [await connected(gw, make_token("hog", ["chat:*"])) for _ in range(100)]
        outcome = await native(Target(gw.port), make_token("hog", ["chat:*"]))
        assert (outcome.admitted, outcome.code) == (False, 3504)
        await healthy(gw)
        for ws in held:
            await ws.close()
    async with running_gateway(max_connections_per_ip=3) as gw:
        held = [await websockets.connect(gw.ws_url) for _ in range(3)]
        outcome = await native(Target(gw.port), make_token("ann", ["chat:*"]))
        assert (outcome.admitted, outcome.code) == (False, 429)
        for ws in held:
            await ws.close()
    async with running_gateway(max_connections=2) as gw:
        held = [await websockets.connect(gw.ws_url) for _ in range(2)]
        outcome = await native(Target(gw.port), make_token("ann", ["chat:*"]))
        assert (outcome.admitted, outcome.code) == (False, 503)
        for ws in held:
            await ws.close()
        registry = gw.server.config.app.state.gateway.registry
        async with asyncio.timeout(5):
            while registry.connections:
                await asyncio.sleep(0.05)
        await healthy(gw)


async def test_exp_is_required_and_iss_checked() -> None:
    forever = jwt.encode({"sub": "alice", "channels": ["chat:*"]}, SECRET, algorithm="HS256")
    async with running_gateway() as gw:
        assert (await native(Target(gw.port), forever)).code == 3500
    async with running_gateway(token_allow_no_exp=True) as gw:
        assert (await native(Target(gw.port), forever)).admitted
    async with running_gateway(token_issuer="https://auth.tsunagu") as gw:
        assert (await native(Target(gw.port), make_token("alice", [], iss="https://evil"))).code == 3500
        assert (await native(Target(gw.port), make_token("alice", []))).code == 3500  # no iss
        assert (await native(Target(gw.port), make_token("alice", [], iss="https://auth.tsunagu"))).admitted


class RotatingAuth(Auth):
    """Auth whose JWKS can drop its key."""

    def __init__(self) -> None:
        super().__init__()
        self.published = True

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse({"keys": [self.jwk] if self.published else []})


async def test_a_key_removed_from_the_jwks_stops_working() -> None:
    from .test_jwt_attacks import serve_jwks

    auth = RotatingAuth()
    async with (
        serve_jwks(auth) as url,
        running_gateway(
            token_hmac_secret="", token_jwks_url=url, token_audience=AUDIENCE, token_jwks_refresh_interval=1
        ) as gw,
    ):
        assert (await native(Target(gw.port), auth.sign())).admitted
        auth.published = False  # auth retired the key (compromised, say)
        await asyncio.sleep(1.2)
        outcome = await native(Target(gw.port), auth.sign(jti="t-2"))
        assert (outcome.admitted, outcome.code) == (False, 3500), outcome
        assert KID not in gw.server.config.app.state.gateway.verifier.jwks.keys


# low


async def test_channel_names_and_bodies_and_messages_are_bounded() -> None:
    async with running_gateway(max_request_bytes=64 * 1024) as gw:
        ws = await connected(gw, make_token("alice", ["chat:*", "collab:*"]))
        assert (await ask(ws, {"subscribe": {"channel": "chat:x\n"}}, 2))["error"]["code"] == 107
        # a native publish to a collab document would bypass collab's persistence
        raw = await ask(ws, {"publish": {"channel": "collab:notes", "data": {"forged": True}}}, 3)
        assert raw["error"]["code"] == 103
        await ws.close()
        big = {"channel": "chat:x", "data": "x" * 100_000}
        async with httpx.AsyncClient(base_url=gw.http_url) as http:
            api = await http.post("/api/publish", json=big, headers={"X-API-Key": API_KEY})
            graphql = await http.post(
                "/graphql",
                json={"query": "{ __typename }", "padding": "x" * 100_000},
                headers={"authorization": f"Bearer {make_token('alice', ['chat:*'])}"},
            )
        assert (api.status_code, graphql.status_code) == (413, 413)
        # uvicorn itself no longer reads 16 MiB messages whole before the gateway can refuse them
        assert gw.server.config.ws_max_size <= 4 * 1024 * 1024
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(gw.ws_url, max_size=None) as big_ws:
                await big_ws.send("x" * (8 * 1024 * 1024))
                await big_ws.recv()
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
        await healthy(gw)


async def test_origins_are_same_origin_by_default_and_collab_checks_the_allow_list() -> None:
    async with running_gateway(allowed_origins=["https://app.example"]) as gw:
        token = make_token("alice", ["collab:*"])
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(
                f"ws://127.0.0.1:{gw.port}/collab/notes?token={token}", additional_headers={"Origin": "https://evil"}
            )
        assert refused.value.response.status_code == 403
        allowed = Target(gw.port, origin="https://app.example")
        assert (await native(allowed, make_token("alice", ["chat:*"]))).admitted
    async with running_gateway() as gw:
        outcome = await native(Target(gw.port, origin="https://evil"), make_token("alice", ["chat:*"]))
        assert (outcome.admitted, outcome.code) == (False, 403)


def test_an_rpc_route_in_the_old_bare_url_shape_is_refused_with_the_new_shape_named() -> None:
    from pydantic import ValidationError
    from tsunagu_ws_gateway.config import GatewaySettings

    with pytest.raises(ValidationError, match=r'a route is an object now, e\.g\. \{"url": "http://sim:8086/v1"'):
        GatewaySettings(rpc_routes={"sim.rooms": "http://sim:8086/v1"})  # type: ignore[dict-item]
