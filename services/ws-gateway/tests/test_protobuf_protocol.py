"""The protobuf flavour (subprotocol `centrifuge-protobuf`): the stock centrifuge-python SDK in protobuf
mode, raw frames checked against the SDK's own copy of the upstream schema, payload interop with JSON
clients, and the generated code being up to date with proto/centrifugal."""

from __future__ import annotations

import asyncio
import base64
import filecmp
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from centrifuge import (
    Client,
    JoinContext,
    LeaveContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)
from centrifuge.exceptions import ReplyError
from centrifuge.protocol import client_pb2 as upstream
from tsunagu_core.broker import ClientInfo, Publication
from tsunagu_ws_gateway.protocol import json_frames, protobuf_frames
from tsunagu_ws_gateway.protocol.codes import ErrorCode, ProtocolError
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.protocol.protobuf_frames import PROTOBUF
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parents[3]
PROTO_DIR = REPO / "proto" / "centrifugal"
WIRE_DIR = REPO / "services" / "ws-gateway" / "src" / "tsunagu_ws_gateway" / "protocol" / "wire"
SUBPROTOCOL = "centrifuge-protobuf"


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.publications: list[Any] = []
        self.subscribed: list[SubscribedContext] = []
        self.joins: list[JoinContext] = []
        self.leaves: list[LeaveContext] = []
        self.arrived = asyncio.Event()

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.publications.append(ctx.pub)
        self.arrived.set()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self.joins.append(ctx)
        self.arrived.set()

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.leaves.append(ctx)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.publications) < count:
                self.arrived.clear()
                await self.arrived.wait()

    @property
    def data(self) -> list[Any]:
        return [p.data for p in self.publications]


# raw frames, encoded and decoded with the SDK's copy of the upstream schema


def delimited(*commands: upstream.Command) -> bytes:
    out = b""
    for command in commands:
        body = command.SerializeToString()
        out += protobuf_frames.varint(len(body)) + body
    return out


def replies(message: bytes | str) -> list[upstream.Reply]:
    assert isinstance(message, bytes), "the protobuf flavour answers in binary messages"
    out, position = [], 0
    while position < len(message):
        length = shift = 0
        while True:
            byte = message[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append(upstream.Reply.FromString(message[position : position + length]))
        position += length
    return out


async def raw_connect(url: str, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url, subprotocols=[SUBPROTOCOL])  # type: ignore[list-item]
    assert ws.subprotocol == SUBPROTOCOL
    await ws.send(delimited(upstream.Command(id=1, connect=upstream.ConnectRequest(token=token))))
    (reply,) = replies(await ws.recv())
    assert reply.id == 1 and reply.HasField("connect") and reply.connect.client, reply
    return ws


async def close_code(ws: websockets.ClientConnection, timeout: float = 5.0) -> int:
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return closed.rcvd.code


# the generated code


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """The committed *_pb2 files are what protoc makes of proto/centrifugal; regenerate with
    `uv run python -m grpc_tools.protoc -Iproto/centrifugal --python_out=WIRE --pyi_out=WIRE
    centrifuge_client.proto` (WIRE: services/ws-gateway/src/tsunagu_ws_gateway/protocol/wire)."""
    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    assert protos
    out = [f"--python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", *out, *protos], check=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in WIRE_DIR.glob("*_pb2.py*"))
    assert generated == committed
    stale = [name for name in generated if not filecmp.cmp(tmp_path / name, WIRE_DIR / name, shallow=False)]
    assert not stale, f"{stale} differ from what proto/centrifugal generates: regenerate them"


# the stock SDK in protobuf mode


async def test_connect_subscribe_publish_and_history(gateway, token) -> None:  # type: ignore[no-untyped-def]
    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]), use_protobuf=True)
    await client.connect()
    inbox = Inbox()
    sub = client.new_subscription("chat:pb", events=inbox)
    await sub.subscribe()
    payloads = [b"\x00\x01binary", b'{"text":"json too"}', "héllo".encode()]
    for payload in payloads:
        await sub.publish(payload)
    await inbox.wait_for(3)
    assert inbox.data == payloads
    assert [p.offset for p in inbox.publications] == [1, 2, 3]
    assert inbox.publications[0].info.user == "ann"
    history = await sub.history(limit=10)
    assert [p.data for p in history.publications] == payloads
    assert history.offset == 3 and history.epoch
    newest = await sub.history(limit=1, reverse=True)
    assert [p.offset for p in newest.publications] == [3]
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (1, 1)
    presence = await sub.presence()
    assert [info.user for info in presence.clients.values()] == ["ann"]
    await client.disconnect()


async def test_missed_publications_are_recovered_after_reconnect(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]), use_protobuf=True)
    await client.connect()
    inbox = Inbox()
    sub = client.new_subscription("chat:pb-recover", events=inbox, recoverable=True)
    await sub.subscribe()
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        await api.post("/api/publish", json={"channel": "chat:pb-recover", "data": {"n": 1}})
        await inbox.wait_for(1)
        await client.disconnect()
        for n in (2, 3, 4):
            reply = (await api.post("/api/publish", json={"channel": "chat:pb-recover", "data": {"n": n}})).json()
            assert reply["result"]["offset"] == n
        await client.connect()
        await inbox.wait_for(4)
        await api.post("/api/publish", json={"channel": "chat:pb-recover", "data": {"n": 5}})
        await inbox.wait_for(5)
    # What the server API published as JSON reaches a protobuf client as that JSON's bytes.
    assert [json.loads(data) for data in inbox.data] == [{"n": n} for n in (1, 2, 3, 4, 5)]
    assert inbox.subscribed[-1].was_recovering and inbox.subscribed[-1].recovered
    await client.disconnect()


async def test_errors_join_and_leave(gateway, token) -> None:  # type: ignore[no-untyped-def]
    watcher = Client(gateway.ws_url, token=token("ann", ["chat:*"]), use_protobuf=True)
    await watcher.connect()
    inbox = Inbox()
    await watcher.new_subscription("chat:pb-room", events=inbox, join_leave=True).subscribe()
    with pytest.raises(ReplyError) as caught:
        await watcher.publish("news", b"not allowed")
    assert caught.value.code == 103
    with pytest.raises(ReplyError) as caught:
        await watcher.publish("chat:pb-room", b"")
    assert caught.value.code == 107
    visitor = Client(gateway.ws_url, token=token("bob", ["chat:*"], info={"name": "Bob"}), use_protobuf=True)
    await visitor.connect()
    await visitor.new_subscription("chat:pb-room").subscribe()
    async with asyncio.timeout(5):
        while len(inbox.joins) < 2:
            await asyncio.sleep(0.01)
    # A subscriber hears its own join first, right after its subscribe reply (as from Centrifugo).
    assert [join.info.user for join in inbox.joins] == ["ann", "bob"]
    assert json.loads(inbox.joins[1].info.conn_info) == {"name": "Bob"}
    await visitor.disconnect()
    async with asyncio.timeout(5):
        while not inbox.leaves:
            await asyncio.sleep(0.01)
    assert inbox.leaves[0].info.user == "bob"
    await watcher.disconnect()


async def test_json_and_protobuf_clients_see_each_others_publications(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    json_client = Client(gateway.ws_url, token=token("jay", ["chat:*"]))
    pb_client = Client(gateway.ws_url, token=token("pat", ["chat:*"]), use_protobuf=True)
    await json_client.connect()
    await pb_client.connect()
    json_inbox, pb_inbox = Inbox(), Inbox()
    json_sub = json_client.new_subscription("chat:mixed", events=json_inbox)
    pb_sub = pb_client.new_subscription("chat:mixed", events=pb_inbox)
    await json_sub.subscribe()
    await pb_sub.subscribe()

    await json_sub.publish({"from": "json", "text": "héllo"})
    await pb_sub.publish(b'{"from": "protobuf",\n "n": [1, 2]}')  # JSON, with a line break in it
    await pb_sub.publish(b"\x00\xffraw")  # not JSON
    await pb_sub.publish(b'"a string"')
    await json_inbox.wait_for(4)
    await pb_inbox.wait_for(4)

    # Protobuf clients get every payload's bytes: a JSON client's publication as its JSON text.
    assert json.loads(pb_inbox.data[0]) == {"from": "json", "text": "héllo"}
    assert pb_inbox.data[1:] == [b'{"from": "protobuf",\n "n": [1, 2]}', b"\x00\xffraw", b'"a string"']
    # JSON clients get JSON payloads as values, and other bytes as a string of their base64.
    assert json_inbox.data == [
        {"from": "json", "text": "héllo"},
        {"from": "protobuf", "n": [1, 2]},
        base64.b64encode(b"\x00\xffraw").decode(),
        "a string",
    ]
    history = await json_sub.history(limit=10)
    assert [p.data for p in history.publications] == json_inbox.data
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        answer = (await api.post("/api/history", json={"channel": "chat:mixed", "limit": 10})).json()
    assert [p["data"] for p in answer["result"]["publications"]] == json_inbox.data
    await json_client.disconnect()
    await pb_client.disconnect()


async def test_a_publication_is_encoded_once_per_flavour(gateway, token, api_key, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = {"json": 0, "protobuf": 0}

    def counting(codec: Any) -> Any:
        encode = codec.publication_push

        def publication_push(channel: str, pub: Publication) -> bytes:
            calls[codec.name] += 1
            return encode(channel, pub)

        return publication_push

    clients, inboxes = [], []
    for n in range(6):
        client = Client(gateway.ws_url, token=token(f"u{n}", ["chat:*"]), use_protobuf=n % 2 == 1)
        await client.connect()
        inbox = Inbox()
        await client.new_subscription("chat:fanout", events=inbox).subscribe()
        clients.append(client)
        inboxes.append(inbox)
    monkeypatch.setattr(JSON, "publication_push", counting(JSON))
    monkeypatch.setattr(PROTOBUF, "publication_push", counting(PROTOBUF))
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        for n in range(3):
            await api.post("/api/publish", json={"channel": "chat:fanout", "data": {"n": n}})
    for inbox in inboxes:
        await inbox.wait_for(3)
    assert calls == {"json": 3, "protobuf": 3}
    assert inboxes[0].data == [{"n": n} for n in range(3)]
    assert [json.loads(d) for d in inboxes[1].data] == [{"n": n} for n in range(3)]
    for client in clients:
        await client.disconnect()


async def test_rpc_data_reaches_backends_as_json(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    seen: list[Any] = []

    def backend(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["data"])
        return httpx.Response(200, json={"echo": body["data"]})

    routes = {name: {"url": f"http://backend/{name}", "allow": "authenticated"} for name in ("echo.this", "echo.raw")}
    async with start_gateway(rpc_routes=routes) as gw:
        gw.server.config.app.state.gateway.rpc._client = httpx.AsyncClient(transport=httpx.MockTransport(backend))
        client = Client(gw.ws_url, token=token("ann", ["chat:*"]), use_protobuf=True)
        await client.connect()
        result = await client.rpc("echo.this", b'{"a": 1}')
        assert json.loads(result.data) == {"echo": {"a": 1}}
        await client.rpc("echo.raw", b"\x01\x02")
        assert seen == [{"a": 1}, base64.b64encode(b"\x01\x02").decode()]
        await client.disconnect()


# raw frames


async def test_several_commands_in_one_frame_and_ping_pong(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(ping_interval=1, pong_timeout=1) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        await ws.send(
            delimited(
                upstream.Command(id=2, subscribe=upstream.SubscribeRequest(channel="chat:raw")),
                upstream.Command(id=3, publish=upstream.PublishRequest(channel="chat:raw", data=b"one")),
                upstream.Command(id=4, history=upstream.HistoryRequest(channel="chat:raw", limit=10)),
                upstream.Command(id=5, ping=upstream.PingRequest()),
            )
        )
        got: dict[int, upstream.Reply] = {}
        pushes: list[upstream.Reply] = []
        pings = 0
        async with asyncio.timeout(5):
            while len(got) < 4 or not pushes or pings < 2:
                for reply in replies(await ws.recv()):
                    if reply.id:
                        got[reply.id] = reply
                    elif reply.HasField("push"):
                        pushes.append(reply)
                    else:
                        assert reply == upstream.Reply(), "a ping is an empty reply"
                        pings += 1
                        await ws.send(delimited(upstream.Command()))  # the pong: an empty command
        assert got[2].subscribe.recoverable and got[2].subscribe.epoch
        assert not got[3].HasField("error") and got[3].HasField("publish")
        assert [p.data for p in got[4].history.publications] == [b"one"]
        assert got[5].HasField("ping")
        assert pushes[0].push.channel == "chat:raw" and pushes[0].push.pub.data == b"one"
        assert pushes[0].push.pub.offset == 1 and pushes[0].push.pub.info.user == "ann"
        # Answering pings keeps the connection (pong timeout 1 s, two pings answered).
        await ws.close()


async def test_client_without_pong_is_closed_with_3012(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(ping_interval=1, pong_timeout=1) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        assert replies(await asyncio.wait_for(ws.recv(), 4)) == [upstream.Reply()]
        assert await close_code(ws, timeout=6) == 3012


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"\x05\x08\x01", id="cut-short"),
        pytest.param(b"\x04\xff\xff\xff\xff", id="garbage"),
        pytest.param(b"\xff\xff\xff\xff\xff\xff", id="length-prefix-too-long"),
        pytest.param(delimited(upstream.Command(id=2)), id="no-method"),
    ],
)
async def test_malformed_frame_closes_with_3501(gateway, token, frame: bytes) -> None:  # type: ignore[no-untyped-def]
    ws = await raw_connect(gateway.ws_url, token("ann", ["chat:*"]))
    await ws.send(frame)
    assert await close_code(ws) == 3501


async def test_command_before_connect_closes_with_3501(gateway) -> None:  # type: ignore[no-untyped-def]
    async with websockets.connect(gateway.ws_url, subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        await ws.send(delimited(upstream.Command(id=1, subscribe=upstream.SubscribeRequest(channel="chat:x"))))
        assert await close_code(ws) == 3501


async def test_oversize_frame_closes_with_1009(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(max_frame_bytes=1024) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        publish = upstream.PublishRequest(channel="chat:x", data=b"x" * 2000)
        await ws.send(delimited(upstream.Command(id=2, publish=publish)))
        assert await close_code(ws) == 1009


async def test_invalid_token_closes_with_3500(gateway) -> None:  # type: ignore[no-untyped-def]
    async with websockets.connect(gateway.ws_url, subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        await ws.send(delimited(upstream.Command(id=1, connect=upstream.ConnectRequest(token="not-a-jwt"))))
        assert await close_code(ws) == 3500


# the codecs without a server


def test_json_data_rule() -> None:
    def rendered(data: bytes) -> bytes:
        return orjson.dumps(json_frames.json_data(data))

    assert rendered(b'{"a":1}') == b'{"a":1}'
    assert rendered(b"") == b"null"
    assert rendered(b"\xff") == b'"/w=="'
    assert rendered(b"[1,\r\n2]") == b"[1,2]"  # no raw line break may reach a newline-delimited frame
    assert rendered('"é"'.encode()) == '"é"'.encode()


def test_protobuf_replies_decode_with_the_upstream_schema() -> None:
    info = ClientInfo(user="ann", client="c1", conn_info=b'{"n":1}', chan_info=b"\x01")
    pub = Publication(data=b"\x00data", offset=7, info=info, tags={"k": "v"})
    connect = {
        "client": "c1",
        "version": "v",
        "ping": 25,
        "pong": True,
        "node": "n",
        "expires": True,
        "ttl": 60,
        "subs": {"chat:a": {"recoverable": True, "epoch": "e", "offset": 7, "publications": [pub]}},
    }
    (reply,) = replies(PROTOBUF.reply(1, "connect", connect))
    assert reply.connect.client == "c1" and reply.connect.ping == 25 and reply.connect.pong
    assert reply.connect.expires and reply.connect.ttl == 60
    assert reply.connect.subs["chat:a"].publications[0].data == b"\x00data"
    assert reply.connect.subs["chat:a"].publications[0].tags == {"k": "v"}
    (reply,) = replies(PROTOBUF.reply(2, "presence", {"presence": {"c1": info}}))
    assert reply.presence.presence["c1"].chan_info == b"\x01"
    (reply,) = replies(PROTOBUF.reply(3, "unsubscribe", {}))
    assert reply.id == 3 and reply.HasField("unsubscribe")
    (reply,) = replies(PROTOBUF.reply(4, "rpc", {"data": {"ok": True}}))
    assert json.loads(reply.rpc.data) == {"ok": True}
    (reply,) = replies(PROTOBUF.error_reply(5, ErrorCode(100, "internal"), temporary=True))
    assert (reply.error.code, reply.error.message, reply.error.temporary) == (100, "internal", True)
    (reply,) = replies(PROTOBUF.subscribe_push("chat:a", {"recoverable": True, "epoch": "e", "offset": 3, "ttl": 5}))
    assert reply.push.subscribe.recoverable and reply.push.subscribe.offset == 3
    (reply,) = replies(PROTOBUF.unsubscribe_push("chat:a", 2000, "server unsubscribe"))
    assert (reply.push.unsubscribe.code, reply.push.unsubscribe.reason) == (2000, "server unsubscribe")
    (reply,) = replies(PROTOBUF.leave_push("chat:a", info))
    assert reply.push.leave.info.user == "ann"
    assert replies(PROTOBUF.ping_frame) == [upstream.Reply()]


def test_protobuf_commands_decode_into_the_json_shape() -> None:
    since = upstream.StreamPosition(offset=2, epoch="e")
    frame = delimited(
        upstream.Command(
            id=1,
            connect=upstream.ConnectRequest(
                token="t", subs={"chat:a": upstream.SubscribeRequest(recover=True, epoch="e", offset=3)}
            ),
        ),
        upstream.Command(id=2, history=upstream.HistoryRequest(channel="c", limit=5, since=since)),
        upstream.Command(),
    )
    assert PROTOBUF.decode_commands(frame, 10) == [
        {"id": 1, "connect": {"token": "t", "subs": {"chat:a": {"recover": True, "epoch": "e", "offset": 3}}}},
        {"id": 2, "history": {"channel": "c", "limit": 5, "since": {"offset": 2, "epoch": "e"}}},
        {"id": 0},
    ]
    with pytest.raises(ProtocolError):
        PROTOBUF.decode_commands(delimited(*[upstream.Command()] * 3), 2)


@pytest.mark.parametrize(
    "pub",
    [
        Publication(data=b"x"),
        Publication(data=b"\x00" * 300, offset=2**40, tags={"k": "v", "ключ": "значение"}),
        Publication(data=b"{}", offset=1, info=ClientInfo(user="ann", client="c1", conn_info=b"{}", chan_info=b"\x01")),
        Publication(data=b"{}", info=ClientInfo()),
    ],
)
def test_the_hand_encoded_publication_push_is_what_the_schema_says(pub: Publication) -> None:
    expected = upstream.Publication(data=pub.data, offset=pub.offset, tags=dict(pub.tags))
    if pub.info is not None:
        expected.info.SetInParent()
        expected.info.MergeFrom(
            upstream.ClientInfo(
                user=pub.info.user, client=pub.info.client, conn_info=pub.info.conn_info, chan_info=pub.info.chan_info
            )
        )
    (reply,) = replies(PROTOBUF.publication_push("chat:é", pub))
    assert reply == upstream.Reply(push=upstream.Push(channel="chat:é", pub=expected))
    assert reply.push.pub.HasField("info") == (pub.info is not None)
