"""Forced logout: a revocation on the bus closes the connections it covers and refuses their tokens."""

from __future__ import annotations

import asyncio
import json
import time

import websockets
from tsunagu_core import topics
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import Revocation


async def connect(url: str, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert "connect" in reply, reply
    return ws


async def closed_with(ws: websockets.ClientConnection, timeout: float = 3.0) -> tuple[int, str]:
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None
        return closed.rcvd.code, closed.rcvd.reason


async def test_revoking_a_session_closes_it_and_refuses_its_token(gateway, token) -> None:  # type: ignore[no-untyped-def]
    bus = gateway.server.config.app.state.runtime.bus
    victim_token = token("mallory", ["chat:*"], sid="s-1", iat=int(time.time()) - 5)
    other_token = token("mallory", ["chat:*"], sid="s-2", iat=int(time.time()) - 5)
    victim = await connect(gateway.ws_url, victim_token)
    other = await connect(gateway.ws_url, other_token)
    revocation = Revocation(scope=Revocation.SESSION, value="s-1", reason="stolen laptop", actor="admin")
    await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="mallory", source="test")
    assert await closed_with(victim) == (3500, "token revoked")
    await other.send(json.dumps({"id": 2, "ping": {}}))
    assert json.loads(await asyncio.wait_for(other.recv(), 3))["id"] == 2, "another session of the user stays"
    retry = await websockets.connect(gateway.ws_url)
    await retry.send(json.dumps({"id": 1, "connect": {"token": victim_token}}))
    assert await closed_with(retry) == (3500, "token revoked")
    await other.close()


async def test_revoking_a_user_covers_tokens_issued_before_it_only(gateway, token) -> None:  # type: ignore[no-untyped-def]
    bus = gateway.server.config.app.state.runtime.bus
    old = await connect(gateway.ws_url, token("bob", ["chat:*"], sid="a", iat=int(time.time()) - 60))
    cutoff_ms = int(time.time() * 1000) - 1000
    revocation = Revocation(scope=Revocation.USER, value="bob", issued_before_unix_ms=cutoff_ms)
    await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="bob", source="test")
    assert await closed_with(old) == (3500, "token revoked")
    fresh = await connect(gateway.ws_url, token("bob", ["chat:*"], sid="b", iat=int(time.time())))
    await fresh.close()


async def test_a_silent_revocation_store_asks_the_client_to_come_back_rather_than_letting_it_in() -> None:
    import pytest
    from tsunagu_core.revocation_store import MemoryRevocationStore, TokenIdentity
    from tsunagu_ws_gateway.protocol.codes import ProtocolError
    from tsunagu_ws_gateway.revocations import RevocationList
    from tsunagu_ws_gateway.tokens import ConnectionGrant

    class SilentStore(MemoryRevocationStore):
        async def revoked(self, token: TokenIdentity) -> bool:
            await asyncio.sleep(60)
            return False

    revoked = RevocationList(store=SilentStore(), store_timeout=0.05)
    with pytest.raises(ProtocolError) as refused:
        await revoked.refuses(ConnectionGrant(user="ann", session_id="s-1"))
    assert (refused.value.disconnect.code, refused.value.disconnect.reconnect) == (3004, True)
    answering = RevocationList(store=MemoryRevocationStore(), store_timeout=0.05)
    assert await answering.refuses(ConnectionGrant(user="ann", session_id="s-1")) is False
