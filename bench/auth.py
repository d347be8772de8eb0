"""auth: password-login throughput and revocation latency across two gateways, on the real stack.

- logins: `tsunagu serve auth` (PostgreSQL, Redis, Kafka) as its own process; C concurrent clients
  send N password grants; argon2id parameters are auth's settings (defaults unless given here);
- revocation: two `tsunagu serve ws-gateway` processes verify auth's tokens by JWKS; each round logs
  in, opens one WebSocket per gateway with the access token, POSTs /v1/revoke for the session and
  stops the clock when both sockets are closed (code 3500); p50/p99 over the rounds.
Everything it creates (a PostgreSQL schema, users) is removed at the end.
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
import uuid
from pathlib import Path

import asyncpg
import httpx
import jwt
import websockets
from tsunagu_auth.config import AuthSettings

REPO = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("TSUNAGU_POSTGRES_DSN", "postgresql://tsunagu:tsunagu@127.0.0.1:5432/tsunagu")
ADMIN = "bench-admin-key"
PASSWORD = "bench password 123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env() -> dict[str, str]:
    return {
        "TSUNAGU_BUS": "kafka",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_DATABASE": "postgres",
        "TSUNAGU_LOG_LEVEL": "warning",
    }


def serve(service: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", service, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **stack_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(base + "/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{base} never became ready")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench_logins(http: httpx.AsyncClient, base: str, users: list[str], count: int, concurrency: int) -> None:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            body = {"grant_type": "password", "username": users[n % len(users)], "password": PASSWORD}
            started = time.perf_counter()
            response = await http.post(base + "/v1/token", json=body)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"login failed: {response.status_code} {response.text}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    print(
        f"  password grant, {concurrency:>3} clients: {count / seconds:>8,.1f} logins/s  "
        f"p50 {percentile(latencies, 50) * 1000:.0f} ms  p99 {percentile(latencies, 99) * 1000:.0f} ms  "
        f"({count} in {seconds:.2f} s)",
        flush=True,
    )


async def open_socket(port: int, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/connection/websocket")
    await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if "connect" not in reply:
        raise SystemExit(f"gateway refused the token: {reply}")
    return ws


async def closed(ws: websockets.ClientConnection) -> tuple[float, int]:
    try:
        while True:
            await ws.recv()
    except websockets.ConnectionClosed as exc:
        return time.perf_counter(), exc.rcvd.code if exc.rcvd else 0


async def bench_revocations(http: httpx.AsyncClient, base: str, user: str, ports: list[int], rounds: int) -> None:
    latencies: list[float] = []
    for _ in range(rounds):
        body = {"grant_type": "password", "username": user, "password": PASSWORD}
        access = (await http.post(base + "/v1/token", json=body)).json()["access_token"]
        sid = jwt.decode(access, options={"verify_signature": False})["sid"]
        sockets = [await open_socket(port, access) for port in ports]
        waiters = [asyncio.create_task(closed(ws)) for ws in sockets]
        started = time.perf_counter()
        response = await http.post(
            base + "/v1/revoke", json={"session": sid}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        if response.status_code != 200:
            raise SystemExit(f"revoke failed: {response.text}")
        results = await asyncio.wait_for(asyncio.gather(*waiters), 10)
        if any(code != 3500 for _, code in results):
            raise SystemExit(f"closed with {[code for _, code in results]}, not 3500")
        latencies.append(max(at for at, _ in results) - started)
    print(
        f"  revocation -> closed on {len(ports)} gateways, {rounds} rounds: "
        f"p50 {percentile(latencies, 50) * 1000:.1f} ms  p99 {percentile(latencies, 99) * 1000:.1f} ms  "
        f"max {max(latencies) * 1000:.1f} ms  mean {statistics.mean(latencies) * 1000:.1f} ms",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    schema = f"auth_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(POSTGRES)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    dsn = f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}search_path={schema}"
    auth_port, gateway_ports = free_port(), [free_port(), free_port()]
    base = f"http://127.0.0.1:{auth_port}"
    auth_env = {
        "TSUNAGU_POSTGRES_DSN": dsn,
        "TSUNAGU_AUTH_ADMIN_API_KEY": ADMIN,
        "TSUNAGU_AUTH_ARGON2_TIME_COST": str(args.argon2_time_cost),
        "TSUNAGU_AUTH_ARGON2_MEMORY_COST": str(args.argon2_memory_cost),
        "TSUNAGU_AUTH_ARGON2_PARALLELISM": str(args.argon2_parallelism),
    }
    gateway_env = {
        "TSUNAGU_GATEWAY_TOKEN_JWKS_URL": f"{base}/.well-known/jwks.json",
        "TSUNAGU_GATEWAY_TOKEN_AUDIENCE": "tsunagu",
    }
    processes = [serve("auth", auth_port, auth_env)] + [serve("ws-gateway", p, gateway_env) for p in gateway_ports]
    try:
        await wait_ready(base)
        for port in gateway_ports:
            await wait_ready(f"http://127.0.0.1:{port}")
        print(
            f"auth (argon2id t={args.argon2_time_cost} m={args.argon2_memory_cost} KiB p={args.argon2_parallelism}), "
            "PostgreSQL + Redis + Kafka:",
            flush=True,
        )
        limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            users = []
            for _ in range(8):
                name = f"bench{uuid.uuid4().hex[:8]}"
                body = {"username": name, "password": PASSWORD, "channels": ["chat:*"]}
                response = await http.post(base + "/v1/users", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
                if response.status_code != 201:
                    raise SystemExit(f"user not created: {response.text}")
                users.append(name)
            for concurrency in args.concurrency:
                await bench_logins(http, base, users, args.logins, concurrency)
            await bench_revocations(http, base, users[0], gateway_ports, args.revocations)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        conn = await asyncpg.connect(POSTGRES)
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


if __name__ == "__main__":
    defaults = AuthSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=100, help="password grants per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--argon2-time-cost", type=int, default=defaults.argon2_time_cost)
    parser.add_argument("--argon2-memory-cost", type=int, default=defaults.argon2_memory_cost)
    parser.add_argument("--argon2-parallelism", type=int, default=defaults.argon2_parallelism)
    asyncio.run(main(parser.parse_args()))
