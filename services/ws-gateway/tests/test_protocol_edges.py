"""What a misbehaving, slow or silent client gets, and what the server API does (with `cent`)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import websockets
from cent import AsyncClient, BatchRequest, HistoryRequest, PresenceStatsRequest, PublishRequest
from centrifuge import Client, SubscriptionEventHandler
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.uri import parse_uri


async def raw_connect(url: str, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
    reply = json.loads(await ws.recv())
    assert reply["id"] == 1 and "connect" in reply, reply
    return ws


async def close_code(ws: websockets.ClientConnection, timeout: float = 5.0) -> int:
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return closed.rcvd.code


async def test_malformed_json_closes_with_3501(gateway, token) -> None:  # type: ignore[no-untyped-def]
    ws = await raw_connect(gateway.ws_url, token("ann", ["chat:*"]))
    await ws.send("{not json")
    assert await close_code(ws) == 3501


async def test_command_before_connect_closes_with_3501(gateway) -> None:  # type: ignore[no-untyped-def]
    async with websockets.connect(gateway.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "subscribe": {"channel": "chat:x"}}))
        assert await close_code(ws) == 3501


async def test_oversize_frame_closes_with_1009(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(max_frame_bytes=1024) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        payload = {"id": 2, "publish": {"channel": "chat:x", "data": {"blob": "x" * 2000}}}
        await ws.send(json.dumps(payload))
        assert await close_code(ws) == 1009


async def test_several_commands_in_one_frame_get_their_replies(gateway, token) -> None:  # type: ignore[no-untyped-def]
    ws = await raw_connect(gateway.ws_url, token("ann", ["chat:*"]))
    frame = "\n".join(
        json.dumps(c)
        for c in (
            {"id": 2, "subscribe": {"channel": "chat:multi"}},
            {"id": 3, "publish": {"channel": "chat:multi", "data": {"n": 1}, "idempotency_key": "k1"}},
            {"id": 4, "publish": {"channel": "chat:multi", "data": {"n": 1}, "idempotency_key": "k1"}},
            {"id": 5, "history": {"channel": "chat:multi", "limit": 10}},
        )
    )
    await ws.send(frame)
    replies: dict[int, dict] = {}
    async with asyncio.timeout(5):
        while len(replies) < 4:
            for line in (await ws.recv()).split("\n"):
                message = json.loads(line)
                if message.get("id"):
                    replies[message["id"]] = message
    assert replies[3]["publish"]["offset"] == 1
    # The same idempotency key is applied once and acknowledged with the original offset.
    assert replies[4]["publish"]["offset"] == 1
    assert [p["data"] for p in replies[5]["history"]["publications"]] == [{"n": 1}]
    await ws.close()


async def test_client_without_pong_is_closed_with_3012(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(ping_interval=1, pong_timeout=1) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        assert json.loads(await asyncio.wait_for(ws.recv(), 4)) == {}
        assert await close_code(ws, timeout=6) == 3012


async def test_client_that_answers_pings_stays(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(ping_interval=1, pong_timeout=1) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        for _ in range(3):
            assert json.loads(await asyncio.wait_for(ws.recv(), 4)) == {}
            await ws.send("{}")
        await ws.send(json.dumps({"id": 9, "ping": {}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 4))["id"] == 9
        await ws.close()


class NonReadingClient:
    """A client that connects and subscribes, then never reads its socket again (with a tiny receive buffer)."""

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.url = url

    async def open(self, token: str, channel: str) -> None:
        uri = parse_uri(self.url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        await self._until_replies(0)
        for command in ({"id": 1, "connect": {"token": token}}, {"id": 2, "subscribe": {"channel": channel}}):
            self.protocol.send_text(json.dumps(command).encode())
            self._flush()
            await self._until_replies(1)

    def _flush(self) -> None:
        self.writer.write(b"".join(self.protocol.data_to_send()))

    async def _until_replies(self, count: int) -> None:
        seen = 0
        while True:
            self.protocol.receive_data(await self.reader.read(65536))
            events = self.protocol.events_received()
            seen += sum(1 for e in events if not isinstance(e, Response))
            if any(isinstance(e, Response) for e in events) or seen >= count:
                return

    def abort(self) -> None:
        self.writer.transport.abort()


async def test_slow_client_is_cut_off_and_does_not_delay_others(start_gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(send_buffer_bytes=64 * 1024) as gw:
        slow = NonReadingClient(gw.ws_url)
        await slow.open(token("slow", ["chat:*"]), "chat:firehose")
        fast = Client(gw.ws_url, token=token("fast", ["chat:*"]))
        received: list[int] = []

        class Count(SubscriptionEventHandler):
            async def on_publication(self, ctx) -> None:  # type: ignore[no-untyped-def]
                received.append(ctx.pub.data["n"])

        await fast.connect()
        await fast.new_subscription("chat:firehose", events=Count()).subscribe()
        blob = "x" * 32000  # 16 MB in all: more than the socket buffers between us can hide
        async with httpx.AsyncClient(base_url=gw.http_url, headers={"X-API-Key": api_key}) as api:
            for n in range(500):
                await api.post("/api/publish", json={"channel": "chat:firehose", "data": {"n": n, "blob": blob}})
            async with asyncio.timeout(10):
                while len(received) < 500:
                    await asyncio.sleep(0.02)
            metrics = (await api.get("/metrics")).text
        assert received == list(range(500))
        assert 'tsunagu_gateway_disconnects_total{code="3008"}' in metrics
        await fast.disconnect()
        slow.abort()


async def test_cent_publishes_and_reads_history_and_presence(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]))
    await client.connect()
    got: list[dict] = []

    class Collect(SubscriptionEventHandler):
        async def on_publication(self, ctx) -> None:  # type: ignore[no-untyped-def]
            got.append(ctx.pub.data)

    await client.new_subscription("chat:cent", events=Collect()).subscribe()
    cent = AsyncClient(f"{gateway.http_url}/api", api_key)
    result = await cent.publish(PublishRequest(channel="chat:cent", data={"price": 101.5}))
    assert result.offset == 1 and result.epoch
    history = await cent.history(HistoryRequest(channel="chat:cent", limit=5))
    assert [p.data for p in history.publications] == [{"price": 101.5}]
    stats = await cent.presence_stats(PresenceStatsRequest(channel="chat:cent"))
    assert (stats.num_clients, stats.num_users) == (1, 1)
    batch = await cent.batch(BatchRequest(requests=[PublishRequest(channel="chat:cent", data={"price": 102})]))
    assert batch.replies[0].offset == 2
    async with asyncio.timeout(5):
        while len(got) < 2:
            await asyncio.sleep(0.01)
    assert got == [{"price": 101.5}, {"price": 102}]
    await cent.close()
    await client.disconnect()


async def test_server_api_refuses_a_wrong_key(gateway) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=gateway.http_url) as api:
        response = await api.post("/api/publish", json={"channel": "chat:x", "data": 1}, headers={"X-API-Key": "no"})
        assert response.status_code == 401
        bad = await api.post("/api/publish", content=b"{", headers={"X-API-Key": "test-api-key"})
        assert bad.status_code == 400


async def test_api_disconnect_closes_the_users_connections(gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    ws = await raw_connect(gateway.ws_url, token("mallory", ["chat:*"]))
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": api_key}) as api:
        # The control channel goes live on the node's first heartbeat tick.
        await asyncio.sleep(1.2)
        reply = (await api.post("/api/disconnect", json={"user": "mallory"})).json()
        assert reply == {"result": {}}
    assert await close_code(ws) == 3503


@pytest.mark.parametrize("anonymous", [False, True])
async def test_connecting_without_a_token(start_gateway, anonymous) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(allow_anonymous=anonymous) as gw, websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        if anonymous:
            assert "connect" in json.loads(await ws.recv())
        else:
            assert await close_code(ws) == 3501  # no token with anonymous off: bad request, as Centrifugo


async def test_presence_of_a_long_lived_subscriber_is_renewed(start_gateway, token, api_key) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(presence_ttl=2) as gw:
        ws = await raw_connect(gw.ws_url, token("ann", ["chat:*"]))
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": "chat:presence"}}))
        await asyncio.wait_for(ws.recv(), 3)
        async with httpx.AsyncClient(base_url=gw.http_url, headers={"X-API-Key": api_key}) as api:
            await asyncio.sleep(4.5)  # more than twice the TTL
            stats = (await api.post("/api/presence_stats", json={"channel": "chat:presence"})).json()
            assert stats == {"result": {"num_clients": 1, "num_users": 1}}
            await ws.close()
            await asyncio.sleep(0.3)
            stats = (await api.post("/api/presence_stats", json={"channel": "chat:presence"})).json()
            assert stats == {"result": {"num_clients": 0, "num_users": 0}}


async def test_publish_rpc_acknowledges_with_the_offset_through_a_stock_sdk(gateway, token) -> None:  # type: ignore[no-untyped-def]
    """`$publish` is how an offline queue on a stock SDK learns its offsets: same key, same offset, applied once."""
    client = Client(gateway.ws_url, token=token("ann", ["chat:*"]))
    await client.connect()
    entry = {"channel": "chat:rpc-publish", "data": {"text": "hi"}, "idempotency_key": "q-1"}
    first = await client.rpc("$publish", entry)
    again = await client.rpc("$publish", entry)
    other = await client.rpc("$publish", {**entry, "idempotency_key": "q-2"})
    assert first.data["offset"] == again.data["offset"] == 1 and first.data["epoch"]
    assert other.data["offset"] == 2
    history = await client.history("chat:rpc-publish", limit=10)
    assert [p.data for p in history.publications] == [{"text": "hi"}, {"text": "hi"}]
    with pytest.raises(Exception, match="permission denied"):
        await client.rpc("$publish", {"channel": "ledger-free", "data": {}})
    with pytest.raises(Exception, match="bad request"):
        await client.rpc("$publish", {"channel": "chat:rpc-publish"})
    await client.disconnect()
