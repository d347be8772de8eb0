"""The shared security pieces every service is built with, attacked over real sockets: the internal
APIs' credential (token and mTLS), the body cap, the client address behind proxies, production refusals,
`/metrics` on a port of its own."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fastapi import FastAPI, Request, WebSocket
from tsunagu_core.config import ConfigError, CoreSettings, TlsSettings
from tsunagu_core.deployment import development_secrets_in, is_loopback
from tsunagu_core.lifecycle import Runtime, create_service_app, internal_api
from tsunagu_core.proxies import TrustedProxies
from tsunagu_core.service_auth import service_headers
from tsunagu_core.testing import free_port, serving
from tsunagu_core.tls import ServerTls, client_context, uvicorn_options

from tsunagu.devpki import DevPki, ensure_dev_pki, issue, load_ca, write_pair

TOKEN = "internal-token-for-the-tests"


def internal_app(**core: Any) -> FastAPI:
    runtime = Runtime(CoreSettings(**core))
    app = create_service_app(service="example", runtime=runtime, **internal_api(runtime))
    seen: list[int] = []
    app.state.seen = seen

    @app.post("/v1/things")
    async def create_thing(request: Request) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    @app.delete("/v1/things/{name}")
    async def delete_thing(name: str) -> dict[str, str]:
        seen.append(-1)
        return {"deleted": name}

    @app.websocket("/v1/feed")
    async def feed(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("secret feed")
        await websocket.close()

    return app


@contextlib.asynccontextmanager
async def served(app: FastAPI, **options: Any) -> AsyncIterator[str]:
    port = free_port()
    async with serving(app, port, **options):
        scheme = "https" if options else "http"
        yield f"{scheme}://127.0.0.1:{port}"


async def test_the_internal_api_refuses_requests_without_the_token_and_stays_healthy() -> None:
    app = internal_app(internal_token=TOKEN)
    async with served(app) as base, httpx.AsyncClient(base_url=base) as http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
            refused = await http.delete("/v1/things/a", headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"] == "unauthorized"
            assert "TSUNAGU_INTERNAL_TOKEN" in refused.json()["message"]
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert (await http.get("/openapi.json")).status_code == 401
        assert app.state.seen == [], "nothing reached the service"
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(base.replace("http", "ws") + "/v1/feed"):
                pass
        # The probes and /metrics (on this port) stay open; the platform's callers get in.
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        allowed = await http.delete("/v1/things/a", headers=service_headers(CoreSettings(internal_token=TOKEN)))
        assert allowed.status_code == 200 and app.state.seen == [-1]
        async with websockets.connect(
            base.replace("http", "ws") + "/v1/feed", additional_headers={"authorization": f"Bearer {TOKEN}"}
        ) as ws:
            assert await ws.recv() == "secret feed"


async def test_without_any_credential_the_api_is_open_but_readyz_says_so() -> None:
    app = internal_app()
    async with served(app) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.delete("/v1/things/a")).status_code == 200
        warnings = (await http.get("/readyz")).json()["warnings"]
        assert "TSUNAGU_INTERNAL_TOKEN" in warnings["internal_api"]


def test_production_refuses_an_internal_api_without_a_credential() -> None:
    with pytest.raises(ConfigError, match="TSUNAGU_INTERNAL_TOKEN"):
        internal_app(env="production")
    # peers alone do not count where no client certificate is asked for
    with pytest.raises(ConfigError, match="TSUNAGU_INTERNAL_PEERS"):
        internal_app(env="production", internal_peers=["spiffe://cluster.local/*"])
    internal_app(env="production", internal_token=TOKEN)


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path / "tls")[0]


def peer_context(pki: DevPki, tmp_path: Path, uri: str) -> ssl.SSLContext:
    cert, key = issue(load_ca(pki), uri.rsplit("/", 1)[-1], client=True, uris=(uri,))
    write_pair(cert, key, tmp_path / f"{cert.serial_number}.crt", tmp_path / f"{cert.serial_number}.key")
    return client_context(
        TlsSettings(
            tls_ca_file=str(pki.ca_cert),
            tls_cert_file=str(tmp_path / f"{cert.serial_number}.crt"),
            tls_key_file=str(tmp_path / f"{cert.serial_number}.key"),
        )
    )


async def test_a_client_certificate_named_in_internal_peers_replaces_the_token(pki: DevPki, tmp_path: Path) -> None:
    gateway = "spiffe://cluster.local/ns/rt/sa/tsunagu-ws-gateway"
    app = internal_app(
        internal_peers=["spiffe://cluster.local/ns/rt/sa/tsunagu-ws-gateway"],
        server_tls_client_ca_file=str(pki.ca_cert),
    )
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert), "optional")
    async with served(app, **uvicorn_options(tls)) as base:
        async with httpx.AsyncClient(base_url=base, verify=peer_context(pki, tmp_path, gateway)) as http:
            assert (await http.delete("/v1/things/a")).status_code == 200
        # a device's certificate from the same CA is no platform service
        device = peer_context(pki, tmp_path, "spiffe://cluster.local/ns/rt/sa/device-7")
        async with httpx.AsyncClient(base_url=base, verify=device) as http:
            assert (await http.delete("/v1/things/a")).status_code == 401
            assert (await http.get("/healthz")).status_code == 200
        without = client_context(TlsSettings(tls_ca_file=str(pki.ca_cert)))
        async with httpx.AsyncClient(base_url=base, verify=without) as http:
            assert (await http.delete("/v1/things/a")).status_code == 401
    assert app.state.seen == [-1]


async def test_bodies_over_the_cap_get_413_before_they_are_read_and_the_service_stays_up() -> None:
    app = internal_app(internal_token=TOKEN, http_max_body_bytes=4096)
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with served(app) as base, httpx.AsyncClient(base_url=base, headers=headers) as http:
        declared = await http.post("/v1/things", content=b"x" * 10_000)
        assert declared.status_code == 413, declared.text
        assert declared.json() == {
            "error": "payload_too_large",
            "message": "the request body is larger than 4096 bytes",
        }

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):  # no Content-Length: counted as it arrives
                yield b"y" * 1000

        streamed = await http.post("/v1/things", content=chunks())
        assert streamed.status_code == 413, streamed.text
        assert app.state.seen == [], "the handler never saw an oversized body"
        assert (await http.post("/v1/things", content=b"z" * 4096)).json() == {"bytes": 4096}
        assert (await http.get("/healthz")).status_code == 200


async def test_an_unauthenticated_oversized_body_gets_401_not_a_read() -> None:
    app = internal_app(internal_token=TOKEN, http_max_body_bytes=4096)
    async with served(app) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.post("/v1/things", content=b"x" * 100_000)).status_code == 401


async def test_metrics_on_a_port_of_their_own_leave_the_api_port() -> None:
    app = internal_app(internal_token=TOKEN, metrics_port=free_port())
    async with served(app) as base, httpx.AsyncClient(base_url=base) as http:
        # not served here: for a NetworkPolicy, the API port opens to the gateway only
        assert (await http.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})).status_code == 404
        assert (await http.get("/metrics")).status_code == 401


def scope(peer: str, *forwarded: str) -> dict[str, Any]:
    return {"client": (peer, 40000), "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


def test_the_client_address_comes_from_trusted_proxies_only() -> None:
    nobody = TrustedProxies([])
    assert nobody.client_ip(scope("10.0.0.5", "203.0.113.9")) == "10.0.0.5", "no proxy trusted: the socket's peer"
    ingress = TrustedProxies(["10.0.0.0/8", "192.168.1.1"])
    assert ingress.client_ip(scope("10.0.0.5", "203.0.113.9")) == "203.0.113.9"
    # what a client puts in front is not believed; what the trusted hops appended is
    assert ingress.client_ip(scope("10.0.0.5", "1.1.1.1, 203.0.113.9")) == "203.0.113.9"
    assert ingress.client_ip(scope("10.0.0.5", "1.1.1.1, 203.0.113.9, 192.168.1.1")) == "203.0.113.9"
    assert ingress.client_ip(scope("10.0.0.5", "1.1.1.1", "203.0.113.9")) == "203.0.113.9", "two header lines"
    # a request straight from a client that is no proxy: its header is ignored
    assert ingress.client_ip(scope("198.51.100.7", "10.0.0.1")) == "198.51.100.7"
    assert ingress.client_ip(scope("10.0.0.5")) == "10.0.0.5"
    assert ingress.client_ip(scope("10.0.0.5", "garbage")) == "10.0.0.5"
    assert ingress.client_ip(scope("::ffff:10.0.0.5", "2001:db8::1")) == "2001:db8::1"
    with pytest.raises(ConfigError, match="TSUNAGU_TRUSTED_PROXIES: 'not-an-ip'"):
        TrustedProxies(["not-an-ip"])


def test_development_secrets_are_found_wherever_they_sit() -> None:
    public = {"a-public-development-secret"}
    core = CoreSettings(internal_token="a-public-development-secret", internal_peers=["a-public-development-secret"])
    assert development_secrets_in(core, public) == ["TSUNAGU_INTERNAL_TOKEN", "TSUNAGU_INTERNAL_PEERS[0]"]
    assert development_secrets_in(CoreSettings(internal_token="a real one"), public) == []
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")


async def test_a_slow_client_cannot_make_the_cap_hold_the_body() -> None:
    """The 413 arrives while the client is still sending: the service does not wait for the rest."""
    app = internal_app(internal_token=TOKEN, http_max_body_bytes=4096)
    port = free_port()
    async with serving(app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST /v1/things HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
        head += "transfer-encoding: chunked\r\n\r\n"
        writer.write(head.encode() + b"1000\r\n" + b"a" * 4096 + b"\r\n" + b"1000\r\n" + b"b" * 4096 + b"\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 413"), status
        writer.close()
