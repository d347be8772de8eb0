"""Tokens signed with auth's rotating Ed25519 keys, verified through a real JWKS endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import jwt
import uvicorn
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class KeyServer:
    """What auth does for the gateway: sign with the newest key, publish every live key at a JWKS URL."""

    def __init__(self) -> None:
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.fetches = 0

    def add_key(self, kid: str) -> None:
        self.keys[kid] = Ed25519PrivateKey.generate()

    def sign(self, kid: str, user: str) -> str:
        claims = {"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}
        return jwt.encode(claims, self.keys[kid], algorithm="EdDSA", headers={"kid": kid})

    async def jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        keys = []
        for kid, private in self.keys.items():
            jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "EdDSA"})
        return JSONResponse({"keys": keys})


@contextlib.asynccontextmanager
async def serve_keys(keys: KeyServer, port: int) -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/.well-known/jwks.json", keys.jwks)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/.well-known/jwks.json"
    finally:
        server.should_exit = True
        await task


async def connect_code(url: str, token: str) -> int | str:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        try:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code
        return "connected" if "connect" in reply else json.dumps(reply)


async def test_rotated_key_is_fetched_on_first_use_and_unknown_kids_are_refused(start_gateway) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    keys = KeyServer()
    keys.add_key("k1")
    async with serve_keys(keys, port) as jwks_url, start_gateway(token_hmac_secret="", token_jwks_url=jwks_url) as gw:
        assert await connect_code(gw.ws_url, keys.sign("k1", "ann")) == "connected"
        keys.add_key("k2")  # auth rotates: the new key is published, then signs
        await asyncio.sleep(5.1)  # past the refetch floor
        assert await connect_code(gw.ws_url, keys.sign("k2", "ann")) == "connected"
        # A kid nobody published: one refetch at most, then 3500.
        stranger = Ed25519PrivateKey.generate()
        forged = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, stranger, "EdDSA", headers={"kid": "k9"})
        assert await connect_code(gw.ws_url, forged) == 3500
        # A token whose kid is known but whose signature is someone else's is refused too.
        wrong = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, stranger, "EdDSA", headers={"kid": "k1"})
        assert await connect_code(gw.ws_url, wrong) == 3500
        fetches = keys.fetches
        for _ in range(5):
            assert await connect_code(gw.ws_url, forged) == 3500
        assert keys.fetches <= fetches + 1, "unknown kids must not make the gateway hammer auth"
