"""Publish → deliver latency across two gateway replicas through real Redis, at a fixed rate.

Two `tsunagu serve ws-gateway` processes share the Redis broker; a client on replica A publishes
`--rate` times a second, a client subscribed on replica B stamps each arrival; both clients run in
this process, so one clock measures both ends. Needs the stack's Redis (`make bench` starts it).
Prints p50/p90/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jwt
import websockets

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-that-is-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(port: int) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        for _ in range(300):
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway on {port} never became ready")


async def connect(port: int, token: str, channel: str) -> websockets.ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/connection/websocket")
    await ws.send(
        json.dumps({"id": 1, "connect": {"token": token}})
        + "\n"
        + json.dumps({"id": 2, "subscribe": {"channel": channel}})
    )
    replies = 0
    while replies < 2:
        replies += sum(1 for line in str(await ws.recv()).split("\n") if line.startswith('{"id":'))
    return ws


def start_gateways() -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    env = {
        **os.environ,
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_LOG_LEVEL": "warning",
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_COMMANDS_PER_SECOND": "100000",
    }
    ports = [free_port(), free_port()]
    servers = []
    for port in ports:
        command = [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(port)]
        servers.append(
            subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return ports, servers


async def run(ports: list[int], rate: int, count: int) -> list[float]:
    token = jwt.encode({"sub": "bench", "channels": ["bench*"], "exp": int(time.time()) + 3600}, SECRET, "HS256")
    await asyncio.gather(*(wait_ready(port) for port in ports))
    channel = f"bench-latency-{os.getpid()}"
    publisher = await connect(ports[0], token, channel + "-publisher")
    subscriber = await connect(ports[1], token, channel)
    arrivals: dict[int, float] = {}
    sent: dict[int, float] = {}

    async def receive() -> None:
        async for message in subscriber:
            now = time.perf_counter()
            for line in str(message).split("\n"):
                if '"pub":' in line:
                    arrivals[json.loads(line)["push"]["pub"]["data"]["seq"]] = now
                elif line == "{}":
                    await subscriber.send("{}")

    async def drain_publisher() -> None:
        async for message in publisher:
            if message == "{}":
                await publisher.send("{}")

    tasks = [asyncio.create_task(receive()), asyncio.create_task(drain_publisher())]
    start = time.perf_counter()
    for seq in range(count):
        target = start + seq / rate
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        sent[seq] = time.perf_counter()
        command = {"id": seq + 10, "publish": {"channel": channel, "data": {"seq": seq, "text": "x" * 160}}}
        await publisher.send(json.dumps(command))
    deadline = time.perf_counter() + 10
    while len(arrivals) < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    await publisher.close()
    await subscriber.close()
    missing = count - len(arrivals)
    if missing:
        raise RuntimeError(f"{missing} publications never arrived")
    return sorted((arrivals[seq] - sent[seq]) * 1000 for seq in range(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=500, help="publications per second")
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    ports, servers = start_gateways()
    try:
        latencies = asyncio.run(run(ports, args.rate, args.count))
    finally:
        for server in servers:
            server.terminate()
            server.wait(15)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))]

    print(f"\nlatency across two gateway replicas via Redis: {args.count} publications at {args.rate}/s, "
          f"{os.cpu_count()} cores (gateways, Redis and clients share them)\n")  # fmt: skip
    print("| p50 | p90 | p99 | max | mean |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {pct(0.5):.2f} ms | {pct(0.9):.2f} ms | {pct(0.99):.2f} ms | {latencies[-1]:.2f} ms "
          f"| {statistics.mean(latencies):.2f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
