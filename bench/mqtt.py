"""MQTT publish -> WebSocket client latency through mqtt-bridge and the gateway.

`tsunagu serve mqtt-bridge` and `tsunagu serve ws-gateway` run as their own processes on the stack's
Redis and Mosquitto (bus: memory, unused here). A paho-mqtt publisher spreads QoS 1 messages over
`--topics` device topics at `--rate` per second; `--clients` WebSocket clients speaking the native
(Centrifugo JSON) protocol subscribe to all channels between them. Each message carries its send time;
a client records publish -> delivery latency. Prints the achieved rates and p50/p90/p99.

Each rate of `--rates` (default the issue's: p99 at 5,000/s, throughput at 10,000/s) runs twice:
"before", the bridge publishing one message per broker call from 32 workers (relay batch size 1,
the relay as it was), and "after", the default batched relay. Raw results go to
bench/results/<time>-mqtt.json.

By default the bench starts its own Mosquitto on a free port with `max_inflight_messages` and
`max_queued_messages` raised (`--inflight`, `--queued`): with Mosquitto's defaults (20 and 1,000)
a QoS 1 subscriber gets 20 messages per acknowledgement round trip and messages past the queue are
dropped, which bounds any bridge. `--mosquitto stack` uses the stack's (TSUNAGU_MQTT_URL) instead.
`make bench` runs it: `uv run python bench/mqtt.py [--rates 5000,10000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
import paho.mqtt.client as mqtt
import websockets
from record import Recorder, stop_processes

REPO = Path(__file__).resolve().parents[1]
MQTT_URL = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")
REDIS_URL = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "bench-mqtt-secret-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_mosquitto(inflight: int, queued: int, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_inflight_messages {inflight}\nmax_queued_messages {queued}\n"
    )
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"mqtt://127.0.0.1:{port}"
        time.sleep(0.05)
    process.terminate()
    raise SystemExit("the private mosquitto did not start")


def serve(service: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = {
        **os.environ,
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_REDIS_URL": REDIS_URL,
        "TSUNAGU_MQTT_URL": MQTT_URL,
        "TSUNAGU_LOG_LEVEL": "warning",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", service, "--port", str(port)],
        cwd=REPO,
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{service} did not become ready")


class Latencies:
    def __init__(self) -> None:
        self.values: list[float] = []
        self.received = 0
        self.retried = 0
        self.per_client: dict[str, int] = {}


async def client(
    url: str, user: str, channels: list[str], stats: Latencies, ready: asyncio.Event, stop: asyncio.Event
) -> None:
    for attempt in range(5):
        try:
            async with websockets.connect(url, max_size=None) as ws:
                await subscribe_all(ws, user, channels, stats)
                await receive(ws, user, stats, ready, stop)
                return
        except websockets.ConnectionClosedError as exc:
            # A gateway starved of CPU during the 1,000-subscribe burst may close with 3004: reconnect.
            if ready.is_set() or attempt == 4:
                raise
            stats.retried += 1
            print(f"  client {user}: {exc}; connecting again", flush=True)
            await asyncio.sleep(0.5)


async def subscribe_all(ws: Any, user: str, channels: list[str], stats: Latencies) -> None:
    token = jwt.encode({"sub": user, "channels": ["mqtt:*"], "exp": int(time.time()) + 3600}, SECRET, "HS256")
    await ws.send(orjson.dumps({"id": 1, "connect": {"token": token}}).decode())
    await ws.recv()
    # One subscribe at a time, retrying the gateway's temporary errors (it has some under a burst of 1,000).
    for number, channel in enumerate(channels, start=2):
        for _attempt in range(20):
            await ws.send(orjson.dumps({"id": number, "subscribe": {"channel": channel}}).decode())
            reply = orjson.loads((await ws.recv()).splitlines()[0])
            if "error" not in reply:
                break
            stats.retried += 1
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"could not subscribe to {channel}: {reply}")


async def receive(ws: Any, user: str, stats: Latencies, ready: asyncio.Event, stop: asyncio.Event) -> None:
    ready.set()
    while not stop.is_set():
        try:
            frame = await asyncio.wait_for(ws.recv(), 0.5)
        except TimeoutError:
            continue
        now = time.time_ns()
        for line in frame.splitlines() if isinstance(frame, str) else frame.decode().splitlines():
            if line == "{}":
                await ws.send("{}")
                continue
            message = orjson.loads(line)
            data = message.get("push", {}).get("pub", {}).get("data")
            if isinstance(data, dict) and "t" in data:
                stats.values.append((now - data["t"]) / 1e6)
                stats.received += 1
                stats.per_client[user] = stats.per_client.get(user, 0) + 1


def publish(url: str, topics: list[str], rate: float, seconds: float, sent: Any) -> None:
    """In a process of its own (spawned): a publisher sharing the clients' GIL fell far behind its rate."""
    address = urlsplit(url)
    publisher = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    publisher.max_inflight_messages_set(2000)
    publisher.max_queued_messages_set(0)
    publisher.connect(address.hostname or "127.0.0.1", address.port or 1883)
    publisher.loop_start()
    start = time.perf_counter()
    n = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate)
        while n < due:
            publisher.publish(topics[n % len(topics)], orjson.dumps({"t": time.time_ns(), "n": n}), qos=1)
            n += 1
        time.sleep(0.001)
    sent.put(n)
    time.sleep(5)
    publisher.loop_stop()
    publisher.disconnect()


CONFIGURATIONS = {
    "before": {"TSUNAGU_MQTT_BRIDGE_RELAY_BATCH_SIZE": "1", "TSUNAGU_MQTT_BRIDGE_RELAY_WORKERS": "32"},
    "after": {},
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="5000,10000", help="message rates to run, comma-separated")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--configurations", default="before,after")
    parser.add_argument("--mosquitto", choices=("private", "stack"), default="private")
    parser.add_argument("--profile", action="store_true", help="py-spy the bridge and the gateway while publishing")
    parser.add_argument("--inflight", type=int, default=1000, help="private Mosquitto's max_inflight_messages")
    parser.add_argument("--queued", type=int, default=1_000_000, help="private Mosquitto's max_queued_messages")
    args = parser.parse_args()
    recorder = Recorder("mqtt", vars(args))
    global MQTT_URL
    mosquitto = None
    with tempfile.TemporaryDirectory() as directory:
        if args.mosquitto == "private":
            mosquitto, MQTT_URL = private_mosquitto(args.inflight, args.queued, Path(directory))
        try:
            for name in args.configurations.split(","):
                for rate in (float(r) for r in args.rates.split(",")):
                    await run(args, name, CONFIGURATIONS[name], rate, recorder)
        finally:
            recorder.save()
            if mosquitto is not None:
                mosquitto.terminate()
                mosquitto.wait(10)


async def run(args: argparse.Namespace, name: str, extra_env: dict[str, str], rate: float, recorder: Recorder) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}/dev{i}/telemetry" for i in range(args.topics)]
    bridge_port, gateway_port = free_port(), free_port()
    bridge = serve(
        "mqtt-bridge",
        bridge_port,
        {
            "TSUNAGU_MQTT_BRIDGE_FILTERS": orjson.dumps([f"{prefix}/#"]).decode(),
            "TSUNAGU_MQTT_BRIDGE_CLIENT_ID": f"bench-bridge-{prefix}",
            "TSUNAGU_MQTT_BRIDGE_SESSION_EXPIRY": "0",
            "TSUNAGU_MQTT_BRIDGE_HISTORY_SIZE": "0",
            **extra_env,
        },
    )
    gateway = serve("ws-gateway", gateway_port, {"TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET})
    try:
        stats = Latencies()
        stop = asyncio.Event()
        readies = []
        tasks = []
        url = f"ws://127.0.0.1:{gateway_port}/connection/websocket"
        for i in range(args.clients):
            channels = [f"mqtt:{t}" for t in topics[i :: args.clients]]
            ready = asyncio.Event()
            readies.append(ready)
            tasks.append(asyncio.create_task(client(url, f"u{i}", channels, stats, ready, stop)))
        async with asyncio.timeout(60):
            for ready in readies:
                await ready.wait()
        print(
            f"{name}: {args.clients} clients on {args.topics} channels; publishing {rate:,.0f} msg/s for "
            f"{args.seconds:g} s (QoS 1)",
            flush=True,
        )
        counts: Any = multiprocessing.get_context("spawn").Queue()
        publisher = multiprocessing.get_context("spawn").Process(
            target=publish, args=(MQTT_URL, topics, rate, args.seconds, counts)
        )
        profiles = []
        if args.profile:
            from record import Profile

            profiles = [
                (f"{name}-mqtt-bridge", Profile(f"mqtt-{name}-bridge", bridge.pid, args.seconds)),
                (f"{name}-ws-gateway", Profile(f"mqtt-{name}-gateway", gateway.pid, args.seconds)),
            ]
        started = time.perf_counter()
        publisher.start()
        while publisher.is_alive():
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - started - 5
        sent = [counts.get(timeout=10)]
        stop.set()
        errors = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(r, BaseException)]
        if errors:
            print(f"  {len(errors)} clients failed, e.g. {errors[0]!r}")
        values = sorted(stats.values)
        if stats.retried:
            print(f"  (the gateway answered {stats.retried} subscribes with a temporary error; retried)")
        silent = args.clients - len(stats.per_client)
        if silent:
            print(f"  {silent} clients received nothing")
        expected = sent[0]  # every channel has one subscriber
        print(
            f"  published {sent[0]:,} ({sent[0] / args.seconds:,.0f}/s); delivered {stats.received:,} of {expected:,}"
            f" in {elapsed:.1f} s"
        )
        figures: dict[str, float] = {}
        if values:
            q = statistics.quantiles(values, n=100)
            figures = {"p50_ms": q[49], "p90_ms": q[89], "p99_ms": q[98], "max_ms": values[-1]}
            print(f"  latency ms: p50 {q[49]:.1f}  p90 {q[89]:.1f}  p99 {q[98]:.1f}  max {values[-1]:.1f}")
        async with httpx.AsyncClient(timeout=5) as http:
            metrics = (await http.get(f"http://127.0.0.1:{bridge_port}/metrics")).text
        relayed = sum(
            float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tsunagu_mqtt_relayed_total")
        )

        def sample(name: str) -> float:
            return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))

        # One observation per relayed batch, of its oldest message.
        batches = sample("tsunagu_mqtt_relay_seconds_count")
        mean = sample("tsunagu_mqtt_relay_seconds_sum") / max(batches, 1) * 1000
        print(
            f"  bridge relayed {relayed:,.0f} in {batches:,.0f} broker calls;"
            f" mean MQTT arrival -> Redis accepted (oldest of a batch) {mean:.1f} ms"
        )
        for label, profile in profiles:
            shares = profile.finish()
            print(f"  profile of {label} (self time): " + "; ".join(f"{sh:.0%} {where}" for sh, where in shares[:6]))
            recorder.add(f"profile {label}", len(shares), "functions", svg=str(profile.svg), top=shares)
        # Delivered within the publishing time plus the 5 s drain: the rate the pipeline kept up with.
        recorder.add(
            f"{name} at {rate:,.0f} msg/s",
            stats.received / args.seconds,
            "msg/s delivered",
            configuration=name,
            offered_rate=rate,
            published=sent[0],
            delivered=stats.received,
            relayed=relayed,
            mean_relay_ms=mean,
            broker_calls=batches,
            silent_clients=silent,
            target=">= 10,000 msg/s; p99 <= 50 ms at 5,000/s",
            **figures,
        )
    finally:
        stop_processes([bridge, gateway])


if __name__ == "__main__":
    asyncio.run(main())
