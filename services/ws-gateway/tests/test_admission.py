"""Every check of the one admission function, asked of every transport: native, JSON-RPC, STOMP,
GraphQL, Socket.IO, collab and FHIR each admit a good credential and refuse a bad token, a revoked
session, a wrong Origin, a draining node, a user over the connection limit and a revoked client
certificate; and a revocation or the server API's disconnect closes an open socket of each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from tsunagu_core import topics
from tsunagu_core.config import TlsSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.tls import ServerTls, client_context
from tsunagu_core.wire.events_pb2 import Revocation

from tsunagu.devpki import DevPki, ensure_dev_pki, issue, load_ca, write_pair

from .admission_clients import CLIENTS, Outcome, Target, fhir_socket
from .conftest import API_KEY, RunningGateway, make_token, running_gateway

TRANSPORTS = list(CLIENTS)
EVERYTHING = ["*"]
DEVICES = [{"match": "device-*", "user": "{name}", "channels": ["*"]}]

# What each transport shows for a refused credential, a user over the limit, and a refused handshake.
BAD_CREDENTIAL = {
    "native": 3500, "jsonrpc": 3500, "stomp": 3500, "graphql": 4403, "socketio": 3500, "collab": 4401, "fhir": 401,
}  # fmt: skip
OVER_LIMIT = {"native": 3504, "jsonrpc": 3504, "stomp": 3504, "graphql": 4403, "socketio": 3504, "collab": 4429}


def good_token(user: str = "ann", **claims: Any) -> str:
    return make_token(user, EVERYTHING, **claims)


async def attempt(transport: str, target: Target, token: str) -> Outcome:
    return await CLIENTS[transport](target, token)


def assert_refused(outcome: Outcome, transport: str, expected: dict[str, int]) -> None:
    assert not outcome.admitted, f"{transport} let it in"
    if transport in expected:
        assert outcome.code == expected[transport], outcome
    elif transport == "fhir":
        assert outcome.code == 401 or outcome.detail.startswith(("security", "throttled")), outcome


async def revoke(gateway: RunningGateway, scope: int, value: str) -> None:
    bus = gateway.server.config.app.state.runtime.bus
    revocation = Revocation(scope=scope, value=value, reason="test", actor="admin")  # type: ignore[arg-type]
    await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key=value, source="test")
    revoked = gateway.server.config.app.state.gateway.revoked
    async with asyncio.timeout(5):
        while value not in revoked.sessions and value not in revoked.tokens:
            await asyncio.sleep(0.01)


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway(max_connections_per_user=2) as running:
        yield running


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_good_token_is_admitted(gateway: RunningGateway, transport: str) -> None:
    assert (await attempt(transport, Target(gateway.port), good_token())).admitted


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_bad_token_is_refused(gateway: RunningGateway, transport: str) -> None:
    forged = good_token()[:-4] + "AAAA"
    assert_refused(await attempt(transport, Target(gateway.port), forged), transport, BAD_CREDENTIAL)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_revoked_session_is_refused(gateway: RunningGateway, transport: str) -> None:
    session = f"revoked-{transport}"
    await revoke(gateway, Revocation.SESSION, session)
    outcome = await attempt(transport, Target(gateway.port), good_token(sid=session))
    assert_refused(outcome, transport, BAD_CREDENTIAL)
    if transport != "graphql":  # graphql-transport-ws closes a refused connection_init with 4403 "Forbidden"
        assert "revoked" in outcome.detail, outcome


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_wrong_origin_is_refused_at_the_handshake(gateway: RunningGateway, transport: str) -> None:
    target = Target(gateway.port, origin="https://evil.example")
    client = fhir_socket if transport == "fhir" else CLIENTS[transport]
    outcome = await client(target, good_token())
    assert (outcome.admitted, outcome.code) == (False, 403), outcome
    # the gateway's own origin (a page it served) is let in
    assert (await client(Target(gateway.port, origin=f"http://127.0.0.1:{gateway.port}"), good_token())).code != 403


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_draining_node_refuses_at_the_handshake(transport: str) -> None:
    async with running_gateway() as gw:
        registry = gw.server.config.app.state.gateway.registry
        registry.draining = True
        client = fhir_socket if transport == "fhir" else CLIENTS[transport]
        outcome = await client(Target(gw.port), good_token())
        assert (outcome.admitted, outcome.code) == (False, 503), outcome
        registry.draining = False


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_user_over_the_connection_limit_is_refused(gateway: RunningGateway, transport: str) -> None:
    user = f"busy-{transport}"
    held = []
    try:
        for _ in range(2):  # the limit, on the native protocol
            ws = await websockets.connect(gateway.ws_url)
            await ws.send(json.dumps({"id": 1, "connect": {"token": good_token(user)}}))
            assert "connect" in json.loads(await ws.recv())
            held.append(ws)
        outcome = await attempt(transport, Target(gateway.port), good_token(user))
        assert_refused(outcome, transport, OVER_LIMIT)
        if transport != "graphql":
            assert "connection" in outcome.detail, outcome
    finally:
        for ws in held:
            await ws.close()


# client certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("tls"))[0]


def device(pki: DevPki, directory: Path, name: str) -> ssl.SSLContext:
    cert, key = issue(load_ca(pki), name, client=True)
    write_pair(cert, key, directory / f"{name}.crt", directory / f"{name}.key")
    settings = TlsSettings(
        tls_ca_file=str(pki.ca_cert),
        tls_cert_file=str(directory / f"{name}.crt"),
        tls_key_file=str(directory / f"{name}.key"),
    )
    return client_context(settings)


@pytest.fixture
async def tls_gateway(pki: DevPki) -> AsyncIterator[RunningGateway]:
    server_tls = ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert), "optional")
    async with running_gateway(server_tls=server_tls, client_cert_identities=DEVICES) as running:
        yield running


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_certificate_is_admitted_and_refused_once_revoked(
    tls_gateway: RunningGateway, pki: DevPki, tmp_path: Path, transport: str
) -> None:
    context = device(pki, tmp_path, f"device-{transport}")
    target = Target(tls_gateway.port, tls=context)
    assert (await attempt(transport, target, "")).admitted
    # the fingerprint, as auth revokes a certificate
    fingerprint = (await _fingerprint(tls_gateway, context)).removeprefix("cert:")
    await revoke(tls_gateway, Revocation.TOKEN, f"cert:{fingerprint}")
    outcome = await attempt(transport, target, "")
    assert_refused(outcome, transport, BAD_CREDENTIAL)


async def _fingerprint(gateway: RunningGateway, context: ssl.SSLContext) -> str:
    async with websockets.connect(gateway.ws_url, ssl=context) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        client = json.loads(await ws.recv())["connect"]["client"]
        session = gateway.server.config.app.state.gateway.registry.clients[client]
        return str(session.grant.token_id)


# closing what is open


@contextlib.asynccontextmanager
async def open_socket(transport: str, gateway: RunningGateway, token: str) -> AsyncIterator[Any]:
    """An admitted socket of `transport` (collab, which needs the collab service, is in tests/e2e)."""
    target = Target(gateway.port)
    if transport == "native":
        async with target.connect("/connection/websocket") as ws:
            await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
            assert "connect" in json.loads(await ws.recv())
            yield ws
    elif transport == "jsonrpc":
        async with target.connect(f"/rpc?token={token}") as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "presence", "params": ["chat:x"]}))
            await ws.recv()
            yield ws
    elif transport == "stomp":
        async with target.connect("/stomp", subprotocols=["v12.stomp"]) as ws:  # type: ignore[list-item]
            await ws.send(f"CONNECT\naccept-version:1.2\nhost:t\npasscode:{token}\n\n\x00")
            assert str(await ws.recv()).startswith("CONNECTED")
            yield ws
    elif transport == "graphql":
        async with target.connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "connection_init", "payload": {"token": token}}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            yield ws
    elif transport == "socketio":
        async with target.connect("/socket.io/?EIO=4&transport=websocket") as ws:
            await ws.recv()
            await ws.send("40" + json.dumps({"token": token}))
            assert str(await ws.recv()).startswith("40")
            yield ws
    elif transport == "fhir":
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"http://127.0.0.1:{gateway.port}/fhir/Subscription/open/$get-ws-binding-token"
            response = await http.get(url, headers={"authorization": f"Bearer {token}"})
        binding = next(p["valueString"] for p in response.json()["parameter"] if p["name"] == "token")
        async with target.connect("/fhir/ws") as ws:
            await ws.send(f"bind-with-token: {binding}")
            assert json.loads(await ws.recv())["resourceType"] == "Bundle"
            yield ws


async def closed_code(ws: Any) -> int | None:
    try:
        async with asyncio.timeout(10):
            while True:
                message = await ws.recv()
                if message == "2":  # Engine.IO ping
                    await ws.send("3")
                elif message == "1":  # Engine.IO's close (after Socket.IO's DISCONNECT, 41): the session is gone
                    return 1000
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


OPEN = [t for t in TRANSPORTS if t != "collab"]


@pytest.mark.parametrize("transport", OPEN)
async def test_a_revocation_closes_an_open_socket(gateway: RunningGateway, transport: str) -> None:
    session = f"open-{transport}-{time.time_ns()}"
    async with open_socket(transport, gateway, good_token(f"victim-{transport}", sid=session)) as ws:
        await revoke(gateway, Revocation.SESSION, session)
        code = await closed_code(ws)
    # Socket.IO ends its sockets the Engine.IO way (DISCONNECT, then CLOSE).
    assert code == (1000 if transport == "socketio" else 3500), code


@pytest.mark.parametrize("transport", OPEN)
async def test_the_server_apis_disconnect_closes_an_open_socket(gateway: RunningGateway, transport: str) -> None:
    user = f"kicked-{transport}-{time.time_ns()}"
    async with open_socket(transport, gateway, good_token(user)) as ws:
        async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
            answer = await api.post("/api/disconnect", json={"user": user})
        assert answer.json() == {"result": {}}
        code = await closed_code(ws)
    assert code == (1000 if transport == "socketio" else 3503), code
