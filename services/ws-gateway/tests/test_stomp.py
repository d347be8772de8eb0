"""STOMP 1.2 at /stomp: the sans-I/O codec, then a real gateway spoken to frame by frame."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson
import pytest
import websockets
from tsunagu_core.broker import Publication
from tsunagu_ws_gateway.protocol import stomp

from .conftest import API_KEY, make_token, running_gateway

# the codec


def test_parse_frames_heart_beats_escapes_and_bodies() -> None:
    message = (
        b"\n\r\nSEND\ndestination:/topic/chat\\cx\ncontent-length:5\nfoo:1\nfoo:2\n\nab\x00cd\x00\n"
        b"SUBSCRIBE\r\nid:0\r\ndestination:/topic/a\r\n\r\n\x00"
    )
    frames = stomp.parse(message)
    assert frames[:2] == [None, None] and frames[-1] is not None
    send = frames[2]
    assert send is not None and send.command == "SEND"
    assert send.headers == {"destination": "/topic/chat:x", "content-length": "5", "foo": "1"}
    assert send.body == b"ab\x00cd" and frames[3] is None
    assert frames[4] == stomp.Frame("SUBSCRIBE", {"id": "0", "destination": "/topic/a"})
    # CONNECT headers are not unescaped (1.2 says so): a passcode keeps its backslashes.
    connect = stomp.parse(b"CONNECT\naccept-version:1.2\npasscode:a\\b\n\n\x00")[0]
    assert connect is not None and connect.headers["passcode"] == "a\\b"


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (b"HELLO\n\n\x00", "unknown command"),
        (b"SEND\ndestination:/topic/a\n\nno end", "no NUL"),
        (b"SEND\ndestination", "no end"),
        (b"SEND\nnocolon\n\n\x00", "malformed header"),
        (b"SEND\nx:\\t\n\n\x00", "undefined escape"),
        (b"SEND\ncontent-length:9\n\nab\x00", "content-length"),
        (b"SEND\ncontent-length:-1\n\n\x00", "content-length"),
        (b"\xff\xfe\n\n\x00", "not ASCII"),
        (b"SEND\n" + b"h:v\n" * 65 + b"\n\x00", "headers"),
    ],
)
def test_malformed_frames_raise_a_clear_stomp_error(message: bytes, complaint: str) -> None:
    with pytest.raises(stomp.StompError, match=complaint):
        stomp.parse(message)


def test_encoding_publications_and_heart_beat_negotiation() -> None:
    frame = stomp.publication_message("chat:a", Publication(offset=4, data=b'{"n":1}'))
    assert stomp.destination_of(frame) == b"destination:/topic/chat\\ca"
    parsed = stomp.parse(stomp.with_subscription(frame, "sub-0", "7"), server_frames=True)[0]
    assert parsed is not None and parsed.command == "MESSAGE" and parsed.body == b'{"n":1}'
    assert parsed.headers["subscription"] == "sub-0" and parsed.headers["message-id"] == "7"
    assert parsed.headers["destination"] == "/topic/chat:a" and parsed.headers["content-type"] == "application/json"
    assert stomp.content_type(b"\x00\x01") == "application/octet-stream"
    assert stomp.encode("CONNECTED", {"version": "1.2", "x": "a:b"}) == b"CONNECTED\nversion:1.2\nx:a:b\n\n\x00"
    assert stomp.heart_beat("100,0") == (100, 0)
    with pytest.raises(stomp.StompError):
        stomp.heart_beat("a,b")
    assert stomp.negotiate(1000, 0) == 0 and stomp.negotiate(1000, 200) == 1000 and stomp.negotiate(10, 200) == 200
    with pytest.raises(stomp.StompError, match="destination"):
        stomp.channel_of("/queue/x")


# a real gateway


def _frame(command: str, **headers: str) -> str:
    body = headers.pop("body", "")
    lines = [command, *(f"{k.replace('_', '-')}:{v}" for k, v in headers.items())]
    return "\n".join(lines) + "\n\n" + body + "\x00"


async def _next_frame(ws: websockets.ClientConnection) -> stomp.Frame:
    async with asyncio.timeout(5):
        while True:
            message = await ws.recv()
            frames = [f for f in stomp.parse(message, server_frames=True) if f is not None]
            if frames:
                return frames[0]


async def test_connect_subscribe_send_receipts_heart_beats_and_errors() -> None:
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    async with running_gateway(max_channels_per_client=1) as gw:
        url = f"ws://127.0.0.1:{gw.port}/stomp"
        async with websockets.connect(url, subprotocols=[websockets.Subprotocol("v12.stomp")]) as ws:
            assert ws.subprotocol == "v12.stomp"
            token = make_token("ann", ["chat:*"])
            await ws.send(_frame("CONNECT", accept_version="1.1,1.2", host="x", passcode=token, heart_beat="0,1000"))
            connected = await _next_frame(ws)
            assert connected.command == "CONNECTED" and connected.headers["version"] == "1.2"
            assert connected.headers["user-name"] == "ann"
            await ws.send(_frame("SUBSCRIBE", id="s1", destination=f"/topic/{channel}", receipt="r1"))
            assert (await _next_frame(ws)).headers == {"receipt-id": "r1"}
            await ws.send(
                _frame("SEND", destination=f"/topic/{channel}", content_type="application/json", body='{"n":1}')
            )
            await ws.send(
                _frame("SEND", destination=f"/topic/{channel}", content_type="text/plain", body="hi", receipt="r2")
            )
            first = await _next_frame(ws)
            assert first.command == "MESSAGE" and first.body == b'{"n":1}'
            assert first.headers["subscription"] == "s1" and first.headers["destination"] == f"/topic/{channel}"
            assert first.headers["offset"] == "1" and first.headers["message-id"]
            rest = [await _next_frame(ws), await _next_frame(ws)]
            assert {f.command for f in rest} == {"RECEIPT", "MESSAGE"}
            assert next(f for f in rest if f.command == "MESSAGE").body == b'"hi"'  # text is published as a JSON string
            async with httpx.AsyncClient() as http:
                await http.post(
                    f"{gw.http_url}/api/publish", json={"channel": channel, "data": [1]}, headers={"X-API-Key": API_KEY}
                )
            assert (await _next_frame(ws)).body == b"[1]"
            # The server heart-beats at least every second when asked to.
            async with asyncio.timeout(3):
                assert await ws.recv() == "\n"
            # Second subscription: over max_channels_per_client -> ERROR frame, connection closed.
            await ws.send(_frame("SUBSCRIBE", id="s2", destination=f"/topic/{channel}-b", receipt="r3"))
            error = await _next_frame(ws)
            assert error.command == "ERROR" and "limit exceeded" in error.headers["message"]
            assert error.headers["receipt-id"] == "r3"
            with pytest.raises(websockets.ConnectionClosed):
                await _next_frame(ws)

        async with websockets.connect(url) as ws:
            await ws.send(_frame("CONNECT", accept_version="1.2", passcode=make_token("bob", ["chat:*"])))
            assert (await _next_frame(ws)).command == "CONNECTED"
            await ws.send(_frame("SEND", destination="/topic/chat:dialog#zed,yan", body="{}"))
            error = await _next_frame(ws)
            assert error.command == "ERROR" and "permission denied" in error.headers["message"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await _next_frame(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 3507

        async with websockets.connect(url) as ws:
            await ws.send(_frame("CONNECT", accept_version="1.2", passcode=make_token("cy", ["chat:*"])))
            assert (await _next_frame(ws)).command == "CONNECTED"
            await ws.send(_frame("DISCONNECT", receipt="bye"))
            assert (await _next_frame(ws)).headers == {"receipt-id": "bye"}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await _next_frame(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


@pytest.mark.parametrize(
    ("frames", "complaint", "code"),
    [
        ([_frame("SUBSCRIBE", id="1", destination="/topic/a")], "before CONNECT", 3501),
        ([_frame("CONNECT", accept_version="1.2", passcode="junk")], "invalid token", 3500),
        ([_frame("CONNECT", accept_version="1.0", passcode="x")], "1.2", 3501),
        (["GARBAGE\n\n\x00"], "malformed frame", 3501),
        (["x" * 70_000], "too large", 1009),
    ],
)
async def test_refused_frames_get_an_error_frame_then_the_close(frames: list[str], complaint: str, code: int) -> None:
    async with running_gateway() as gw, websockets.connect(f"ws://127.0.0.1:{gw.port}/stomp") as ws:
        for frame in frames:
            await ws.send(frame)
        error = await _next_frame(ws)
        assert error.command == "ERROR" and complaint in error.headers["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await _next_frame(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == code
        assert orjson.dumps(error.headers)  # headers are plain strings
