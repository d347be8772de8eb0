"""Client-certificate authentication over wss:// and https:// (mTLS): devices connect with the stock
SDK and no token, backends call the server API without a key; revocation covers certificates too."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import httpx
import pytest
import websockets
from centrifuge import Client, ReplyError
from tsunagu_core import topics
from tsunagu_core.config import TlsSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.tls import ServerTls, client_context
from tsunagu_core.wire.events_pb2 import Revocation

from tsunagu.devpki import DevPki, ensure_dev_pki, issue, load_ca, write_pair

DEVICES = [{"match": "device-*", "user": "{name}", "channels": ["chat:telemetry.{name}", "chat:alerts"]}]


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path / "tls")[0]


def device_tls(pki: DevPki, tmp_path: Path, name: str) -> ssl.SSLContext:
    """The TLS context of a device holding a certificate for `name` from the platform's CA."""
    cert, key = issue(load_ca(pki), name, client=True)
    write_pair(cert, key, tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    return client_context(
        TlsSettings(
            tls_ca_file=str(pki.ca_cert),
            tls_cert_file=str(tmp_path / f"{name}.crt"),
            tls_key_file=str(tmp_path / f"{name}.key"),
        )
    )


def server_tls(pki: DevPki) -> ServerTls:
    return ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert), "optional")


async def test_a_device_connects_with_its_certificate_and_no_token(start_gateway, pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    context = device_tls(pki, tmp_path, "device-7")
    async with start_gateway(server_tls=server_tls(pki), client_cert_identities=DEVICES) as gw:
        client = Client(gw.ws_url, ssl_context=context)
        await client.connect()
        own = client.new_subscription("chat:telemetry.device-7")
        await own.subscribe()
        await own.publish({"temperature": 21.5})
        history = await own.history(limit=10)
        assert [p.data for p in history.publications] == [{"temperature": 21.5}]
        # the identity's channel patterns are all it may use: not another device's telemetry
        with pytest.raises(ReplyError) as refused:
            await client.publish("chat:telemetry.device-8", {"temperature": 99})
        assert refused.value.code == 103
        await client.disconnect()

        async with httpx.AsyncClient(verify=context) as http:
            info = await http.post(
                gw.http_url + "/api/presence",
                json={"channel": "chat:telemetry.device-7"},
                headers={"X-API-Key": "test-api-key"},
            )
        assert info.status_code == 200


async def test_a_certificate_no_identity_takes_needs_a_token(start_gateway, pki, tmp_path, token) -> None:  # type: ignore[no-untyped-def]
    context = device_tls(pki, tmp_path, "printer-1")
    async with start_gateway(server_tls=server_tls(pki), client_cert_identities=DEVICES) as gw:
        socket = await websockets.connect(gw.ws_url, ssl=context)
        await socket.send(json.dumps({"id": 1, "connect": {}}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 5)
        assert (socket.close_code, socket.close_reason) == (3501, "bad request")  # no token at all, as Centrifugo
        # the same certificate with a token: the token decides who it is
        client = Client(gw.ws_url, token=token("ann", ["chat:*"]), ssl_context=context)
        await client.connect()
        await client.disconnect()


async def test_revoking_the_device_or_its_certificate_disconnects_it_and_keeps_it_out(  # type: ignore[no-untyped-def]
    start_gateway, pki, tmp_path
) -> None:
    context = device_tls(pki, tmp_path, "device-9")
    async with start_gateway(server_tls=server_tls(pki), client_cert_identities=DEVICES) as gw:
        bus = gw.server.config.app.state.runtime.bus
        socket = await websockets.connect(gw.ws_url, ssl=context)
        await socket.send(json.dumps({"id": 1, "connect": {}}))
        reply = json.loads(await asyncio.wait_for(socket.recv(), 5))
        assert "error" not in reply and reply["id"] == 1
        fingerprint = gw.server.config.app.state.gateway.registry.clients
        [session] = fingerprint.values()
        assert session.user == "device-9" and session.grant.token_id.startswith("cert:")
        revocation = Revocation(scope=Revocation.TOKEN, value=session.grant.token_id, reason="device stolen")
        await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="device-9", source="test")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 5)
        assert socket.close_code == 3500
        again = await websockets.connect(gw.ws_url, ssl=context)
        await again.send(json.dumps({"id": 1, "connect": {}}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(again.recv(), 5)
        assert (again.close_code, again.close_reason) == (3500, "token revoked")


async def test_a_backend_certificate_opens_the_server_api_without_a_key(start_gateway, pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = device_tls(pki, tmp_path, "billing-backend")
    stranger = device_tls(pki, tmp_path, "someone-else")
    async with start_gateway(server_tls=server_tls(pki), api_client_certs=["*-backend"]) as gw:
        body = {"channel": "chat:alerts", "data": {"text": "disk full"}}
        async with httpx.AsyncClient(verify=backend) as http:
            published = await http.post(gw.http_url + "/api/publish", json=body)
        assert published.status_code == 200 and "result" in published.json()
        async with httpx.AsyncClient(verify=stranger) as http:
            refused = await http.post(gw.http_url + "/api/publish", json=body)
        assert refused.status_code == 401 and "X-API-Key" in refused.json()["error"]
        # without any certificate the key still works
        anonymous = client_context(TlsSettings(tls_ca_file=str(pki.ca_cert)))
        async with httpx.AsyncClient(verify=anonymous) as http:
            keyed = await http.post(gw.http_url + "/api/publish", json=body, headers={"X-API-Key": "test-api-key"})
        assert keyed.status_code == 200


async def test_a_device_streams_over_https_and_a_stopping_gateway_ends_the_stream(start_gateway, pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """uni_http_stream over mTLS: admitted by its certificate, and the gateway's HTTP protocol class
    (the shutdown push) is kept under the TLS one that records the peer certificate."""
    context = device_tls(pki, tmp_path, "device-9")
    async with (
        start_gateway(server_tls=server_tls(pki), client_cert_identities=DEVICES) as gw,
        httpx.AsyncClient(verify=context) as http,
        http.stream("POST", gw.http_url + "/connection/uni_http_stream", json={}) as response,
    ):
        lines = response.aiter_lines()
        connect = json.loads(await asyncio.wait_for(anext(lines), 5))["connect"]
        assert connect["client"]
        gw.server.should_exit = True
        rest = [json.loads(line) async for line in lines if line.strip()]
        assert rest == [{"disconnect": {"code": 3001, "reason": "shutdown"}}]
