"""Bidirectional emulation on the real stack (Redis as the broker), with the stock centrifuge-js SDK in
Chromium: one client per transport (websocket, http_stream, sse) chatting in one channel; WebSockets
refused by a proxy, the SDK falling back to http_stream by itself; emulation requests landing on another
replica than the stream's (forwarded over Redis); and a recovery across a gateway restart on http_stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
API_KEY = "e2e"
JS_DIR = Path(__file__).parent / "js"


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def chromium() -> str:
    from tsunagu.browser import find_chromium

    path = find_chromium()
    if path is None:
        pytest.fail("no Chromium: run `python -m tsunagu.browser` (make test does) or set TSUNAGU_CHROMIUM")
    return path


def gateway_env(real_env: dict[str, str]) -> dict[str, str]:
    return {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": API_KEY}


def endpoints(base: str) -> dict[str, dict[str, str]]:
    ws = base.replace("http://", "ws://")
    return {
        "websocket": {"transport": "websocket", "endpoint": f"{ws}/connection/websocket"},
        "http_stream": {"transport": "http_stream", "endpoint": f"{base}/connection/http_stream"},
        "sse": {"transport": "sse", "endpoint": f"{base}/connection/sse"},
    }


async def publish(base: str, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": API_KEY}) as api:
        answer = (await api.post("/api/publish", json={"channel": channel, "data": data})).json()
        assert "error" not in answer, answer


@asynccontextmanager
async def node(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        "node", script, *args, cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def line_of(proc: asyncio.subprocess.Process, timeout: float = 60.0) -> dict[str, Any]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not raw:
        assert proc.stderr is not None
        raise AssertionError(f"{proc} ended: {(await proc.stderr.read()).decode()[-3000:]}")
    line: dict[str, Any] = json.loads(raw)
    return line


async def summary_of(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    while True:
        line = await line_of(proc)
        if "summary" in line:
            summary: dict[str, Any] = line["summary"]
            return summary


@asynccontextmanager
async def proxy(
    pick_port: Any, target: int, emulation_target: int | None = None
) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """js/refusing_proxy.mjs: (its base URL, the requests it has passed so far)."""
    port = pick_port()
    args = [str(port), f"127.0.0.1:{target}"]
    if emulation_target is not None:
        args.append(f"127.0.0.1:{emulation_target}")
    async with node("refusing_proxy.mjs", *args) as proc:
        assert (await line_of(proc, 10)) == {"listening": port}
        seen: list[dict[str, Any]] = []

        async def record() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                seen.append(json.loads(raw))

        recording = asyncio.create_task(record())
        try:
            yield f"http://127.0.0.1:{port}", seen
        finally:
            recording.cancel()


def chat(base: str, channel: str, clients: list[dict[str, Any]], protobuf: bool = False) -> str:
    config = {"base": base, "chromium": chromium(), "channel": channel, "mode": "chat", "clients": clients}
    return json.dumps({**config, "protobuf": protobuf})


def assert_chat(summary: dict[str, Any], per_client: int) -> None:
    """Every client got every publication, all in one order, each sender's in the order it sent them."""
    assert summary["failure"] is None, summary
    assert summary["pageErrors"] == [], summary["pageErrors"]
    names = [c["name"] for c in summary["clients"]]
    orders = [[(p["from"], p["n"]) for p in c["received"]] for c in summary["clients"]]
    assert all(order == orders[0] for order in orders), orders
    assert sorted(orders[0]) == sorted((name, n) for name in names for n in range(per_client))
    for name in names:
        assert [n for sender, n in orders[0] if sender == name] == list(range(per_client))
    offsets = [p["offset"] for p in summary["clients"][0]["received"]]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


@pytest.mark.parametrize("wire_format", ["json", "protobuf"])
async def test_one_client_per_transport_chats_in_one_channel(start_service, real_env, wire_format) -> None:  # type: ignore[no-untyped-def]
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"chat:emul{uuid.uuid4().hex[:8]}"
    ends = endpoints(gateway.base)
    # SSE is JSON only (an EventSource reads text); protobuf streams are varint-delimited replies.
    names = ("websocket", "http_stream", "sse") if wire_format == "json" else ("websocket", "http_stream")
    clients = [{"name": name, "token": token(name), "transports": [ends[name]], "publish": 10} for name in names]
    async with node("emulation_chat.mjs", chat(gateway.base, channel, clients, wire_format == "protobuf")) as proc:
        summary = await summary_of(proc)
    assert_chat(summary, 10)
    # Each on the transport it was given: the http_stream and sse clients published through /emulation.
    assert [c["transports"] for c in summary["clients"]] == [[name] for name in names]
    assert all(c["disconnects"] == [] for c in summary["clients"]), summary["clients"]


async def test_websockets_refused_by_a_proxy_the_sdk_falls_back_to_http_stream(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"chat:fallback{uuid.uuid4().hex[:8]}"
    async with proxy(pick_port, gateway.port) as (base, seen):
        ends = endpoints(base)
        # What a web app configures: WebSocket first, then the emulated transports.
        transports = [ends["websocket"], ends["http_stream"], ends["sse"]]
        clients = [
            {"name": name, "token": token(name), "transports": transports, "publish": 5} for name in ("ann", "bob")
        ]
        async with node("emulation_chat.mjs", chat(base, channel, clients)) as proc:
            summary = await summary_of(proc)
    assert_chat(summary, 5)
    assert [c["transports"] for c in summary["clients"]] == [["http_stream"], ["http_stream"]]
    # The SDK did try the WebSocket first, and the proxy refused it.
    assert [s["status"] for s in seen if s["method"] == "UPGRADE"][:2] == [403, 403]
    assert all(any("websocket" in e for e in c["errors"]) for c in summary["clients"]), summary["clients"]
    emulated = [s for s in seen if s["path"] == "/emulation"]
    assert emulated and {s["status"] for s in emulated} == {204}


async def test_emulation_requests_reaching_another_replica_are_carried_to_the_session(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    env = gateway_env(real_env)
    first = start_service(["serve", "ws-gateway"], env)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(first.wait_ready)
    await asyncio.to_thread(second.wait_ready)
    channel = f"chat:replicas{uuid.uuid4().hex[:8]}"
    # A balancer without sticky sessions: every stream on the first replica, every command on the second.
    async with proxy(pick_port, first.port, second.port) as (base, seen):
        ends = endpoints(base)
        clients = [
            {"name": name, "token": token(name), "transports": [ends[name]], "publish": 10}
            for name in ("http_stream", "sse")
        ]
        async with node("emulation_chat.mjs", chat(base, channel, clients)) as proc:
            summary = await summary_of(proc)
    assert_chat(summary, 10)
    streams = {s["to"] for s in seen if s["path"].startswith("/connection/")}
    emulated = [s for s in seen if s["path"] == "/emulation"]
    assert streams == {f"127.0.0.1:{first.port}"}
    # Subscribes and 20 publishes at least, all answered 204 by the second replica.
    assert len(emulated) >= 22 and {s["to"] for s in emulated} == {f"127.0.0.1:{second.port}"}
    assert {s["status"] for s in emulated} == {204}
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{second.base}/metrics")).text
    forwarded = [
        line for line in metrics.splitlines()
        if line.startswith('tsunagu_gateway_emulation_requests_total{route="forwarded",status="204"}')
    ]  # fmt: skip
    assert forwarded and float(forwarded[0].split()[-1]) >= 22


async def test_http_stream_recovers_what_was_published_while_its_gateway_restarted(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    env = gateway_env(real_env)
    port = pick_port()
    gateway = start_service(["serve", "ws-gateway"], env, port=port)
    other = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(gateway.wait_ready)
    await asyncio.to_thread(other.wait_ready)
    channel = f"chat:recover{uuid.uuid4().hex[:8]}"
    config = {
        "base": gateway.base,
        "chromium": chromium(),
        "channel": channel,
        "mode": "follow",
        "count": 10,
        "timeout": 60,
        "clients": [
            {"name": "follower", "token": token("follower"), "transports": [endpoints(gateway.base)["http_stream"]]}
        ],
    }
    async with node("emulation_chat.mjs", json.dumps(config)) as proc:
        assert await line_of(proc) == {"ready": True}
        for n in range(3):
            await publish(gateway.base, channel, {"n": n})
        await asyncio.sleep(0.5)
        await asyncio.to_thread(gateway.stop)
        # While the gateway is away: published through the other replica, into the same Redis stream.
        for n in range(3, 8):
            await publish(other.base, channel, {"n": n})
        restarted = start_service(["serve", "ws-gateway"], env, port=port)
        await asyncio.to_thread(restarted.wait_ready)
        deadline = time.monotonic() + 20
        # Once it resubscribed (it recovers 3..7 then), the last two come live.
        while time.monotonic() < deadline:
            async with httpx.AsyncClient(base_url=restarted.base, headers={"X-API-Key": API_KEY}) as api:
                presence = (await api.post("/api/channels", json={})).json()
            if channel in json.dumps(presence):
                break
            await asyncio.sleep(0.2)
        for n in range(8, 10):
            await publish(restarted.base, channel, {"n": n})
        summary = await summary_of(proc)
    assert summary["failure"] is None, summary
    (client,) = summary["clients"]
    assert [p["n"] for p in client["received"]] == list(range(10))
    assert [p["offset"] for p in client["received"]] == list(range(1, 11))
    assert client["transports"] == ["http_stream", "http_stream"]
    assert client["subscribed"] == [
        {"recovered": False, "wasRecovering": False},
        {"recovered": True, "wasRecovering": True},
    ]
    # The stopping gateway told it to reconnect (3001 shutdown), over the stream itself.
    assert 3001 in client["disconnects"], client
