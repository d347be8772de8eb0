"""`/collab/{doc}` refuses what it must before any document is opened, each with a close code and reason."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def closed_with(url: str) -> tuple[int | None, str | None]:
    async with connect(url) as websocket:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await websocket.recv()
        return websocket.close_code, websocket.close_reason


async def test_tokens_permissions_doc_ids_and_an_unreachable_collab(
    start_gateway: Any, token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSUNAGU_GATEWAY_COLLAB_URL", f"http://127.0.0.1:{free_port()}")
    async with start_gateway() as gateway:
        base = f"ws://127.0.0.1:{gateway.port}/collab"
        code, reason = await closed_with(f"{base}/notes")
        assert code == 4401 and reason and "token is required" in reason
        code, reason = await closed_with(f"{base}/notes?token=not-a-jwt")
        assert code == 4401 and reason and "invalid token" in reason
        code, reason = await closed_with(f"{base}/notes?token={token('ann', ['chat:*'])}")
        assert (code, reason) == (4403, "no read permission for collab:notes")
        code, reason = await closed_with(f"{base}/x.awareness?token={token('ann', ['collab:*'])}")
        assert (code, reason) == (4400, "invalid document id")
        # allowed, but collab does not answer: 4503, which stock clients retry
        code, reason = await closed_with(f"{base}/notes?token={token('ann', ['collab:*'])}")
        assert code == 4503 and reason and "collab did not answer" in reason
        assert not gateway.server.config.app.state.collab.docs
