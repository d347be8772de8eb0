"""What compression costs the gateway in memory per connection: 1,000 WebSocket clients with
permessage-deflate off, on (the default 12 window bits) and on with 15 bits, and 1,000 uni_sse streams
plain and gzipped (transports/stream_encoding.py).

Each case is a fresh gateway process (in-memory broker and bus: memory per connection does not depend on
them) with tracemalloc on, which counts the zlib state too (CPython's zlib allocates through
PyMem_RawMalloc); its clients are another process (websockets, offering permessage-deflate with
`client_max_window_bits` as browsers do; bare sockets for SSE, with or without `Accept-Encoding: gzip`).
Every client connects, subscribes (a WebSocket client's commands are compressed, so the gateway's
decompressor of each one has allocated its window) and receives 20 ticker publications; then the
gateway's traced memory and RSS are taken against those before the clients came, after a gc.

    uv run python bench/compression_memory.py --clients 1000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

sys.path.insert(0, str(Path(__file__).parent))
from record import Recorder

SECRET = "bench-secret-long-enough-for-hs256-tokens"
API_KEY = "bench"
CHANNEL = "news"
PUBLICATIONS = 20
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "websocket, deflate off": ("ws", {"ws_per_message_deflate": False}),
    "websocket, deflate (12 bits, default)": ("ws", {}),
    "websocket, deflate (15 bits)": ("ws", {"ws_deflate_window_bits": 15}),
    "uni_sse, plain": ("sse", {}),
    "uni_sse, gzip": ("sse-gzip", {}),
}


def token(subs: bool) -> str:
    claims: dict[str, Any] = {"sub": "bench", "channels": [CHANNEL], "exp": int(time.time()) + 3600}
    if subs:
        claims["subs"] = {CHANNEL: {}}
    return jwt.encode(claims, SECRET, "HS256")


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# the gateway's process


async def serve(overrides: dict[str, Any]) -> None:
    tracemalloc.start()
    from tsunagu_core.broker import MemoryBroker
    from tsunagu_core.bus import MemoryBus
    from tsunagu_core.config import CoreSettings
    from tsunagu_core.lifecycle import Runtime
    from tsunagu_core.testing import free_port, serving
    from tsunagu_ws_gateway.app import create_app
    from tsunagu_ws_gateway.config import GatewaySettings

    settings = GatewaySettings(
        token_hmac_secret=SECRET,
        api_key=API_KEY,
        allow_anonymous=True,
        max_connections_per_ip=0,
        max_connections_per_user=0,
        connect_rate=0,
        **overrides,
    )
    runtime = Runtime(CoreSettings(node_name="bench"), bus=MemoryBus(), broker=MemoryBroker())
    port = free_port()
    async with serving(create_app(runtime, settings), port):
        print(json.dumps({"port": port}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "snap":
                gc.collect()
                print(json.dumps({"traced": tracemalloc.get_traced_memory()[0], "rss": rss()}), flush=True)


# the clients' process


async def ws_client(port: int, ready: asyncio.Event, done: asyncio.Event) -> None:
    import websockets

    url = f"ws://127.0.0.1:{port}/connection/websocket"
    async with websockets.connect(url, compression="deflate", max_queue=None) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token(False)}}))
        await ws.recv()
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": CHANNEL}}))
        reply = json.loads(await ws.recv())
        assert "subscribe" in reply, reply
        ready.set()
        received = 0
        async for message in ws:
            for line in str(message).splitlines():
                if line == "{}":
                    await ws.send("{}")  # the native protocol's pong
                received += '"pub"' in line
            if received >= PUBLICATIONS:
                done.set()


async def sse_client(port: int, gzip: bool, ready: asyncio.Event, done: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    query = urlencode({"cf_connect": json.dumps({"token": token(True)})})
    encoding = "accept-encoding: gzip\r\n" if gzip else ""
    writer.write(f"GET /connection/uni_sse?{query} HTTP/1.1\r\nhost: x\r\n{encoding}\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending, received = b"", 0
    while received < PUBLICATIONS:
        size = int((await reader.readline()).strip(), 16)
        data = (await reader.readexactly(size + 2))[:-2]
        *lines, pending = (pending + (inflater.decompress(data) if gzip else data)).split(b"\n")
        for line in lines:
            if b'"connect"' in line:
                ready.set()
            received += b'"pub"' in line
    done.set()
    await asyncio.Event().wait()


async def clients(kind: str, port: int, count: int) -> None:
    readies = [asyncio.Event() for _ in range(count)]
    dones = [asyncio.Event() for _ in range(count)]
    tasks = []
    for n in range(count):
        if kind == "ws":
            tasks.append(asyncio.create_task(ws_client(port, readies[n], dones[n])))
        else:
            tasks.append(asyncio.create_task(sse_client(port, kind == "sse-gzip", readies[n], dones[n])))
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    async with asyncio.timeout(120):
        for ready in readies:
            await ready.wait()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # published
    async with asyncio.timeout(60):
        for done in dones:
            await done.wait()
    print("done", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # measured
    for task in tasks:
        task.cancel()


# the orchestrator


def quote(n: int) -> dict[str, Any]:
    price = 1000 + n * 0.25
    quote = {"symbol": "ACME", "name": "Acme Corporation ordinary shares", "exchange": "XTKS", "currency": "JPY"}
    return {**quote, "price": price, "bid": price - 0.25, "ask": price + 0.25, "volume": 1_250_000 + n, "n": n}


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )


def ask(process: subprocess.Popen[str], line: str | None = None) -> str:
    assert process.stdin is not None and process.stdout is not None
    if line is not None:
        process.stdin.write(line + "\n")
        process.stdin.flush()
    answer = process.stdout.readline()
    if not answer:
        raise RuntimeError(f"{process.args!r} ended")
    return answer.strip()


def measure_case(kind: str, overrides: dict[str, Any], count: int) -> dict[str, float]:
    server = spawn("--serve", json.dumps(overrides))
    try:
        port = json.loads(ask(server))["port"]
        time.sleep(0.5)
        before = json.loads(ask(server, "snap"))
        load = spawn("--clients-of", kind, str(port), str(count))
        try:
            assert ask(load) == "ready"
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": API_KEY}) as api:
                for n in range(PUBLICATIONS):
                    api.post("/api/publish", json={"channel": CHANNEL, "data": quote(n)}).raise_for_status()
            assert ask(load, "published") == "done"
            time.sleep(1.0)  # SSE: the last writes out
            after = json.loads(ask(server, "snap"))
            assert load.stdin is not None
            load.stdin.write("measured\n")
            load.stdin.flush()
        finally:
            load.kill()
            load.wait()
    finally:
        server.kill()
        server.wait()
    return {
        "traced": (after["traced"] - before["traced"]) / count,
        "rss": (after["rss"] - before["rss"]) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--clients-of", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(json.loads(args.serve)))
        return
    if args.clients_of is not None:
        kind, port, count = args.clients_of
        asyncio.run(clients(kind, int(port), int(count)))
        return
    recorder = Recorder("compression-memory", {"clients": args.clients, "publications": PUBLICATIONS})
    print(f"{'case':<40} {'traced/conn':>12} {'RSS/conn':>10}")
    results = {}
    for name, (kind, overrides) in CASES.items():
        figures = results[name] = measure_case(kind, overrides, args.clients)
        print(f"{name:<40} {figures['traced'] / 1024:>10.1f} KiB {figures['rss'] / 1024:>8.1f} KiB", flush=True)
        recorder.add(f"{name}: traced memory per connection", figures["traced"] / 1024, "KiB")
        recorder.add(f"{name}: RSS per connection", figures["rss"] / 1024, "KiB")
    for kind, base in (("websocket", "websocket, deflate off"), ("uni_sse", "uni_sse, plain")):
        for name in results:
            if name.startswith(kind) and name != base:
                extra = (results[name]["traced"] - results[base]["traced"]) / 1024
                recorder.add(f"{name}: traced memory per connection over {base.split(', ')[1]}", extra, "KiB")
    if os.environ.get("BENCH_DRY") != "1":
        recorder.save()


if __name__ == "__main__":
    main()
