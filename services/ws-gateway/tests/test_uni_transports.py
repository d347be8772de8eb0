"""Centrifugo's unidirectional transports (uni_sse, uni_http_stream, uni_websocket) against a real gateway:
the connect push first, then the pushes of the server-side subscriptions the token names, recovery from
the position the connect request (or an SSE Last-Event-ID) carries, pings that need no answer, and a
clear status or disconnect push for every bad request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import websockets
from prometheus_client import REGISTRY
from tsunagu_core.broker import MemoryBroker
from tsunagu_core.bus import MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import eventually, free_port, serving
from tsunagu_ws_gateway.app import create_app
from tsunagu_ws_gateway.config import GatewaySettings

from .conftest import API_KEY, SECRET, RunningGateway, make_token, running_gateway


async def publish(gateway: RunningGateway, channel: str, data: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
        answer = await api.post("/api/publish", json={"channel": channel, "data": data})
        result: dict[str, Any] = answer.json()["result"]
        return result


def follows(user: str, *channels: str, **claims: Any) -> str:
    """A token whose `subs` claim subscribes its holder to `channels` (Centrifugo's server-side subs)."""
    return make_token(user, subs={channel: {} for channel in channels}, **claims)


class Stream:
    """The pushes of one unidirectional HTTP response (SSE events or ndjson lines), as they arrive."""

    def __init__(self, response: httpx.Response, event_stream: bool) -> None:
        self.response = response
        self.event_stream = event_stream
        self.lines = response.aiter_lines()
        self.ids: list[str] = []

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                line = await anext(self.lines)
                if not line.strip():
                    continue
                if self.event_stream:
                    if line.startswith("id: "):
                        self.ids.append(line[4:])
                        continue
                    assert line.startswith("data: "), line
                    line = line[6:]
                push: dict[str, Any] = json.loads(line)
                return push

    async def rest(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every push until the server ends the response."""
        pushes = []
        with contextlib.suppress(StopAsyncIteration):
            while True:
                pushes.append(await self.next(timeout))
        return pushes


@contextlib.asynccontextmanager
async def stream(
    gateway: RunningGateway, transport: str, request: dict[str, Any] | None, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    url = f"{gateway.http_url}/connection/{transport}"
    async with httpx.AsyncClient(timeout=10) as client:
        if transport == "uni_sse" and request is not None:
            opened = client.stream("GET", url, params={"cf_connect": json.dumps(request)}, headers=headers)
        else:
            opened = client.stream("POST", url, json=request, headers=headers)
        async with opened as response:
            yield Stream(response, transport == "uni_sse")


@pytest.mark.parametrize("transport", ["uni_sse", "uni_http_stream"])
async def test_a_stream_gets_the_connect_push_then_its_channels_publications_in_order(transport: str) -> None:
    async with running_gateway() as gateway:
        await in_order(gateway, transport)
        # The client went: the gateway noticed, the connection is gone.
        await eventually(
            lambda: REGISTRY.get_sample_value("tsunagu_gateway_uni_connections", {"transport": transport}) == 0
        )


async def in_order(gateway: RunningGateway, transport: str) -> None:
    async with stream(gateway, transport, {"token": follows("ann", "news")}) as s:
        assert s.response.status_code == 200
        kind = s.response.headers["content-type"]
        assert kind.startswith("text/event-stream" if transport == "uni_sse" else "application/x-ndjson")
        connect = (await s.next())["connect"]
        assert connect["client"] and connect["ping"] == 25 and "pong" not in connect
        assert connect["subs"]["news"]["recoverable"] is True
        for n in range(5):
            await publish(gateway, "news", {"n": n})
        pubs = [await s.next() for _ in range(5)]
        assert [p["channel"] for p in pubs] == ["news"] * 5
        assert [p["pub"]["data"]["n"] for p in pubs] == [0, 1, 2, 3, 4]
        assert [p["pub"]["offset"] for p in pubs] == [1, 2, 3, 4, 5]
        assert REGISTRY.get_sample_value("tsunagu_gateway_uni_connections", {"transport": transport}) == 1


@pytest.mark.parametrize("transport", ["uni_sse", "uni_http_stream"])
async def test_a_reconnect_with_its_position_recovers_exactly_what_was_missed(transport: str) -> None:
    async with running_gateway() as gateway:
        token = follows("ann", "news")
        async with stream(gateway, transport, {"token": token}) as s:
            epoch = (await s.next())["connect"]["subs"]["news"]["epoch"]
            await publish(gateway, "news", {"n": 0})
            last = (await s.next())["pub"]["offset"]
        for n in (1, 2, 3):  # while the client is away
            await publish(gateway, "news", {"n": n})
        position = {"recover": True, "offset": last, "epoch": epoch}
        async with stream(gateway, transport, {"token": token, "subs": {"news": position}}) as s:
            sub = (await s.next())["connect"]["subs"]["news"]
            assert sub["recovered"] is True and sub["was_recovering"] is True
            assert [p["data"]["n"] for p in sub["publications"]] == [1, 2, 3]
            await publish(gateway, "news", {"n": 4})
            assert (await s.next())["pub"]["data"] == {"n": 4}
        # A position of another epoch (the stream was lost meanwhile): told so, nothing made up.
        lost = {"recover": True, "offset": 2, "epoch": "not-this-one"}
        async with stream(gateway, transport, {"token": token, "subs": {"news": lost}}) as s:
            sub = (await s.next())["connect"]["subs"]["news"]
            assert sub["was_recovering"] is True and "recovered" not in sub and "publications" not in sub
            assert sub["offset"] == 5 and sub["epoch"] == epoch


async def test_sse_event_ids_carry_the_position_and_last_event_id_recovers_from_it() -> None:
    async with running_gateway() as gateway:
        token = follows("ann", "news", "alerts")
        async with stream(gateway, "uni_sse", {"token": token}) as s:
            await s.next()
            await publish(gateway, "news", {"n": 0})
            await publish(gateway, "alerts", {"a": 0})
            await s.next()
            await s.next()
            last_id = s.ids[-1]
        positions = json.loads(last_id)
        assert positions["news"]["offset"] == 1 and positions["alerts"]["offset"] == 1
        await publish(gateway, "news", {"n": 1})
        await publish(gateway, "alerts", {"a": 1})
        await publish(gateway, "news", {"n": 2})
        # An EventSource reconnects to the same URL (an old position, or none) with the last id it saw.
        stale = {"token": token, "subs": {"news": {"recover": True, "offset": 0, "epoch": positions["news"]["epoch"]}}}
        async with stream(gateway, "uni_sse", stale, headers={"Last-Event-ID": last_id}) as s:
            subs = (await s.next())["connect"]["subs"]
            assert [p["data"] for p in subs["news"]["publications"]] == [{"n": 1}, {"n": 2}]
            assert [p["data"] for p in subs["alerts"]["publications"]] == [{"a": 1}]
            assert json.loads(s.ids[-1]) == {
                "news": {"offset": 3, "epoch": positions["news"]["epoch"]},
                "alerts": {"offset": 2, "epoch": positions["alerts"]["epoch"]},
            }
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                f"{gateway.http_url}/connection/uni_sse",
                params={"cf_connect": json.dumps({"token": token})},
                headers={"Last-Event-ID": "42"},
            )
            assert answer.status_code == 400 and "Last-Event-ID" in answer.text


async def test_bad_requests_get_a_status_and_bad_credentials_a_disconnect_push() -> None:
    async with running_gateway(max_frame_bytes=1024) as gateway, httpx.AsyncClient(timeout=5) as client:
        base = f"{gateway.http_url}/connection"
        answer = await client.get(f"{base}/uni_sse", params={"cf_connect": "{not json"})
        assert answer.status_code == 400 and "not JSON" in answer.text
        answer = await client.post(f"{base}/uni_http_stream", content=b"[1, 2]")
        assert answer.status_code == 400 and "object" in answer.text
        answer = await client.post(f"{base}/uni_http_stream", content=b"{}" + b" " * 2000)
        assert answer.status_code == 413
        assert (await client.get(f"{base}/uni_http_stream")).status_code == 405
        # The stream starts, tells why it ends, and ends (no hang): a bad token, no token, a bad subs field.
        for request, disconnect in (
            ({"token": "not.a.jwt"}, {"code": 3500, "reason": "invalid token"}),
            ({}, {"code": 3501, "reason": "bad request"}),
            (
                {"token": follows("ann", "news"), "subs": {"news": {"recover": "yes"}}},
                {"code": 3501, "reason": "bad request"},
            ),
        ):
            async with stream(gateway, "uni_http_stream", request) as s:
                assert await s.rest() == [{"disconnect": disconnect}]
        expired = follows("ann", "news", ttl=-60)
        async with stream(gateway, "uni_sse", {"token": expired}) as s:
            # (an expired token is error 109 to a bidirectional client: here the disconnect it maps to)
            assert await s.rest() == [{"disconnect": {"code": 3005, "reason": "connection expired"}}]


async def test_a_page_of_an_allowed_origin_may_read_the_stream_and_others_are_refused() -> None:
    async with running_gateway(allowed_origins=["https://app.example"]) as gateway:
        url = f"{gateway.http_url}/connection/uni_http_stream"
        async with httpx.AsyncClient(timeout=5) as client:
            preflight = await client.options(
                url,
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            assert preflight.headers["access-control-allow-headers"] == "content-type"
            evil = {"Origin": "https://evil.example"}
            assert (await client.options(url, headers=evil)).status_code == 403
            refused = await client.post(url, json={"token": follows("ann", "news")}, headers=evil)
            assert refused.status_code == 403 and "not allowed" in refused.text
        allowed = {"Origin": "https://app.example"}
        async with stream(gateway, "uni_http_stream", {"token": follows("ann", "news")}, headers=allowed) as s:
            assert s.response.headers["access-control-allow-origin"] == "https://app.example"
            assert "connect" in await s.next()


async def test_a_server_disconnect_is_a_disconnect_push_and_the_end_of_the_stream() -> None:
    async with running_gateway() as gateway, stream(gateway, "uni_sse", {"token": follows("ann", "news")}) as s:
        await s.next()
        async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
            body = {"user": "ann", "disconnect": {"code": 3503, "reason": "go away"}}
            assert "error" not in (await api.post("/api/disconnect", json=body)).json()
        assert await s.rest() == [{"disconnect": {"code": 3503, "reason": "go away"}}]


@pytest.mark.parametrize("transport", ["uni_sse", "uni_http_stream"])
async def test_a_stopping_server_ends_its_streams_with_a_shutdown_push_at_once(transport: str) -> None:
    async with running_gateway() as gateway, stream(gateway, transport, {"token": follows("ann", "news")}) as s:
        await s.next()
        gateway.server.should_exit = True  # what SIGTERM does (uvicorn itself would wait for the stream)
        async with asyncio.timeout(3):
            assert await s.rest() == [{"disconnect": {"code": 3001, "reason": "shutdown"}}]


async def test_a_stream_that_is_not_read_is_cut_off_and_does_not_delay_others() -> None:
    async with running_gateway(send_buffer_bytes=64 * 1024) as gateway:
        # A client that sends its request, reads the first bytes, and never reads again (tiny buffer).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        body = orjson.dumps({"token": follows("slow", "firehose")})
        head = f"POST /connection/uni_http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        assert b"200 OK" in await asyncio.wait_for(reader.read(1024), 5)
        blob = "x" * 32000  # 16 MB in all: more than the socket buffers between us can hide
        async with stream(gateway, "uni_sse", {"token": follows("fast", "firehose")}) as fast:
            await fast.next()

            async def read_all() -> list[int]:
                return [(await fast.next(timeout=20))["pub"]["data"]["n"] for _ in range(500)]

            reading = asyncio.create_task(read_all())
            async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
                for n in range(500):
                    await api.post("/api/publish", json={"channel": "firehose", "data": {"n": n, "blob": blob}})
            assert await reading == list(range(500))
            slow = {"transport": "uni_http_stream"}
            await eventually(lambda: REGISTRY.get_sample_value("tsunagu_gateway_uni_connections", slow) == 0)
            assert (REGISTRY.get_sample_value("tsunagu_gateway_disconnects_total", {"code": "3008"}) or 0) >= 1
            # ...and its socket is dropped, not left waiting for it to read what was buffered.
            address = sock.getsockname()
            connections = gateway.server.server_state.connections
            await eventually(lambda: all(c.transport.get_extra_info("peername") != address for c in connections))
        writer.transport.abort()


async def test_streams_work_through_asgi_alone_under_another_http_protocol() -> None:
    """Under uvicorn's h11 protocol (no direct socket writes, no shutdown hook) the writer task sends the
    chunks through ASGI: the same pushes, in order, and the end of the stream on a server disconnect."""
    settings = GatewaySettings(token_hmac_secret=SECRET, api_key=API_KEY)
    runtime = Runtime(CoreSettings(node_name="test-node"), bus=MemoryBus(), broker=MemoryBroker())
    port = free_port()
    async with serving(create_app(runtime, settings), port, http="h11") as server:
        gateway = RunningGateway(port, server, runtime.broker)
        for transport in ("uni_sse", "uni_http_stream"):
            async with stream(gateway, transport, {"token": follows("ann", "news")}) as s:
                assert "connect" in await s.next()
                for n in range(3):
                    await publish(gateway, "news", {"n": n})
                assert [(await s.next())["pub"]["data"]["n"] for _ in range(3)] == [0, 1, 2]
                async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
                    await api.post("/api/disconnect", json={"user": "ann"})
                assert await s.rest() == [{"disconnect": {"code": 3503, "reason": "force disconnect"}}]


async def test_unidirectional_clients_are_pinged_and_not_cut_off_for_not_answering() -> None:
    async with (
        running_gateway(ping_interval=1.0, pong_timeout=1.0) as gateway,
        stream(gateway, "uni_http_stream", {"token": follows("ann", "news")}) as s,
    ):
        assert (await s.next())["connect"]["ping"] == 1
        pings = [await s.next(timeout=3) for _ in range(3)]  # past the pong timeout, twice over
        assert pings == [{}, {}, {}]
        await publish(gateway, "news", {"still": "here"})
        assert (await s.next())["pub"]["data"] == {"still": "here"}


async def test_uni_websocket_takes_the_connect_request_as_its_first_message() -> None:
    async with running_gateway() as gateway:
        url = f"ws://127.0.0.1:{gateway.port}/connection/uni_websocket"
        async with websockets.connect(url) as ws:
            await ws.send(orjson.dumps({"token": follows("ann", "news")}).decode())
            connect = orjson.loads(await ws.recv())["connect"]
            assert "news" in connect["subs"]
            await ws.send("anything after the connect request is ignored")
            for n in range(3):
                await publish(gateway, "news", {"n": n})
            # One push per message (Centrifugo's default for uni_websocket).
            pushes = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
            assert [p["pub"]["data"]["n"] for p in pushes] == [0, 1, 2]
        async with websockets.connect(url) as ws:
            await ws.send('{"token": "not.a.jwt"}')
            assert orjson.loads(await ws.recv()) == {"disconnect": {"code": 3500, "reason": "invalid token"}}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 3500
        async with websockets.connect(url) as ws:
            await ws.send("{broken")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501
