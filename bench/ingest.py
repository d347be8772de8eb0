"""Kafka record → WebSocket client latency through stream-ingest, and what conflation saves on a hot key.

Starts `tsunagu serve ws-gateway` and `tsunagu serve stream-ingest` on the real stack (Kafka, Redis),
connects `--subscribers` raw WebSocket clients spread over `--keys` instrument channels
(`stream:<topic>.<key>`), and produces `--rate` JSON records a second for `--duration` seconds with
confluent-kafka, each stamped with its send time; every client stamps each arrival (one process,
one clock). Then it produces the same hot-key burst to a plain topic and to a conflated one
(`--max-rate` per second) and counts what one subscriber of each receives.
Prints p50/p90/p99/max latency in milliseconds and the frames/bytes with and without conflation.
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

import jwt
import websockets
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-that-is-long-enough-for-hs256"
KAFKA = os.environ.get("TSUNAGU_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")


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
    raise RuntimeError(f"service on {port} never became ready")


def serve(service: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tsunagu", "serve", service, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Subscriber:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.latencies: list[float] = []
        self.frames = 0
        self.bytes = 0
        self.last: object = None

    async def read(self) -> None:
        try:
            async for frame in self.ws:
                raw = frame if isinstance(frame, str) else frame.decode()
                arrived = time.time()
                self.bytes += len(raw)
                for line in raw.split("\n"):
                    if '"pub"' not in line:
                        continue
                    self.frames += 1
                    data = json.loads(line)["push"]["pub"]["data"]
                    self.last = data
                    if isinstance(data, dict) and "t" in data:
                        self.latencies.append((arrived - data["t"]) * 1000)
        except websockets.ConnectionClosed:
            pass


async def subscribe(port: int, channel: str) -> Subscriber:
    token = jwt.encode({"sub": "bench", "channels": ["stream:*"], "exp": int(time.time()) + 3600}, SECRET, "HS256")
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/connection/websocket", max_size=None)
    await ws.send(
        json.dumps({"id": 1, "connect": {"token": token}})
        + "\n"
        + json.dumps({"id": 2, "subscribe": {"channel": channel}})
    )
    replies = 0
    while replies < 2:
        replies += sum(1 for line in str(await ws.recv()).split("\n") if line.startswith('{"id":'))
    return Subscriber(ws)


def produce(topic: str, keys: list[str], rate: float, duration: float, pad: int) -> int:
    """Records at `rate` a second, keys round-robin, each with its send time; returns how many."""
    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 1, "enable.idempotence": True})
    total = int(rate * duration)
    started = time.perf_counter()
    filler = "x" * pad
    for n in range(total):
        due = started + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        value = json.dumps({"t": time.time(), "n": n, "pad": filler}).encode()
        while True:
            try:
                producer.produce(topic, key=keys[n % len(keys)], value=value)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(30)
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000, help="records a second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of producing")
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--keys", type=int, default=100, help="instrument keys (channels) the records spread over")
    parser.add_argument("--pad", type=int, default=100, help="filler bytes per record")
    parser.add_argument("--max-rate", type=float, default=10, help="conflation: publications a second per channel")
    args = parser.parse_args()

    run = uuid.uuid4().hex[:8]
    feed, hot_raw, hot_conflated = f"bench.feed.{run}", f"bench.hot.{run}", f"bench.hotc.{run}"
    admin = AdminClient({"bootstrap.servers": KAFKA})
    for future in admin.create_topics([NewTopic(t, num_partitions=6) for t in (feed, hot_raw, hot_conflated)]).values():
        future.result()

    env = {
        "TSUNAGU_BUS": "kafka",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_REDIS_URL": REDIS,
        "TSUNAGU_KAFKA_BOOTSTRAP": KAFKA,
    }
    gateway_port, ingest_port = free_port(), free_port()
    mappings = [{"topic": feed}, {"topic": hot_raw}, {"topic": hot_conflated, "max_rate": args.max_rate}]
    processes = [
        serve("ws-gateway", gateway_port, {**env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET}),
        serve(
            "stream-ingest",
            ingest_port,
            {
                **env,
                "TSUNAGU_INGEST_MAPPINGS": json.dumps(mappings),
                "TSUNAGU_INGEST_CONSUMER_GROUP": f"bench-ingest-{run}",
                "TSUNAGU_INGEST_CONSUMERS": os.environ.get("BENCH_INGEST_CONSUMERS", "6"),
                "TSUNAGU_LOG_LEVEL": "warning",
            },
        ),
    ]
    try:
        await wait_ready(gateway_port)
        await wait_ready(ingest_port)
        keys = [f"K{i}" for i in range(args.keys)]
        subscribers = [
            await subscribe(gateway_port, f"stream:{feed}.{keys[i % len(keys)]}") for i in range(args.subscribers)
        ]
        readers = [asyncio.create_task(s.read()) for s in subscribers]
        # Warm-up: the consumer group settles and every channel is seen once; those arrivals are not counted.
        await asyncio.sleep(3)
        await asyncio.to_thread(produce, feed, keys, min(args.rate, 500.0), 2.0, args.pad)
        await asyncio.sleep(3)
        for s in subscribers:
            s.latencies.clear()
        sent = await asyncio.to_thread(produce, feed, keys, args.rate, args.duration, args.pad)
        expected = sum(1 for i in range(args.subscribers) for n in range(sent) if n % len(keys) == i % len(keys))
        deadline = time.monotonic() + 30
        while sum(len(s.latencies) for s in subscribers) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        latencies = [value for s in subscribers for value in s.latencies]
        print(
            f"latency Kafka record -> WebSocket client: {sent} records at {args.rate:.0f}/s over {args.keys} keys,"
            f" {args.subscribers} subscribers, {len(latencies)}/{expected} deliveries"
        )
        if latencies:
            print(
                f"  p50 {statistics.median(latencies):.1f} ms  p90 {percentile(latencies, 0.9):.1f} ms"
                f"  p99 {percentile(latencies, 0.99):.1f} ms  max {max(latencies):.1f} ms"
            )
        for task in readers:
            task.cancel()
        for s in subscribers:
            await s.ws.close()

        hot_rate = min(args.rate, 1000.0)
        raw = await subscribe(gateway_port, f"stream:{hot_raw}.HOT")
        conflated = await subscribe(gateway_port, f"stream:{hot_conflated}.HOT")
        hot_readers = [asyncio.create_task(raw.read()), asyncio.create_task(conflated.read())]
        hot_duration = min(args.duration, 5.0)
        await asyncio.gather(
            asyncio.to_thread(produce, hot_raw, ["HOT"], hot_rate, hot_duration, args.pad),
            asyncio.to_thread(produce, hot_conflated, ["HOT"], hot_rate, hot_duration, args.pad),
        )
        total = int(hot_rate * hot_duration)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            raw.frames < total or not isinstance(conflated.last, dict) or conflated.last.get("n") != total - 1
        ):
            await asyncio.sleep(0.2)
        print(f"hot key: {total} records at {hot_rate:.0f}/s for {hot_duration:.0f} s, one subscriber each")
        print(f"  without conflation: {raw.frames} publications, {raw.bytes} bytes sent")
        last = conflated.last.get("n") if isinstance(conflated.last, dict) else None
        print(
            f"  with max_rate {args.max_rate:g}/s: {conflated.frames} publications, {conflated.bytes} bytes sent"
            f" ({conflated.bytes / max(raw.bytes, 1):.1%}); last value n={last} (final record {total - 1})"
        )
        for task in hot_readers:
            task.cancel()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)
        admin.delete_topics([feed, hot_raw, hot_conflated])


if __name__ == "__main__":
    asyncio.run(main())
