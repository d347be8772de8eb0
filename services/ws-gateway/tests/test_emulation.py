"""Centrifugo's bidirectional emulation against a real gateway: `/connection/http_stream` (JSON lines or
varint-delimited protobuf) and `/connection/sse` carry the replies, `POST /emulation` the commands; the
framing is Centrifugo's and every bad request gets a clear status with a message."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from tsunagu_core.testing import eventually
from tsunagu_ws_gateway.core import emulation as routing
from tsunagu_ws_gateway.protocol import protobuf_frames
from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.protocol.emulation_frames import BadEmulation, disconnect_reply, parse_request
from tsunagu_ws_gateway.protocol.wire import centrifuge_client_pb2 as pb

from .conftest import API_KEY, RunningGateway, make_token, running_gateway


class JsonStream:
    """An emulated stream's replies as they arrive: ndjson lines, or SSE `data:` events."""

    def __init__(self, response: httpx.Response, event_stream: bool) -> None:
        self.response = response
        self.event_stream = event_stream
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next reply or push that is not a ping."""
        async with asyncio.timeout(timeout):
            while True:
                line = await anext(self.lines)
                if not line.strip():
                    continue
                if self.event_stream:
                    assert line.startswith("data: "), line
                    line = line[6:]
                reply: dict[str, Any] = json.loads(line)
                if reply:
                    return reply


@contextlib.asynccontextmanager
async def json_stream(
    gateway: RunningGateway, transport: str, commands: list[dict[str, Any]]
) -> AsyncIterator[JsonStream]:
    text = "\n".join(json.dumps(c) for c in commands)
    url = f"{gateway.http_url}/connection/{transport}"
    async with httpx.AsyncClient(timeout=10) as client:
        if transport == "sse":
            opened = client.stream("GET", url, params={"cf_connect": text})
        else:
            opened = client.stream("POST", url, content=text, headers={"content-type": "application/json"})
        async with opened as response:
            yield JsonStream(response, transport == "sse")


async def emulate(gateway: RunningGateway, body: Any, content_type: str = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        return await http.post("/emulation", content=content, headers={"content-type": content_type})


def commands(*items: dict[str, Any]) -> str:
    return "\n".join(json.dumps(c) for c in items)


@pytest.mark.parametrize("transport", ["http_stream", "sse"])
async def test_a_json_client_connects_subscribes_and_publishes_through_emulation(transport: str) -> None:
    async with running_gateway() as gateway:
        connect = {"id": 1, "connect": {"token": make_token("ann", ["chat:*"])}}
        async with json_stream(gateway, transport, [connect]) as stream:
            assert stream.response.status_code == 200
            kind = stream.response.headers["content-type"]
            assert kind.startswith("text/event-stream" if transport == "sse" else "application/x-ndjson")
            reply = await stream.next()
            assert reply["id"] == 1
            result = reply["connect"]
            # What the SDK sends back with every command; it answers pings through emulation too.
            assert result["session"] and result["node"] and result["pong"] is True
            route = {"session": result["session"], "node": result["node"]}
            subscribe = {"id": 2, "subscribe": {"channel": "chat:room", "recover": True}}
            answer = await emulate(gateway, {**route, "data": commands(subscribe)})
            assert answer.status_code == 204 and answer.content == b""
            subscribed = await stream.next()
            assert subscribed["id"] == 2 and subscribed["subscribe"]["recoverable"] is True
            publish = [{"id": 3 + n, "publish": {"channel": "chat:room", "data": {"n": n}}} for n in range(3)]
            assert (await emulate(gateway, {**route, "data": commands(*publish)})).status_code == 204
            seen = [await stream.next() for _ in range(6)]
            pushes = [r["push"]["pub"]["data"]["n"] for r in seen if "push" in r]
            acks = sorted(r["id"] for r in seen if "publish" in r)
            assert pushes == [0, 1, 2] and acks == [3, 4, 5]
            # A pong (`{}`) through emulation is taken, and answered with nothing.
            assert (await emulate(gateway, {**route, "data": "{}"})).status_code == 204


def _delimited_replies(buffer: bytearray) -> list[pb.Reply]:
    replies = []
    while buffer:
        try:
            length, start = protobuf_frames._read_varint(bytes(buffer), 0)
        except Exception:
            break
        if start + length > len(buffer):
            break
        replies.append(pb.Reply.FromString(bytes(buffer[start : start + length])))
        del buffer[: start + length]
    return replies


def _delimited_command(command: pb.Command) -> bytes:
    body = command.SerializeToString()
    return protobuf_frames.varint(len(body)) + body


def _emulation_request(node: str, session: str, data: bytes) -> bytes:
    def field(number: int, value: bytes) -> bytes:
        return protobuf_frames.varint(number << 3 | 2) + protobuf_frames.varint(len(value)) + value

    return field(1, node.encode()) + field(2, session.encode()) + field(3, data)


async def test_a_protobuf_http_stream_is_varint_delimited_both_ways() -> None:
    async with running_gateway() as gateway:
        connect = _delimited_command(pb.Command(id=1, connect=pb.ConnectRequest(token=make_token("bob", ["chat:*"]))))
        headers = {"content-type": "application/octet-stream"}
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "POST", f"{gateway.http_url}/connection/http_stream", content=connect, headers=headers
            ) as response,
        ):
            assert response.status_code == 200
            buffer = bytearray()
            chunks = response.aiter_raw()
            replies: list[pb.Reply] = []

            async def until(count: int) -> None:
                async with asyncio.timeout(5):
                    while len(replies) < count:
                        buffer.extend(await anext(chunks))
                        replies.extend(r for r in _delimited_replies(buffer) if r.ByteSize())

            await until(1)
            result = replies[0].connect
            assert replies[0].id == 1 and result.session and result.node
            data = _delimited_command(pb.Command(id=2, subscribe=pb.SubscribeRequest(channel="chat:bin")))
            data += _delimited_command(
                pb.Command(id=3, publish=pb.PublishRequest(channel="chat:bin", data=b"\x00\x01binary"))
            )
            answer = await emulate(
                gateway, _emulation_request(result.node, result.session, data), headers["content-type"]
            )
            assert answer.status_code == 204
            await until(4)
            assert replies[1].id == 2 and replies[1].HasField("subscribe")
            pubs = [r.push.pub.data for r in replies[2:] if r.HasField("push")]
            assert pubs == [b"\x00\x01binary"]
            # JSON commands for a protobuf session: refused, the session goes on.
            wrong = {"session": result.session, "node": result.node, "data": "{}"}
            answer = await emulate(gateway, wrong)
            assert answer.status_code == 400 and "speaks protobuf" in answer.text


async def test_bad_emulation_requests_get_a_clear_status_and_leave_the_session_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(routing, "ANSWER_WAIT", 0.3)
    async with running_gateway(max_frame_bytes=1024) as gateway:
        connect = {"id": 1, "connect": {"token": make_token("cid", ["chat:*"])}}
        async with json_stream(gateway, "http_stream", [connect]) as stream:
            result = (await stream.next())["connect"]
            route = {"session": result["session"], "node": result["node"]}
            cases: list[tuple[Any, int, str]] = [
                (b"{not json", 400, "not JSON"),
                ([1, 2], 400, "JSON object"),
                ({**route}, 400, "no commands"),
                ({"node": result["node"], "data": "{}"}, 400, "no session"),
                ({**route, "data": {"id": 2}}, 400, "data must be a string"),
                ({**route, "data": "{broken"}, 400, "malformed JSON"),
                ({**route, "data": "[1]"}, 400, "JSON object"),
                (
                    {**route, "data": json.dumps({"id": 2, "publish": {"channel": "chat:x", "data": "x" * 2000}})},
                    413,
                    "larger than",
                ),
                ({**route, "session": "no-such-session", "data": "{}"}, 404, "no session"),
                ({**route, "node": "no-such-node", "data": "{}"}, 404, "no gateway node"),
            ]
            for body, status, message in cases:
                answer = await emulate(gateway, body)
                assert (answer.status_code, message in answer.text) == (status, True), (body, answer.text)
            async with httpx.AsyncClient(base_url=gateway.http_url) as http:
                huge = await http.post("/emulation", content=b"x" * 5000)
                assert huge.status_code == 413 and "larger than" in huge.text
                assert (await http.get("/emulation")).status_code == 405
                assert (await http.post("/connection/http_stream", content=b"")).status_code == 400
                assert (await http.get("/connection/sse")).status_code == 400
                bad_connect = await http.post("/connection/http_stream", content=b"{nope")
                assert bad_connect.status_code == 400 and "malformed JSON" in bad_connect.text
            # None of it touched the session: it still takes commands.
            ok = await emulate(gateway, {**route, "data": commands({"id": 9, "presence_stats": {"channel": "chat:x"}})})
            assert ok.status_code == 204
            assert (await stream.next())["id"] == 9


async def test_the_stream_ends_with_the_native_disconnect_push_and_its_session_is_forgotten() -> None:
    async with running_gateway() as gateway:
        connect = {"id": 1, "connect": {"token": make_token("dan", ["chat:*"])}}
        async with json_stream(gateway, "http_stream", [connect]) as stream:
            result = (await stream.next())["connect"]
            async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
                assert (await api.post("/api/disconnect", json={"user": "dan"})).status_code == 200
            push = await stream.next()
            # The native protocol's push (what centrifuge-js reads), not the unidirectional one.
            assert push == {"push": {"disconnect": {"code": 3503, "reason": "force disconnect"}}}
            route = {"session": result["session"], "node": result["node"], "data": "{}"}
            await eventually(lambda: not gateway_sessions(gateway))
            assert (await emulate(gateway, route)).status_code == 404


def gateway_sessions(gateway: RunningGateway) -> dict[str, Any]:
    app = gateway.server.config.app
    streams: dict[str, Any] = app.state.emulation.streams
    return streams


def test_emulation_request_parsing_and_the_protobuf_disconnect_push() -> None:
    request = parse_request(_emulation_request("n1", "s1", b"\x02\x08\x01"), binary=True)
    assert (request.node, request.session, request.data, request.binary) == ("n1", "s1", b"\x02\x08\x01", True)
    for broken in (b"\x0a\x05ab", b"\x0f", b"\x0a"):
        with pytest.raises(BadEmulation):
            parse_request(broken, binary=True)
    json_request = parse_request(orjson.dumps({"node": "n", "session": "s", "data": '{"id":1}'}), binary=False)
    assert json_request.data == b'{"id":1}'
    shutdown = Disconnect(3001, "shutdown")
    assert orjson.loads(disconnect_reply(shutdown, binary=False)) == {
        "push": {"disconnect": {"code": 3001, "reason": "shutdown"}}
    }
    frame = disconnect_reply(shutdown, binary=True)
    length, start = protobuf_frames._read_varint(frame, 0)
    assert start + length == len(frame)
    # Reply.push (4) > Push.disconnect (11) > code 3001, reason "shutdown"
    assert frame[start:] == b"\x22\x0f\x5a\x0d\x08\xb9\x17\x12\x08shutdown"


async def test_pings_are_answered_through_emulation_or_the_stream_ends_with_no_pong() -> None:
    async with running_gateway(ping_interval=1, pong_timeout=1) as gateway:
        connect = {"id": 1, "connect": {"token": make_token("eve", ["chat:*"])}}
        async with (
            json_stream(gateway, "http_stream", [connect]) as answering,
            json_stream(gateway, "http_stream", [connect]) as silent,
        ):
            result = (await answering.next())["connect"]
            assert (await silent.next())["connect"]["pong"] is True
            route = {"session": result["session"], "node": result["node"], "data": "{}"}
            pings = 0
            async with asyncio.timeout(10):
                while pings < 4:  # four pings, each answered as the SDK does: a `{}` through /emulation
                    line = await anext(answering.lines)
                    if line.strip() == "{}":
                        pings += 1
                        assert (await emulate(gateway, route)).status_code == 204
            # The one that did not answer was cut off meanwhile, telling why; the other is still there.
            async with asyncio.timeout(5):
                while True:
                    line = await anext(silent.lines)
                    if line.strip() and line.strip() != "{}":
                        break
            assert json.loads(line)["push"]["disconnect"]["code"] == 3012
            assert result["session"] in gateway_sessions(gateway)


async def test_pages_of_another_origin_need_an_allowed_origin() -> None:
    async with (
        running_gateway(allowed_origins=["https://app.example"]) as gateway,
        httpx.AsyncClient(base_url=gateway.http_url) as http,
    ):
        preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                     "access-control-request-headers": "content-type"}  # fmt: skip
        for path in ("/emulation", "/connection/http_stream", "/connection/sse"):
            answer = await http.options(path, headers=preflight)
            assert answer.status_code == 204
            assert answer.headers["access-control-allow-origin"] == "https://app.example"
            assert "POST" in answer.headers["access-control-allow-methods"]
        body = {"node": gateway.server.config.app.state.emulation.node.id, "session": "s", "data": "{}"}
        refused = await http.post("/emulation", json=body, headers={"origin": "https://evil.example"})
        assert refused.status_code == 403 and "not allowed" in refused.text
        unknown = await http.post("/emulation", json=body, headers={"origin": "https://app.example"})
        assert unknown.status_code == 404 and unknown.headers["access-control-allow-origin"] == "https://app.example"
