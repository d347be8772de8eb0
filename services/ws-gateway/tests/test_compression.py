"""Compression against a real gateway: gzip on the unidirectional HTTP streams for a client whose
`Accept-Encoding` takes it (each push decodable as soon as it is sent, pings too; nothing changes for a
client that does not ask, nor with the switch off), the SSE `retry:` field, and permessage-deflate
negotiated for WebSocket clients that offer it, with the window bounded both ways, and not otherwise.

The HTTP client here is a bare socket: the test sees the bytes on the wire (the chunks, the gzip member)
and sends exactly the headers it means to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from tsunagu_ws_gateway.transports.stream_encoding import accepts_gzip
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory, PerMessageDeflate

from .conftest import API_KEY, RunningGateway, make_token, running_gateway


def follows(user: str, *channels: str) -> str:
    return make_token(user, subs={channel: {} for channel in channels})


async def publish(gateway: RunningGateway, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
        answer = await api.post("/api/publish", json={"channel": channel, "data": data})
        assert "result" in answer.json(), answer.text


class RawStream:
    """One streamed response read off the socket: its headers, then its body as the chunks arrive, decoded
    (gzip, when the response says so) with nothing but what has arrived so far."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        self.reader = reader
        self.headers = headers
        self.gzip = headers.get("content-encoding") == "gzip"
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.raw = b""  # the body's bytes as sent (compressed or not)
        self.text = b""  # what they decode to, not read yet
        self.decoded = b""  # all they decoded to
        self.done = False

    async def chunk(self) -> None:
        size = int((await self.reader.readline()).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        if size == 0:
            self.done = True
            return
        self.raw += data[:-2]
        text = self.inflater.decompress(data[:-2]) if self.gzip else data[:-2]
        self.decoded += text
        self.text += text

    async def pushes(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next `count` pushes (SSE `data:` or ndjson lines, pings included) decoded from what arrived."""
        found: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while len(found) < count:
                line, sep, rest = self.text.partition(b"\n")
                if not sep:
                    assert not self.done, "the stream ended"
                    await self.chunk()
                    continue
                self.text = rest
                line = line.strip()
                if line.startswith(b"data: "):
                    line = line[6:]
                elif not line or line.startswith((b"id: ", b"retry: ")):
                    continue
                found.append(json.loads(line))
        return found


@contextlib.asynccontextmanager
async def raw_stream(
    gateway: RunningGateway, transport: str, request: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[RawStream]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    body = json.dumps(request).encode()
    if transport == "uni_sse":
        head = f"GET /connection/uni_sse?{urlencode({'cf_connect': body.decode()})} HTTP/1.1\r\n"
        body = b""
    else:
        head = f"POST /connection/{transport} HTTP/1.1\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"{head}host: 127.0.0.1\r\n\r\n".encode() + body)
    try:
        async with asyncio.timeout(5):
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            response_headers: dict[str, str] = {}
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                response_headers[name.strip().lower()] = value.strip()
        assert response_headers.get("transfer-encoding") == "chunked"
        yield RawStream(reader, response_headers)
    finally:
        writer.close()


@pytest.mark.parametrize("transport", ["uni_sse", "uni_http_stream"])
async def test_a_stream_is_gzipped_for_a_client_that_asks_and_every_push_arrives_at_once(transport: str) -> None:
    async with (
        running_gateway(ping_interval=0.5) as gateway,
        raw_stream(gateway, transport, {"token": follows("ann", "news")}, {"accept-encoding": "gzip, br"}) as s,
    ):
        assert s.headers["content-encoding"] == "gzip" and "accept-encoding" in s.headers["vary"]
        assert (await s.pushes(1))[0]["connect"]["subs"]["news"]["recoverable"] is True
        # Live: each publication decodes from the bytes sent so far, before the next one is published.
        for n in range(5):
            await publish(gateway, "news", {"n": n, "symbol": "ACME", "price": 1000 + n})
            pushes = [p for p in await s.pushes(1) if p]
            while not pushes:  # a ping came first
                pushes = [p for p in await s.pushes(1) if p]
            assert pushes[0]["pub"]["data"]["n"] == n
        # Pings flow through the compressor as well.
        assert {} in await s.pushes(2, timeout=3)
        assert s.raw[:2] == b"\x1f\x8b"  # a gzip member, not plain text
        assert len(s.raw) < len(s.decoded)


@pytest.mark.parametrize(
    "headers", [{}, {"accept-encoding": "identity"}, {"accept-encoding": "gzip;q=0, *"}, {"accept-encoding": "br"}]
)
async def test_a_stream_is_plain_for_a_client_that_does_not_take_gzip(headers: dict[str, str]) -> None:
    async with (
        running_gateway() as gateway,
        raw_stream(gateway, "uni_sse", {"token": follows("ann", "news")}, headers) as s,
    ):
        assert "content-encoding" not in s.headers
        assert "connect" in (await s.pushes(1))[0]
        await publish(gateway, "news", {"n": 1})
        assert (await s.pushes(1))[0]["pub"]["data"] == {"n": 1}
        assert s.raw.startswith(b"\r\nid: ")  # the stream as before: the first line, then the connect event


async def test_the_switch_turns_gzip_off() -> None:
    async with (
        running_gateway(http_stream_gzip=False) as gateway,
        raw_stream(gateway, "uni_http_stream", {"token": follows("ann", "news")}, {"accept-encoding": "gzip"}) as s,
    ):
        assert "content-encoding" not in s.headers
        assert "connect" in (await s.pushes(1))[0]
        assert s.raw.startswith(b'{"connect"')


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_sse_streams_begin_with_the_retry_field_when_one_is_set(encoding: str) -> None:
    async with running_gateway(sse_retry_ms=750) as gateway:
        request = {"token": follows("ann", "news")}
        async with raw_stream(gateway, "uni_sse", request, {"accept-encoding": encoding}) as s:
            await s.pushes(1)
            assert s.gzip is (encoding == "gzip")
            # Before the first event, so an EventSource knows it before it could need it.
            assert s.decoded.startswith(b"\r\nretry: 750\n\n") and b"data: " in s.decoded
    async with (
        running_gateway() as gateway,
        raw_stream(gateway, "uni_sse", {"token": follows("ann", "news")}, {}) as s,
    ):
        await s.pushes(1)
        assert b"retry:" not in s.decoded


def test_accept_encoding_is_read_as_rfc_9110_says() -> None:
    def takes(value: str) -> bool:
        return accepts_gzip([(b"accept-encoding", value.encode())])

    assert takes("gzip") and takes("gzip, deflate, br, zstd") and takes("GZIP;q=0.5") and takes("*")
    assert takes("br;q=1.0, gzip;q=0.8, *;q=0.1") and takes("x-gzip")
    assert not takes("identity") and not takes("br") and not takes("gzip;q=0") and not takes("*;q=0")
    assert not takes("gzip;q=0, *") and not takes("gzip;q=bogus") and not takes("")
    assert not accepts_gzip([(b"user-agent", b"gzip")])


# permessage-deflate


async def negotiated(gateway: RunningGateway, offer: ClientPerMessageDeflateFactory | None) -> PerMessageDeflate | None:
    """What a client offering `offer` (None: no compression) gets, after a round trip it decodes."""
    extensions = [offer] if offer is not None else None
    async with websockets.connect(gateway.ws_url, compression=None, extensions=extensions) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": make_token("ann")}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["connect"]["client"]
        await ws.send(json.dumps({"id": 2, "rpc": {"method": "nope"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["id"] == 2
        deflates = [e for e in ws.protocol.extensions if isinstance(e, PerMessageDeflate)]
        return deflates[0] if deflates else None


def offer(**parameters: Any) -> ClientPerMessageDeflateFactory:
    return ClientPerMessageDeflateFactory(**{"client_max_window_bits": True, **parameters})


async def test_permessage_deflate_is_negotiated_for_a_client_that_offers_it_with_bounded_windows() -> None:
    async with running_gateway() as gateway:
        deflate = await negotiated(gateway, offer())
        assert deflate is not None
        # Our side: no context kept and a 4 KiB window; the client's side: told to use 12 bits at most.
        assert deflate.remote_no_context_takeover is True  # (the client's view: the server's context)
        assert deflate.remote_max_window_bits == 12 and deflate.local_max_window_bits == 12
        # A client asking for a smaller window than ours gets it.
        deflate = await negotiated(gateway, offer(server_max_window_bits=10, client_max_window_bits=9))
        assert deflate is not None and deflate.remote_max_window_bits == 10 and deflate.local_max_window_bits == 9
        assert await negotiated(gateway, None) is None
        # A client that does not let the server bound its window (no client_max_window_bits) goes uncompressed.
        assert await negotiated(gateway, ClientPerMessageDeflateFactory(client_max_window_bits=None)) is None
    async with running_gateway(ws_deflate_window_bits=10) as gateway:
        deflate = await negotiated(gateway, offer())
        assert deflate is not None and deflate.remote_max_window_bits == 10 and deflate.local_max_window_bits == 10


async def test_the_switch_turns_permessage_deflate_off() -> None:
    async with running_gateway(ws_per_message_deflate=False) as gateway:
        assert await negotiated(gateway, offer()) is None
