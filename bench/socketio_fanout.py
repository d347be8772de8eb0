"""Socket.IO broadcast: deliveries/s to N stock socket.io-client sockets (Node, tests/e2e/js) in one
room, on the Tsunagu gateway (`/socket.io/`, Redis broker) and on a plain python-socketio server with
its Redis manager (socketio.AsyncRedisManager), in the same run. Not in the Makefile.

    eval "$(uv run tsunagu stack env)" && uv run python bench/socketio_fanout.py --clients 1000 --events 50

Both servers get the same requests: `join` room and `emit {room, event, args}` with an ack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "e2e" / "js"
SECRET = "bench-secret-long-enough-for-hs256-tokens"
REDIS_URL = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")

LOAD = r"""
import { io } from "socket.io-client";
const [url, token, room] = process.argv.slice(1, 4);
const [clients, events] = [+process.argv[4], +process.argv[5]];
const opts = { auth: { token }, transports: ["websocket"], reconnection: false, forceNew: true };
let received = 0;
const sockets = [];
for (let i = 0; i < clients; i++) {
  const s = io(url, opts);
  s.on("tick", () => { received++; });
  sockets.push(s);
}
await Promise.all(sockets.map((s) => new Promise((ok, fail) => { s.on("connect", ok); s.on("connect_error", fail); })));
await Promise.all(sockets.map((s) => s.timeout(30000).emitWithAck("join", room)));
const pub = sockets[0];
const start = performance.now();
const body = "x".repeat(64);
for (let n = 0; n < events; n++) await pub.timeout(30000).emitWithAck("emit", { room, event: "tick", args: [n, body] });
const want = clients * events;
while (received < want && performance.now() - start < 60000) await new Promise((r) => setTimeout(r, 5));
const seconds = (performance.now() - start) / 1000;
console.log(JSON.stringify({ received, want, seconds, per_second: Math.round(received / seconds) }));
process.exit(0);
"""

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
    await sio.emit(req["event"], req["args"], room=req["room"])
    return {}
uvicorn.run(socketio.ASGIApp(sio), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


async def run_load(url: str, token: str, room: str, clients: int, events: int) -> dict[str, float]:
    node = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e", LOAD, url, token, room, str(clients), str(events),
        cwd=JS, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await node.communicate()
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50)
    args = parser.parse_args()
    token = jwt.encode({"sub": "bench", "channels": ["sio:*"], "exp": int(time.time()) + 3600}, SECRET, "HS256")
    room = f"bench{os.getpid()}"
    servers = {
        "tsunagu": (
            [sys.executable, "-m", "tsunagu", "serve", "ws-gateway", "--port"],
            {
                "TSUNAGU_BROKER": "redis",
                "TSUNAGU_BUS": "memory",
                "TSUNAGU_REDIS_URL": REDIS_URL,
                "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
                "TSUNAGU_GATEWAY_COMMANDS_PER_SECOND": "1000000",
                "TSUNAGU_LOG_LEVEL": "warning",
            },
        ),
        "python-socketio+redis": ([sys.executable, "-c", PLAIN], {}),
    }
    for name, (command, extra) in servers.items():
        port = free_port()
        argv = [*command, str(port)] + ([] if name == "tsunagu" else [REDIS_URL])
        server = subprocess.Popen(argv, env={**os.environ, **extra}, cwd=ROOT)
        try:
            wait_port(port, server)
            result = asyncio.run(run_load(f"http://127.0.0.1:{port}", token, room, args.clients, args.events))
            done = f"{result['received']}/{result['want']} in {result['seconds']:.2f} s"
            print(f"{name:24} {result['per_second']:>9} deliveries/s  ({done})")
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
