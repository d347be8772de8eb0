"""Centrifugo's unidirectional transports on a gateway running on the real stack (Redis as the broker):
`curl -N` follows a channel over uni_http_stream and uni_sse, plain and with `--compressed` (gzip, each
push as it is published), the npm `eventsource` package (the WHATWG EventSource) and Chromium's own
EventSource follow one over uni_sse, gzipped as they ask, and, when the stream is cut, reconnect by
themselves with their Last-Event-ID (after the `retry:` delay the gateway sets) and recover exactly what
they missed; a plain WebSocket client follows one over uni_websocket. No SDK anywhere: what a user of
these transports has."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
import websockets

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
API_KEY = "e2e"
JS_DIR = Path(__file__).parent / "js"


def token(user: str, *channels: str) -> str:
    """A connection token whose `subs` claim subscribes its holder to `channels` (server-side)."""
    claims = {"sub": user, "subs": {channel: {} for channel in channels}, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def start_gateway(start_service, real_env, **settings: str):  # type: ignore[no-untyped-def]
    env = {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": API_KEY}
    env.update({f"TSUNAGU_GATEWAY_{name.upper()}": value for name, value in settings.items()})
    return start_service(["serve", "ws-gateway"], env)


async def api(base: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": API_KEY}) as http:
        answer: dict[str, Any] = (await http.post(f"/api/{method}", json=body)).json()
        assert "error" not in answer, answer
        return answer


@asynccontextmanager
async def process(*args: str, cwd: Path | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def pushes_of(proc: asyncio.subprocess.Process, event_stream: bool, count: int) -> list[dict[str, Any]]:
    """The next `count` pushes curl prints (SSE `data:` lines, or ndjson lines); pings skipped."""
    assert proc.stdout is not None
    pushes: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        while len(pushes) < count:
            line = (await proc.stdout.readline()).decode().strip()
            if not line:
                assert proc.returncode is None or pushes, "curl ended"
                continue
            if event_stream:
                if not line.startswith("data: "):
                    continue  # the id: lines
                line = line[len("data: ") :]
            push = json.loads(line)
            if push:
                pushes.append(push)
    return pushes


async def test_curl_follows_a_channel_over_uni_http_stream_and_uni_sse(start_service, real_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gateway = start_gateway(start_service, real_env)
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"uni-{uuid.uuid4().hex[:8]}"
    connect = json.dumps({"token": token("curl-user", channel)})
    stream_url = f"{gateway.base}/connection/uni_http_stream"
    sse_url = f"{gateway.base}/connection/uni_sse?{urlencode({'cf_connect': connect})}"
    heads = tmp_path / "stream.head", tmp_path / "sse.head"
    async with (
        process("curl", "-sN", "-D", str(heads[0]), "-X", "POST", "-d", connect, stream_url) as streamed,
        process("curl", "-sN", "-D", str(heads[1]), sse_url) as sse,
    ):
        for proc, event_stream in ((streamed, False), (sse, True)):
            (first,) = await pushes_of(proc, event_stream, 1)
            assert first["connect"]["subs"][channel]["recoverable"] is True
        for n in range(10):
            await api(gateway.base, "publish", {"channel": channel, "data": {"n": n}})
        for proc, event_stream in ((streamed, False), (sse, True)):
            pushes = await pushes_of(proc, event_stream, 10)
            assert [p["channel"] for p in pushes] == [channel] * 10
            assert [p["pub"]["data"]["n"] for p in pushes] == list(range(10))
            assert [p["pub"]["offset"] for p in pushes] == list(range(1, 11))
        # curl sent no Accept-Encoding: the streams are as they were, not compressed.
        for head in heads:
            assert "content-encoding" not in head.read_text().lower()


async def test_curl_compressed_follows_gzipped_streams_push_by_push(start_service, real_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`curl -N --compressed` asks for gzip and decodes as it reads: every publication (and every ping)
    shows up while the stream goes on, not when it ends."""
    gateway = start_gateway(start_service, real_env, ping_interval="1")
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"uni-{uuid.uuid4().hex[:8]}"
    connect = json.dumps({"token": token("curl-user", channel)})
    stream_url = f"{gateway.base}/connection/uni_http_stream"
    sse_url = f"{gateway.base}/connection/uni_sse?{urlencode({'cf_connect': connect})}"
    heads = tmp_path / "stream.head", tmp_path / "sse.head"
    curl = ("curl", "-sN", "--compressed")
    async with (
        process(*curl, "-D", str(heads[0]), "-X", "POST", "-d", connect, stream_url) as streamed,
        process(*curl, "-D", str(heads[1]), sse_url) as sse,
    ):
        followers = ((streamed, False), (sse, True))
        for proc, event_stream in followers:
            (first,) = await pushes_of(proc, event_stream, 1)
            assert first["connect"]["subs"][channel]["recoverable"] is True
        for head in heads:
            assert "content-encoding: gzip" in head.read_text().lower()
        for n in range(5):
            await api(gateway.base, "publish", {"channel": channel, "data": {"n": n, "symbol": "ACME"}})
            for proc, event_stream in followers:
                (push,) = await pushes_of(proc, event_stream, 1)
                assert push["pub"]["data"]["n"] == n and push["pub"]["offset"] == n + 1
        for proc, _ in followers:  # the pings, through the same compressor
            assert proc.stdout is not None
            async with asyncio.timeout(5):
                while (await proc.stdout.readline()).strip() not in (b"{}", b"data: {}"):
                    pass


@pytest.mark.parametrize("client", ["eventsource", "chromium"])
async def test_an_eventsource_follows_a_channel_and_recovers_what_it_missed_after_a_cut(  # type: ignore[no-untyped-def]
    start_service, real_env, client
) -> None:
    """The npm `eventsource` package, and Chromium's own EventSource in a page of the gateway's origin."""
    gateway = start_gateway(start_service, real_env)
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"uni-{uuid.uuid4().hex[:8]}"
    url = f"{gateway.base}/connection/uni_sse?" + urlencode({"cf_connect": json.dumps({"token": token("es", channel)})})
    if client == "chromium":
        from tsunagu.browser import find_chromium

        chromium = find_chromium()
        if chromium is None:
            pytest.fail("no Chromium: run `python -m tsunagu.browser` (make test does) or set TSUNAGU_CHROMIUM")
        command = ["node", "uni_sse_browser.mjs", url, chromium]
    else:
        command = ["node", "uni_sse_follower.mjs", url]
    async with process(*command, cwd=JS_DIR) as follower:
        assert follower.stdout is not None
        encodings: list[str | None] = []  # each stream's Content-Encoding, as the client saw it

        async def next_line(kind: str) -> dict[str, Any]:
            async with asyncio.timeout(15):
                while True:
                    raw = await follower.stdout.readline()  # type: ignore[union-attr]
                    assert raw, (await follower.stderr.read()).decode()  # type: ignore[union-attr]
                    line: dict[str, Any] = json.loads(raw)
                    if line["type"] == "encoding":
                        encodings.append(line["value"])
                    if line["type"] == kind and not (kind == "push" and line["push"] == {}):
                        return line

        first = (await next_line("push"))["push"]["connect"]
        assert first["subs"][channel]["recoverable"] is True
        received: list[int] = []
        for n in range(3):
            await api(gateway.base, "publish", {"channel": channel, "data": {"n": n}})
            pub = await next_line("push")
            received.append(pub["push"]["pub"]["data"]["n"])
            assert json.loads(pub["lastEventId"])[channel]["offset"] == n + 1
        # The server cuts the stream (a reconnect code); the EventSource sees it end, and while it waits
        # to reconnect, three more are published.
        body = {"user": "es", "disconnect": {"code": 3001, "reason": "cut"}}
        await api(gateway.base, "disconnect", body)
        assert (await next_line("push"))["push"] == {"disconnect": {"code": 3001, "reason": "cut"}}
        await next_line("error")
        for n in range(3, 6):
            await api(gateway.base, "publish", {"channel": channel, "data": {"n": n}})
        again = (await next_line("push"))["push"]["connect"]["subs"][channel]
        assert again["recovered"] is True
        recovered = [p["data"]["n"] for p in again["publications"]]
        assert recovered == [3, 4, 5]
        received += recovered
        await api(gateway.base, "publish", {"channel": channel, "data": {"n": 6}})
        received.append((await next_line("push"))["push"]["pub"]["data"]["n"])
        assert received == list(range(7))
        # Both streams (the first and the reconnect's) came gzipped: the client asked, and decoded them.
        assert encodings == ["gzip", "gzip"]


async def test_an_eventsource_reconnects_after_the_retry_delay_the_gateway_sets(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    """TSUNAGU_GATEWAY_SSE_RETRY_MS: the npm `eventsource` waits 3 s by default before it reconnects; a
    stream that begins with `retry: 300` makes it come back after 0.3 s."""
    gateway = start_gateway(start_service, real_env, sse_retry_ms="300")
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"uni-{uuid.uuid4().hex[:8]}"
    url = f"{gateway.base}/connection/uni_sse?" + urlencode({"cf_connect": json.dumps({"token": token("rt", channel)})})
    async with process("node", "uni_sse_follower.mjs", url, cwd=JS_DIR) as follower:
        assert follower.stdout is not None

        async def until(kind: str) -> float:
            async with asyncio.timeout(15):
                while True:
                    raw = await follower.stdout.readline()  # type: ignore[union-attr]
                    assert raw, (await follower.stderr.read()).decode()  # type: ignore[union-attr]
                    if json.loads(raw)["type"] == kind:
                        return time.monotonic()

        await until("open")
        await api(gateway.base, "disconnect", {"user": "rt", "disconnect": {"code": 3001, "reason": "cut"}})
        cut = await until("error")
        back = await until("open")
        assert 0.25 < back - cut < 1.5, back - cut


async def test_a_plain_websocket_client_follows_a_channel_over_uni_websocket(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    gateway = start_gateway(start_service, real_env)
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"uni-{uuid.uuid4().hex[:8]}"
    url = f"ws://127.0.0.1:{gateway.port}/connection/uni_websocket"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"token": token("ws-user", channel)}))
        connect = json.loads(await asyncio.wait_for(ws.recv(), 10))["connect"]
        epoch = connect["subs"][channel]["epoch"]
        for n in range(5):
            await api(gateway.base, "publish", {"channel": channel, "data": {"n": n}})
        pubs = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(5)]
        assert [p["pub"]["data"]["n"] for p in pubs] == list(range(5))
    await api(gateway.base, "publish", {"channel": channel, "data": {"n": 5}})
    async with websockets.connect(url) as ws:
        position = {"recover": True, "offset": pubs[-1]["pub"]["offset"], "epoch": epoch}
        await ws.send(json.dumps({"token": token("ws-user", channel), "subs": {channel: position}}))
        sub = json.loads(await asyncio.wait_for(ws.recv(), 10))["connect"]["subs"][channel]
        assert sub["recovered"] is True and [p["data"]["n"] for p in sub["publications"]] == [5]
