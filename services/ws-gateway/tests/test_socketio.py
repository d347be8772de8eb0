"""Socket.IO at /socket.io/: auth refusals, rooms as channels, permissions, emits with acks, recovery
offsets, binary payloads and server-side emits, with python-socketio's own client."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import socketio
from tsunagu_core.broker import Publication
from tsunagu_ws_gateway.protocols.socketio import decode_offset, encode_offset, event_of, render

from .conftest import make_token, running_gateway


def test_offsets_and_rendering() -> None:
    positions = {"sio:lobby": ("e1", 7), "sio:a.b#1": ("e2", 3)}
    assert decode_offset(encode_offset(positions)) == positions
    frame = render("sio:lobby", Publication(orjson.dumps({"event": "chat", "args": [1, "x"]}), offset=4, epoch="ep"))
    assert frame.split(b"\x00") == [b"sio:lobby", b"ep", b"4", b"", b'2["chat",1,"x"']
    frame = render("sio:lobby", Publication(b'{"native": true}', offset=5, epoch="ep"))
    assert frame.endswith(b'2["message",{"native":true}')
    assert event_of({"event": "e", "args": [], "volatile": True}) == ("e", [], True)


async def _client(port: int, token: str | None, transports: list[str] | None = None) -> socketio.AsyncClient:
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(
        f"http://127.0.0.1:{port}",
        auth={"token": token} if token is not None else None,
        transports=transports or ["websocket"],
        wait_timeout=5,
    )
    return client


@pytest.mark.asyncio
async def test_refusals_and_connect_errors() -> None:
    async with running_gateway() as gw:
        for token, complaint in ((None, "token is required"), ("not-a-jwt", "invalid token")):
            client = socketio.AsyncClient(reconnection=False)
            errors: list[Any] = []
            client.on("connect_error", errors.append)
            with pytest.raises(socketio.exceptions.ConnectionError) as caught:
                await client.connect(
                    f"http://127.0.0.1:{gw.port}",
                    auth={"token": token} if token else None,
                    transports=["websocket"],
                    wait_timeout=5,
                )
            assert "failed to connect" in str(caught.value).lower()
            assert complaint in str(errors[0]).lower()


@pytest.mark.asyncio
async def test_rooms_emits_acks_permissions_binary_and_server_emits() -> None:
    async with running_gateway() as gw:
        alice = await _client(gw.port, make_token("alice", ["sio:*"]))
        # bob may read lobby but not publish anywhere else than his own rooms; long-polling first
        bob = await _client(gw.port, make_token("bob", ["sio:lobby"]))
        got: list[tuple[Any, ...]] = []
        bob.on("chat", lambda *args: got.append(args))
        try:
            assert await alice.call("join", "lobby", timeout=5) == {"ok": True, "room": "lobby"}
            assert await bob.call("join", "lobby", timeout=5) == {"ok": True, "room": "lobby"}
            denied = await bob.call("join", "secret", timeout=5)
            assert "permission denied" in denied["error"]
            assert "room" in (await alice.call("emit", {"event": "x"}, timeout=5))["error"]

            acks = [
                await alice.call("emit", {"room": "lobby", "event": "chat", "args": [n, "hi"]}, timeout=5)
                for n in range(3)
            ]
            assert [a["offset"] for a in acks] == [1, 2, 3] and all(a["epoch"] for a in acks)
            dup = await alice.call("emit", {"room": "lobby", "event": "chat", "args": [2], "key": "k"}, timeout=5)
            again = await alice.call("emit", {"room": "lobby", "event": "chat", "args": [2], "key": "k"}, timeout=5)
            assert dup["offset"] == again["offset"] == 4  # idempotent: published once
            await alice.emit("emit", {"room": "lobby", "event": "chat", "args": [b"\x00\x01bin"]})
            for _ in range(200):
                if len(got) >= 5:
                    break
                await asyncio.sleep(0.02)
            assert [g[0] for g in got[:4]] == [0, 1, 2, 2]
            assert got[4][0] == b"\x00\x01bin"
            # the last argument is the recovery offset: every room of the socket with its position
            assert decode_offset(got[4][-1])["sio:lobby"][1] == 5

            # server-side emit through the manager goes to the channel (and so to every replica)
            mount = next(r for r in gw.server.config.app.routes if getattr(r, "path", "") == "/socket.io")
            server = (await mount.app.app()).app.engineio_server  # behind the gate: our AsyncServer and its manager
            await server.emit("chat", "from-api", room="lobby")
            for _ in range(200):
                if len(got) >= 6:
                    break
                await asyncio.sleep(0.02)
            assert got[5][0] == "from-api"

            assert await bob.call("leave", "lobby", timeout=5) == {"ok": True, "room": "lobby"}
            await alice.call("emit", {"room": "lobby", "event": "chat", "args": ["after-leave"]}, timeout=5)
            await asyncio.sleep(0.2)
            assert len(got) == 6
            forbidden = await bob.call("emit", {"room": "other", "event": "chat", "args": []}, timeout=5)
            assert "permission denied" in forbidden["error"]
        finally:
            await alice.disconnect()
            await bob.disconnect()


@pytest.mark.asyncio
async def test_long_polling_clients_join_emit_and_receive() -> None:
    # A short ping interval: the polling client's disconnect waits for its pending poll to return.
    async with running_gateway(ping_interval=0.5, pong_timeout=2) as gw:
        poller = await _client(gw.port, make_token("pat", ["sio:*"]), ["polling"])
        got: list[Any] = []
        poller.on("news", lambda *args: got.append(args[0]))
        try:
            assert await poller.call("join", "poll", timeout=5) == {"ok": True, "room": "poll"}
            ack = await poller.call("emit", {"room": "poll", "event": "news", "args": ["hello"]}, timeout=5)
            assert ack["offset"] == 1
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.02)
            assert got == ["hello"]
        finally:
            await poller.disconnect()


@pytest.mark.asyncio
async def test_server_api_joins_a_users_sockets_to_a_room() -> None:
    """A backend puts every socket of a user into a room with POST /api/subscribe (cluster-wide, as for
    native clients); the socket then gets the room's events without having asked to join."""
    import httpx

    from .conftest import API_KEY

    async with running_gateway() as gw:
        carol = await _client(gw.port, make_token("carol", ["sio:*"]))
        got: list[tuple[Any, ...]] = []
        carol.on("news", lambda *args: got.append(args))
        node = gw.server.config.app.state.gateway.node
        try:
            async with httpx.AsyncClient(base_url=gw.http_url, headers={"X-API-Key": API_KEY}) as api:
                reply = await api.post("/api/subscribe", json={"user": "carol", "channel": "sio:briefing"})
                assert reply.json() == {"result": {}}, reply.text
                for _ in range(100):
                    if "sio:briefing" in node.channels:
                        break
                    await asyncio.sleep(0.02)
                data = {"event": "news", "args": ["joined by the backend"]}
                reply = await api.post("/api/publish", json={"channel": "sio:briefing", "data": data})
                assert "result" in reply.json(), reply.text
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.02)
            assert got and got[0][0] == "joined by the backend"
            assert decode_offset(got[0][-1])["sio:briefing"][1] == 1, "the room is part of its recovery offset"
        finally:
            await carol.disconnect()
