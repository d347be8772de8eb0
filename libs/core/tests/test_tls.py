"""TLS of the platform: client contexts per dependency, and serving HTTPS/WSS from a certificate that is
rotated in place without dropping connections, with the client certificate of each connection known."""

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
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from tsunagu_core.config import ConfigError, TlsSettings
from tsunagu_core.testing import free_port, serving
from tsunagu_core.tls import (
    ServerTls,
    client_context,
    kafka_config,
    known_peers,
    postgres_ssl,
    redis_tls,
    scope_peer,
    uvicorn_options,
)

from tsunagu.devpki import DevPki, ensure_dev_pki, issue, load_ca, write_pair


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path / "tls")[0]


def client_tls(pki: DevPki, *, certificate: bool = True) -> ssl.SSLContext:
    settings = TlsSettings(
        tls_ca_file=str(pki.ca_cert),
        tls_cert_file=str(pki.client_cert) if certificate else "",
        tls_key_file=str(pki.client_key) if certificate else "",
    )
    return client_context(settings)


# --------------------------------------------------------------------------- client side


def test_a_missing_or_unpaired_file_is_one_line_naming_the_variable(pki: DevPki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TSUNAGU_TLS_CA_FILE='/nonexistent/ca.crt': no such file"):
        client_context(TlsSettings(tls_ca_file="/nonexistent/ca.crt"))
    with pytest.raises(ConfigError, match="TSUNAGU_TLS_CERT_FILE is set but TSUNAGU_TLS_KEY_FILE is empty"):
        client_context(TlsSettings(tls_cert_file=str(pki.client_cert)))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM CA file"):
        client_context(TlsSettings(tls_ca_file=str(not_pem)))
    with pytest.raises(ConfigError, match="not a usable pair"):
        client_context(TlsSettings(tls_cert_file=str(pki.client_cert), tls_key_file=str(pki.server_key)))


def test_each_dependency_turns_tls_on_from_its_own_address(pki: DevPki) -> None:
    settings = TlsSettings(
        tls_ca_file=str(pki.ca_cert), tls_cert_file=str(pki.client_cert), tls_key_file=str(pki.client_key)
    )
    assert redis_tls("redis://127.0.0.1:6379/0", settings) is None
    assert isinstance(redis_tls("rediss://127.0.0.1:6380/0", settings), ssl.SSLContext)

    assert kafka_config(settings) == {}
    kafka = kafka_config(settings.model_copy(update={"kafka_security_protocol": "SSL"}))
    assert kafka == {
        "security.protocol": "SSL",
        "ssl.ca.location": str(pki.ca_cert),
        "ssl.certificate.location": str(pki.client_cert),
        "ssl.key.location": str(pki.client_key),
        "ssl.endpoint.identification.algorithm": "https",
    }

    assert postgres_ssl("postgresql://u@h/db", settings) is None
    full = postgres_ssl("postgresql://u@h/db?sslmode=verify-full", settings)
    assert full is not None and full.check_hostname and full.verify_mode == ssl.CERT_REQUIRED
    verify_ca = postgres_ssl("postgresql://u@h/db?sslmode=verify-ca", settings)
    assert verify_ca is not None and not verify_ca.check_hostname
    # libpq's `require` without a root certificate only encrypts
    encrypt_only = postgres_ssl("postgresql://u@h/db?sslmode=require", TlsSettings())
    assert encrypt_only is not None and encrypt_only.verify_mode == ssl.CERT_NONE
    # a DSN naming its own files is left to asyncpg
    assert postgres_ssl(f"postgresql://u@h/db?sslmode=verify-full&sslrootcert={pki.ca_cert}", settings) is None


# --------------------------------------------------------------------------- serving


async def whoami(request: Request) -> JSONResponse:
    peer = scope_peer(request.scope)
    return JSONResponse({"scheme": request.url.scheme, "peer": list(peer.names) if peer else None})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    peer = scope_peer(websocket.scope)
    await websocket.send_text(f"hello {peer.common_name if peer else 'anonymous'}")
    with contextlib.suppress(Exception):
        while True:
            await websocket.send_text(await websocket.receive_text())


APP = Starlette(routes=[Route("/whoami", whoami), WebSocketRoute("/echo", echo)])


@contextlib.asynccontextmanager
async def serving_with(server_tls: ServerTls) -> AsyncIterator[int]:
    port = free_port()
    async with serving(APP, port, **uvicorn_options(server_tls)):
        yield port


def server_tls(pki: DevPki, client_auth: str = "optional") -> ServerTls:
    return ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert), client_auth)


async def get(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    async with httpx.AsyncClient(verify=context) as http:
        response = await http.get(f"https://127.0.0.1:{port}/whoami")
    body: dict[str, Any] = response.json()
    return body


async def served_common_name(port: int, context: ssl.SSLContext) -> str:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    peer = writer.get_extra_info("peercert")
    writer.close()
    return next(value for rdn in peer["subject"] for key, value in rdn if key == "commonName")


async def test_https_knows_the_client_certificate_and_plain_http_gets_nowhere(pki: DevPki) -> None:
    async with serving_with(server_tls(pki)) as port:
        assert await get(port, client_tls(pki)) == {
            "scheme": "https",
            "peer": ["spiffe://tsunagu.dev/tsunagu-dev-client", "tsunagu-dev-client"],
        }
        # optional client auth: a client without a certificate is served, as nobody in particular
        assert await get(port, client_tls(pki, certificate=False)) == {"scheme": "https", "peer": None}
        # a client that does not trust our CA refuses the server
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get(port, ssl.create_default_context())
        # plaintext HTTP to the TLS port is not served
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient() as http:
                await http.get(f"http://127.0.0.1:{port}/whoami", timeout=3)
    assert known_peers() == [], "no connection is remembered after it closed"


async def test_required_client_auth_refuses_a_client_without_a_certificate(pki: DevPki) -> None:
    async with serving_with(server_tls(pki, "required")) as port:
        assert (await get(port, client_tls(pki)))["peer"]
        with pytest.raises(httpx.HTTPError):
            await get(port, client_tls(pki, certificate=False))


async def test_a_rotated_certificate_is_served_to_new_clients_while_open_sockets_stay(pki: DevPki) -> None:
    tls = server_tls(pki)
    async with serving_with(tls) as port:
        context = client_tls(pki)
        socket_before = await websockets.connect(f"wss://127.0.0.1:{port}/echo", ssl=context)
        assert await socket_before.recv() == "hello tsunagu-dev-client"
        assert await served_common_name(port, context) == "localhost"

        # a half-written pair (cert file garbage) is not loaded: the old certificate stays
        good_cert = pki.server_cert.read_bytes()
        pki.server_cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
        assert tls.reload_if_changed() is False
        assert await served_common_name(port, context) == "localhost"
        pki.server_cert.write_bytes(good_cert)

        # cert-manager renews: a new certificate for the same names, under another CN here so it shows
        renewed, key = issue(load_ca(pki), "renewed.localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
        write_pair(renewed, key, pki.server_cert, pki.server_key)
        assert tls.reload_if_changed() is True and tls.reloads == 1
        assert tls.reload_if_changed() is False, "unchanged files are not reloaded again"
        assert await served_common_name(port, context) == "renewed.localhost"

        await socket_before.send("still here")
        assert await socket_before.recv() == "still here", "the open socket was not dropped"
        await socket_before.close()


async def test_the_watcher_reloads_by_itself(pki: DevPki) -> None:
    tls = server_tls(pki)
    watcher = asyncio.create_task(tls.watch(0.05))
    try:
        renewed, key = issue(load_ca(pki), "watched.localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
        write_pair(renewed, key, pki.server_cert, pki.server_key)
        async with asyncio.timeout(5):
            while tls.reloads == 0:
                await asyncio.sleep(0.02)
    finally:
        watcher.cancel()


def test_server_settings_without_a_certificate_serve_plain_http(pki: DevPki) -> None:
    assert ServerTls.from_settings(TlsSettings()) is None
    with pytest.raises(ConfigError, match="TSUNAGU_SERVER_TLS_CLIENT_CA_FILE needs"):
        ServerTls.from_settings(TlsSettings(server_tls_client_ca_file=str(pki.ca_cert)))
    with pytest.raises(ConfigError, match="TSUNAGU_SERVER_TLS_KEY_FILE is empty"):
        ServerTls.from_settings(TlsSettings(server_tls_cert_file=str(pki.server_cert)))


async def test_a_stopping_server_does_not_wait_for_idle_keep_alive_clients(pki: DevPki) -> None:
    """An idle TLS client never answers close_notify; the server must not sit out asyncio's 30 s for it."""
    async with httpx.AsyncClient(verify=client_tls(pki)) as http:
        started = asyncio.get_running_loop().time()
        async with serving_with(server_tls(pki)) as port:
            assert (await http.get(f"https://127.0.0.1:{port}/whoami")).status_code == 200
            started = asyncio.get_running_loop().time()
        # left `serving` (the server stopped) while `http` still holds its connection, idle
        assert asyncio.get_running_loop().time() - started < 8
