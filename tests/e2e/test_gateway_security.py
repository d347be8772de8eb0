"""The gateway's collab findings (issue 21) with the collab service behind it (memory mode: gateway and
collab in one process, as tests/e2e/test_collab.py runs them): forced logout, the server API's disconnect
and token expiry reach open `/collab` sockets; awareness floods, oversized messages and a document
past its size cap are refused, and the gateway stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from pycrdt import Doc, Text
from tsunagu_collab.app import create_app as collab_app
from tsunagu_collab.config import CollabSettings
from tsunagu_core import topics
from tsunagu_core.broker import MemoryBroker
from tsunagu_core.bus import MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import free_port, serving
from tsunagu_core.wire.events_pb2 import Revocation
from tsunagu_ws_gateway.app import create_app as gateway_app
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.protocol import yprotocol as yp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SECRET = "e2e-gateway-security-secret-long-enough"
API_KEY = "e2e-security"


def token(user: str, ttl: float = 600, **claims: Any) -> str:
    body = {"sub": user, "channels": ["collab:*"], "exp": int(time.time() + ttl), "iat": int(time.time()), **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


@dataclass
class Platform:
    runtime: Runtime
    gateway: Any
    url: str
    http: str


@contextlib.asynccontextmanager
async def platform(**settings: Any) -> AsyncIterator[Platform]:
    collab_port, gateway_port = free_port(), free_port()
    runtime = Runtime(CoreSettings(node_name="security-e2e"), bus=MemoryBus(), broker=MemoryBroker())
    collab = collab_app(runtime, CollabSettings())
    options = {"token_hmac_secret": SECRET, "api_key": API_KEY, "collab_url": f"http://127.0.0.1:{collab_port}"}
    gateway = gateway_app(runtime, GatewaySettings(**{**options, **settings}))
    async with serving(collab, collab_port), serving(gateway, gateway_port):
        yield Platform(runtime, gateway, f"ws://127.0.0.1:{gateway_port}/collab", f"http://127.0.0.1:{gateway_port}")


async def opened(url: str) -> ClientConnection:
    websocket = await connect(url, max_size=None)
    first = await asyncio.wait_for(websocket.recv(), 10)
    assert isinstance(first, bytes) and first[:2] == b"\x00\x00", first  # SyncStep1: the document is open
    return websocket


async def close_code(websocket: ClientConnection, timeout: float = 10) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await websocket.recv()
    return websocket.close_code


async def test_revocation_disconnect_and_expiry_close_open_collab_sockets() -> None:
    async with platform(pong_timeout=1) as p:
        revoked = await opened(f"{p.url}/doc-a?token={token('alice', sid='s-stolen')}")
        kicked = await opened(f"{p.url}/doc-a?token={token('bob')}")
        expiring = await opened(f"{p.url}/doc-b?token={token('carol', ttl=1)}")
        revocation = Revocation(scope=Revocation.SESSION, value="s-stolen", reason="stolen laptop", actor="admin")
        await publish_event(
            p.runtime.bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="alice", source="test"
        )
        async with httpx.AsyncClient(base_url=p.http, headers={"X-API-Key": API_KEY}) as api:
            assert (await api.post("/api/disconnect", json={"user": "bob"})).json() == {"result": {}}
        assert await close_code(revoked) == 3500
        assert await close_code(kicked) == 3503
        assert await close_code(expiring) == 3005  # exp passed (plus the grace) without a new token
        # and the revoked token cannot come back
        again = await connect(f"{p.url}/doc-a?token={token('alice', sid='s-stolen')}")
        assert await close_code(again) == 4401 and "revoked" in str(again.close_reason)
        registry = p.gateway.state.gateway.registry
        assert not registry.clients


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_awareness_floods_are_refused_and_memory_stays_bounded() -> None:
    async with platform() as p:
        url = f"{p.url}/flood?token={token('mallory')}"
        before = rss_bytes()
        # 60 KB states: refused at the first (4413)
        big = await opened(url)
        state = json.dumps({"user": {"name": "x" * 60_000}})
        await big.send(yp.awareness_message(yp.encode_awareness([yp.AwarenessEntry(1, 1, state)])))
        assert await close_code(big) == 4413
        # 1,500 fake client ids: the fifth is refused (4400), whatever follows is never read
        fake = await opened(url)
        small = json.dumps({"user": {"name": "m"}})
        with contextlib.suppress(ConnectionClosed):
            for client in range(1, 1501):
                await fake.send(yp.awareness_message(yp.encode_awareness([yp.AwarenessEntry(client, 1, small)])))
        assert await close_code(fake) == 4400
        assert "awareness clients" in str(fake.close_reason)
        state_of_doc = p.gateway.state.collab.docs.get("flood")
        assert state_of_doc is None or len(state_of_doc.awareness) <= 4
        # a 16 MiB message is not read whole: the server's frame limit ends it (1009) or collab's (4413)
        huge = await opened(url)
        with contextlib.suppress(ConnectionClosed):
            await huge.send(yp.sync_update(b"\x00" * (16 * 1024 * 1024)))
        assert await close_code(huge) in (1009, 4413)
        assert rss_bytes() - before < 64 * 1024 * 1024
        # the gateway still serves the document
        ok = await opened(url)
        await ok.close()


async def test_a_document_stops_growing_at_its_cap() -> None:
    async with platform(collab_max_document_bytes=32 * 1024) as p:
        writer = await opened(f"{p.url}/capped?token={token('alice')}")
        ydoc = Doc()
        text = ydoc.get("text", type=Text)
        updates: list[bytes] = []
        ydoc.observe(lambda event: updates.append(event.update))
        denied = b""
        for _ in range(20):  # 20 x 4 KB: past the 32 KB cap
            text += "x" * 4096
            await writer.send(yp.sync_update(updates.pop()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while not denied:
                    message = await writer.recv()
                    if isinstance(message, bytes) and message[:1] == bytes((yp.MESSAGE_AUTH,)):
                        denied = message
        assert b"size limit" in denied
        assert writer.close_code is None  # told once, still connected (no reconnect-and-resend loop)
        await writer.close()
        # what collab stored stays under the cap
        async with httpx.AsyncClient() as http:
            collab_url = p.gateway.state.settings.collab_url
            body = (await http.get(f"{collab_url}/v1/docs/capped")).json()
        assert len(body["content"]["text"]) <= 32 * 1024


@pytest.mark.parametrize("origin", ["https://evil.example"])
async def test_collab_checks_the_origin(origin: str) -> None:
    async with platform() as p:
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{p.url}/doc?token={token('alice')}", additional_headers={"Origin": origin})
        assert refused.value.response.status_code == 403
