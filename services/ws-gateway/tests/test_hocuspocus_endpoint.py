"""`/collab` with Hocuspocus framing refuses documents one by one (the socket stays open for the others)
and closes on a malformed frame with a code and reason; collab is not running here (documents that pass
every check end with 4503). Editing against collab, with stock providers: tests/e2e/test_collab.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
from tsunagu_ws_gateway.protocol import hocuspocus as hp
from tsunagu_ws_gateway.protocol import yprotocol as yp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def receive(websocket: ClientConnection) -> bytes:
    async with asyncio.timeout(10):
        frame = await websocket.recv()
    assert isinstance(frame, bytes)
    return frame


async def closed(websocket: ClientConnection) -> tuple[int | None, str | None, list[bytes]]:
    """Wait for the close; the frames that came before it."""
    frames: list[bytes] = []
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(15):
            while True:
                frames.append(await websocket.recv())  # type: ignore[arg-type]
    return websocket.close_code, websocket.close_reason, frames


async def test_documents_are_refused_one_at_a_time(
    start_gateway: Any, token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSUNAGU_GATEWAY_COLLAB_URL", f"http://127.0.0.1:{free_port()}")
    ann = token("ann", ["collab:notes-*"])
    async with start_gateway(collab_max_documents_per_connection=2) as gateway:
        async with connect(f"ws://127.0.0.1:{gateway.port}/collab") as websocket:
            # the token is fine (it makes the socket's session), the document is not one of its grants
            await websocket.send(hp.auth_token("secret", ann))
            assert await receive(websocket) == hp.permission_denied("secret", "no read permission for collab:secret")
            # messages for the refused document are dropped, nothing comes back
            await websocket.send(hp.prefix("secret") + yp.sync_step1(b"\x00"))
            await websocket.send(hp.auth_token("notes-bad", "not-a-jwt"))
            denied = await receive(websocket)
            assert denied.startswith(hp.prefix("notes-bad") + b"\x02\x01") and b"unauthorized: invalid token" in denied
            await websocket.send(hp.auth_token("notes-bob", token("bob", ["collab:*"])))
            assert await receive(websocket) == hp.permission_denied(
                "notes-bob", "unauthorized: the token is another user's than the connection's"
            )
            await websocket.send(hp.auth_token("notes.awareness", ann))
            assert await receive(websocket) == hp.permission_denied("notes.awareness", "invalid document name")
            # without an auth message a document uses the connection's token: the one that admitted it
            await websocket.send(hp.prefix("locked") + yp.sync_step1(b"\x00"))
            assert await receive(websocket) == hp.permission_denied("locked", "no read permission for collab:locked")

            # two documents that pass: authenticated read-write, then opened (collab does not answer, so they
            # wait); a third is one too many for this socket
            await websocket.send(hp.auth_token("notes-1", ann))
            assert await receive(websocket) == hp.authenticated("notes-1", read_only=False)
            # a refused document may be asked for again with a new auth message
            await websocket.send(hp.auth_token("notes-bad", ann))
            assert await receive(websocket) == hp.authenticated("notes-bad", read_only=False)
            await websocket.send(hp.auth_token("notes-3", ann))
            assert await receive(websocket) == hp.permission_denied(
                "notes-3", "more than 2 documents on one connection"
            )
            code, reason, frames = await closed(websocket)
            assert code == yp.CLOSE_UNAVAILABLE and reason and "collab did not answer" in reason
            assert frames == []
        assert not gateway.server.config.app.state.collab.docs


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x09abc", "no document name"),
        (b"\x05notes\x09", "document 'notes': unknown message type 9"),
        (b"\x05notes\x00\x02\x05ab", "document 'notes': truncated payload"),
        (b"\x05notes\x02\x01\x02no", "document 'notes': a client sends auth messages of type 0"),
        ("text", "Hocuspocus messages are binary"),
    ],
)
async def test_a_malformed_frame_closes_with_4400_and_why(
    start_gateway: Any, token: Callable[..., str], frame: bytes | str, reason: str
) -> None:
    async with start_gateway() as gateway, connect(f"ws://127.0.0.1:{gateway.port}/collab") as websocket:
        await websocket.send(hp.auth_token("secret", token("ann", ["chat:*"])))
        assert await receive(websocket) == hp.permission_denied("secret", "no read permission for collab:secret")
        await websocket.send(frame)
        code, closed_reason, _ = await closed(websocket)
        assert code == yp.CLOSE_BAD_MESSAGE and closed_reason and closed_reason.startswith(reason), closed_reason


async def test_a_socket_that_opens_no_document_goes_stale(start_gateway: Any, token: Callable[..., str]) -> None:
    async with start_gateway(connect_timeout=1.0) as gateway:
        async with connect(f"ws://127.0.0.1:{gateway.port}/collab") as websocket:
            code, reason, _ = await closed(websocket)
            assert code == 3502, reason
        # a refused document does not admit the socket either
        async with connect(f"ws://127.0.0.1:{gateway.port}/collab") as websocket:
            await websocket.send(hp.auth_token("notes", "not-a-jwt"))
            code, reason, frames = await closed(websocket)
            assert code == 3502 and len(frames) == 1 and b"invalid token" in frames[0]


async def test_the_token_may_come_in_the_url(start_gateway: Any, token: Callable[..., str]) -> None:
    """A provider without `token` sends no auth message: its documents use `?token=` (`parameters`)."""
    async with start_gateway() as gateway:
        base = f"ws://127.0.0.1:{gateway.port}/collab"
        async with connect(f"{base}?token=not-a-jwt") as websocket:
            await websocket.send(hp.prefix("notes") + yp.sync_step1(b"\x00"))
            denied = await receive(websocket)
            assert denied.startswith(hp.prefix("notes") + b"\x02\x01") and b"unauthorized: invalid token" in denied
        async with connect(f"{base}?token={token('ann', ['chat:*'])}") as websocket:
            await websocket.send(hp.prefix("notes") + yp.sync_step1(b"\x00"))
            assert await receive(websocket) == hp.permission_denied("notes", "no read permission for collab:notes")
