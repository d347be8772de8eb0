"""Socket.IO broadcast: N Socket.IO v5 sockets in one room, on the Tsunagu gateway (`/socket.io/`, Redis
broker) and on a plain python-socketio server with its Redis manager (socketio.AsyncRedisManager), in
the same run, at each `--clients` count (`make bench`).

    eval "$(uv run tsunagu stack env)" && uv run python bench/socketio_fanout.py --clients 1000,5000

The clients are the Go load generator's (bench/loadgen `-proto socketio`: Engine.IO v4 over WebSocket,
CONNECT with `auth.token`): every subscriber joins the room with `join` (acked), one more socket emits
`emit {room, event: "tick", args: [payload]}` with an ack, `--window` in flight, for `--seconds`; each
subscriber checks every event it gets for loss, duplication and order (per publishing worker), and the
payload's send time gives emit → delivery latency. Both servers get the same requests and run alone on
CPU 0 (`taskset -c 0`), the load generator on CPU 1, Redis (the stack's, shared) wherever it runs.
Figures: deliveries/s, the server's CPU seconds over the run (from /proc) and deliveries per server
CPU-second, the Redis server's CPU seconds over the same span; `--profile` adds a py-spy flame graph of
each server while it is emitted to (bench/results/profiles/). Exits 1 when a run lost, duplicated or
reordered a delivery, or an emit failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jwt
import redis
from broadcast import REPO, build_loadgen, cpu_seconds, free_port, loadgen, settle, wait_port
from record import RESULTS, Profile, Recorder

SECRET = "bench-secret-long-enough-for-hs256-tokens"
REDIS_URL = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVERS = ("tsunagu", "python-socketio+redis")

# The same two handlers as the gateway's (protocols/socketio.py): `join` and `emit` with an ack.
PLAIN = """
import socketio, uvicorn, sys
mgr = socketio.AsyncRedisManager(sys.argv[2])
sio = socketio.AsyncServer(async_mode="asgi", client_manager=mgr)
@sio.on("join")
async def join(sid, room):
    await sio.enter_room(sid, room)
    return {"ok": True}
@sio.on("emit")
async def emit(sid, req):
    await sio.emit(req["event"], tuple(req["args"]), room=req["room"])
    return {}
uvicorn.run(socketio.ASGIApp(sio), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def server_command(name: str, port: int) -> tuple[list[str], dict[str, str]]:
    if name == "tsunagu":
        env = {
            "TSUNAGU_BROKER": "redis",
            "TSUNAGU_BUS": "memory",
            "TSUNAGU_REDIS_URL": REDIS_URL,
            "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
            # The publisher emits as fast as acks come back; the per-connection limit would cut it off.
            "TSUNAGU_GATEWAY_COMMANDS_PER_SECOND": "1000000",
            # One user and one address hold every socket of the load generator.
            "TSUNAGU_GATEWAY_MAX_CONNECTIONS_PER_USER": "0",
            "TSUNAGU_GATEWAY_MAX_CONNECTIONS_PER_IP": "0",
            "TSUNAGU_LOG_LEVEL": "warning",
        }
        return [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port", str(port)], env
    return [sys.executable, "-c", PLAIN, str(port), REDIS_URL], {}


@contextlib.contextmanager
def pinned_server(name: str) -> Iterator[tuple[int, int]]:
    """The server on CPU 0 on a free port: yields (port, pid); stopped (killed if need be) after."""
    port = free_port()
    command, extra = server_command(name, port)
    server = subprocess.Popen(
        ["taskset", "-c", "0", *command], env={**os.environ, **extra}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, server)
        yield port, server.pid
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def redis_pid() -> int:
    """The Redis server's pid when it runs on this machine (0: its CPU is not read)."""
    try:
        pid = int(redis.Redis.from_url(REDIS_URL).info("server")["process_id"])
        cpu_seconds(pid)
    except (redis.RedisError, OSError, KeyError, ValueError):
        return 0
    return pid


def measure(name: str, clients: int, seconds: float, window: int, token: str, profile: bool) -> dict[str, Any]:
    room = f"bench{os.getpid()}x{int(time.time() * 1000)}"
    shared = redis_pid()
    marks: list[float] = []
    spy: list[Profile] = []
    with pinned_server(name) as (port, pid):
        settle(pid, port)

        def publishing() -> None:
            marks.append(cpu_seconds(shared) if shared else 0.0)
            if profile:
                spy.append(Profile(f"socketio-{name.split('+')[0]}-{clients}", pid, seconds, rate=200))

        result = loadgen(
            port, pid, None, "-proto", "socketio", "-url", "ws://127.0.0.1:{port}/socket.io/", "-token", token,
            "-channel", room, "-clients", str(clients), "-duration", f"{seconds}s", "-window", str(window),
            timeout=seconds + 300, publishing=publishing,
        )  # fmt: skip
        result["redis_cpu_seconds"] = (cpu_seconds(shared) - marks[0]) if shared and marks else None
    if spy:
        top = spy[0].finish(8)
        result["profile"] = {"flame_graph": str(spy[0].svg.relative_to(RESULTS.parent.parent)), "self_time": top}
    return result


def problems(result: dict[str, Any]) -> list[str]:
    found = [f"{key} {result[key]}" for key in ("lost", "duplicated", "out_of_order", "publish_errors") if result[key]]
    if result["delivered"] != result["expected"]:
        found.append(f"delivered {result['delivered']} of {result['expected']}")
    if result["disconnected_during_run"]:
        found.append(f"{result['disconnected_during_run']} disconnected")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1000,5000", help="subscriber counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=4, help="emits in flight")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="py-spy each server while it is emitted to")
    args = parser.parse_args()
    counts = [int(count) for count in args.clients.split(",")]
    build_loadgen()
    token = jwt.encode({"sub": "bench", "channels": ["sio:*"], "exp": int(time.time()) + 3600}, SECRET, "HS256")
    recorder = Recorder("socketio-fanout", {**vars(args), "clients": counts, "payload_bytes": 200})
    print(f"\nSocket.IO: one room, ~200 B events, {args.seconds:.0f} s, {args.window} emits in flight\n")
    print("| server | clients | run | deliveries/s | server CPU-s | per server CPU-s | Redis CPU-s | p50 / p99 ms |"
          " delivered / expected | connect s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    failed: list[str] = []
    for clients in counts:
        for run in range(1, args.repeat + 1):
            for name in SERVERS if run % 2 else SERVERS[::-1]:  # neither always first on a machine that drifts
                r = measure(name, clients, args.seconds, args.window, token, args.profile)
                wrong = problems(r)
                failed += [f"{name} {clients} clients run {run}: {', '.join(wrong)}"] if wrong else []
                redis_cpu = r["redis_cpu_seconds"]
                note = (
                    f"run {run}; server {r['server_cpu_seconds']:.2f} CPU-s"
                    f" ({r['deliveries_per_server_cpu_second']:,.0f} deliveries per CPU-s)"
                    + (f", Redis {redis_cpu:.2f} CPU-s" if redis_cpu is not None else "")
                    + f", p50/p99 {r['latency_p50_ms']:.1f}/{r['latency_p99_ms']:.1f} ms"
                    + f", {r['delivered']:,}/{r['expected']:,} delivered, connected in {r['connect_seconds']:.1f} s"
                    + (f"; {', '.join(wrong)}" if wrong else "")
                )
                recorder.add(f"{name} {clients} clients", r["deliveries_per_second"], "deliveries/s", note=note, raw=r)
                print(f"| {name} | {clients:,} | {run} | {r['deliveries_per_second']:,.0f} |"
                      f" {r['server_cpu_seconds']:.2f} | {r['deliveries_per_server_cpu_second']:,.0f} |"
                      f" {'' if redis_cpu is None else f'{redis_cpu:.2f}'} |"
                      f" {r['latency_p50_ms']:.1f} / {r['latency_p99_ms']:.1f} |"
                      f" {r['delivered']:,} / {r['expected']:,} | {r['connect_seconds']:.1f} |",
                      flush=True)  # fmt: skip
                for share, function in r.get("profile", {}).get("self_time", []):
                    print(f"    {share:6.1%}  {function}", flush=True)
    recorder.save()
    for line in failed:
        print(f"  PROBLEM {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
