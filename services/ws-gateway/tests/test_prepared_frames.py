"""Fan-out through prepared frames (transports/frames.py, transports/server.py): subscribers that negotiated
different framings (JSON or protobuf, permessage-deflate or not) on one channel each get every publication
of a burst once and in order, compressed ones without a context kept across messages, and what was
queued before a server-side disconnect still reaches the client ahead of the close frame."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from centrifuge.protocol import client_pb2 as upstream
from google.protobuf.internal.decoder import _DecodeVarint  # type: ignore[attr-defined]
from tsunagu_ws_gateway.protocol import protobuf_frames
from tsunagu_ws_gateway.transports.frames import framing_for
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

PUBLICATIONS = 200


async def json_subscriber(url: str, token: str, channel: str, *, compressed: bool) -> websockets.ClientConnection:
    ws = await websockets.connect(url, compression="deflate" if compressed else None)
    await ws.send(
        json.dumps({"id": 1, "connect": {"token": token}})
        + "\n"
        + json.dumps({"id": 2, "subscribe": {"channel": channel}})
    )
    answered: set[int] = set()
    while answered != {1, 2}:
        for line in str(await ws.recv()).split("\n"):
            reply = json.loads(line)
            assert "error" not in reply, reply
            answered.add(reply["id"])
    return ws


async def protobuf_subscriber(url: str, token: str, channel: str, *, compressed: bool) -> websockets.ClientConnection:
    ws = await websockets.connect(
        url, subprotocols=["centrifuge-protobuf"], compression="deflate" if compressed else None
    )  # type: ignore[list-item]
    commands = [
        upstream.Command(id=1, connect=upstream.ConnectRequest(token=token)),
        upstream.Command(id=2, subscribe=upstream.SubscribeRequest(channel=channel)),
    ]
    await ws.send(b"".join(protobuf_frames.varint(c.ByteSize()) + c.SerializeToString() for c in commands))
    answered: set[int] = set()
    while answered != {1, 2}:
        for reply in protobuf_replies(await ws.recv()):
            assert not reply.HasField("error"), reply
            answered.add(reply.id)
    return ws


def protobuf_replies(message: bytes | str) -> list[Any]:
    assert isinstance(message, bytes), "the protobuf flavour sends binary messages"
    replies, position = [], 0
    while position < len(message):
        length, position = _DecodeVarint(message, position)
        replies.append(upstream.Reply.FromString(message[position : position + length]))
        position += length
    return replies


def numbers_in(message: bytes | str) -> list[int]:
    """The `n` of every publication push in one message, whichever flavour it is."""
    if isinstance(message, str):
        pushes = [json.loads(line).get("push", {}) for line in message.split("\n")]
        return [push["pub"]["data"]["n"] for push in pushes if "pub" in push]
    return [json.loads(r.push.pub.data)["n"] for r in protobuf_replies(message) if r.push.HasField("pub")]


async def collect(ws: websockets.ClientConnection, count: int) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(15):
        while len(got) < count:
            got += numbers_in(await ws.recv())
    return got


async def test_every_framing_gets_every_publication_once_and_in_order(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    channel = "chat:prepared-mixed"
    url, tok = gateway.ws_url, token("ann", ["chat:*"])
    subscribers = {
        "json": await json_subscriber(url, tok, channel, compressed=False),
        "json+deflate": await json_subscriber(url, tok, channel, compressed=True),
        "protobuf": await protobuf_subscriber(url, tok, channel, compressed=False),
        "protobuf+deflate": await protobuf_subscriber(url, tok, channel, compressed=True),
    }
    for name, ws in subscribers.items():
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        if name.endswith("deflate"):
            # each message compressed on its own: one compressed frame serves every such subscriber
            assert "permessage-deflate" in extensions and "server_no_context_takeover" in extensions, extensions
        else:
            assert extensions == "", extensions
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        for start in range(0, PUBLICATIONS, 20):  # bursts: several publications queued in one loop iteration
            commands = [
                {"publish": {"channel": channel, "data": {"n": n, "text": "x" * 150}}} for n in range(start, start + 20)
            ]
            response = await api.post("/api/batch", json={"commands": commands})
            assert response.status_code == 200, response.text
    received = {name: await collect(ws, PUBLICATIONS) for name, ws in subscribers.items()}
    for name, numbers in received.items():
        assert numbers == list(range(PUBLICATIONS)), f"{name}: {numbers[:10]}..."
    for ws in subscribers.values():
        await ws.close()


async def test_what_was_queued_goes_out_before_a_server_disconnect(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    channel = "chat:prepared-close"
    ws = await json_subscriber(gateway.ws_url, token("bob", ["chat:*"]), channel, compressed=False)
    commands: list[dict[str, Any]] = [{"publish": {"channel": channel, "data": {"n": n}}} for n in range(50)]
    commands.append({"disconnect": {"user": "bob", "disconnect": {"code": 4321, "reason": "bye"}}})
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        response = await api.post("/api/batch", json={"commands": commands})
        assert response.status_code == 200, response.text
    got: list[int] = []
    async with asyncio.timeout(10):
        try:
            while True:
                got += numbers_in(await ws.recv())
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 4321, closed
    assert got == list(range(50))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("binary", [False, True])
def test_uncompressed_frames_are_what_websockets_would_send(size: int, binary: bool) -> None:
    payload = b"y" * size
    framing = framing_for(binary, [])
    expected = Frame(Opcode.BINARY if binary else Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert framing.frame(payload) == expected
    assert framing.frame(payload) is framing.frame(payload)  # prepared once for every subscriber
    assert framing.frame_once(payload) == expected
