"""`make bench`: throughput and latency of the core engines on this machine, printed as a table.

Foundation scenarios (the gateway's broadcast benchmark joins when the gateway lands):
- broker publish (history append + fan-out, one atomic step) per engine, sequential and 64 in flight;
- broker history read of 100 publications;
- Redis fan-out: publish -> delivery latency to a second node, p50/p99;
- Kafka bus publish (idempotent, acks=all), 1,000 in flight, and a group consuming it back.
Run with the stack up (`make bench` starts Redis and Kafka). Numbers go into docs/benchmarks.md by hand,
with the core count printed here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from tsunagu_core.broker import Broker, ClientInfo, MemoryBroker, Publication, PublishOptions
from tsunagu_core.broker.redis import RedisBroker
from tsunagu_core.bus import BusMessage
from tsunagu_core.bus.kafka import KafkaBus

REDIS_URL = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")
KAFKA = os.environ.get("TSUNAGU_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
PAYLOAD = b'{"text":"' + b"x" * 180 + b'"}'  # ~200 B, a chat message
OPTIONS = PublishOptions(history_size=100, history_ttl=300, info=ClientInfo(user="bench", client="c"))

rows: list[tuple[str, str, str]] = []


def report(name: str, value: float, unit: str, note: str = "") -> None:
    text = f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.2f} {unit}"
    rows.append((name, text, note))
    print(f"  {name:<52} {text:>18}  {note}", flush=True)


async def rate(operation: Callable[[int], Awaitable[object]], count: int, in_flight: int) -> float:
    started = time.perf_counter()
    for first in range(0, count, in_flight):
        await asyncio.gather(*(operation(i) for i in range(first, min(count, first + in_flight))))
    return count / (time.perf_counter() - started)


async def bench_broker(label: str, broker: Broker, count: int) -> None:
    channel = f"bench:{uuid.uuid4().hex[:8]}"
    await broker.start()
    try:
        report(
            f"{label} publish+history, sequential",
            await rate(lambda i: broker.publish(channel, PAYLOAD, OPTIONS), count, 1),
            "pub/s",
        )
        report(
            f"{label} publish+history, 64 in flight",
            await rate(lambda i: broker.publish(channel, PAYLOAD, OPTIONS), count, 64),
            "pub/s",
        )
        reads = max(200, count // 20)
        report(
            f"{label} history read (100 publications)",
            await rate(lambda i: broker.history(channel, limit=100), reads, 1),
            "reads/s",
        )
    finally:
        await broker.close()


class LatencyProbe:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.expected = 0
        self.done = asyncio.Event()

    async def on_publication(self, channel: str, publication: Publication) -> None:
        sent = float(publication.tags["t"])
        self.latencies.append(time.perf_counter() - sent)
        if len(self.latencies) >= self.expected:
            self.done.set()

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        return None

    async def on_resubscribed(self) -> None:
        return None


async def bench_redis_fanout(count: int, per_second: int) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    publisher, receiver = RedisBroker(REDIS_URL, prefix=prefix), RedisBroker(REDIS_URL, prefix=prefix)
    probe = LatencyProbe()
    probe.expected = count
    receiver.set_handler(probe)
    await publisher.start()
    await receiver.start()
    await receiver.subscribe("bench:fanout")
    try:
        interval = 1 / per_second
        start = time.perf_counter()
        for i in range(count):
            options = PublishOptions(history_size=100, history_ttl=300, tags={"t": repr(time.perf_counter())})
            await publisher.publish("bench:fanout", PAYLOAD, options)
            delay = start + (i + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.wait_for(probe.done.wait(), 10)
        ms = sorted(v * 1000 for v in probe.latencies)
        note = f"{count} at {per_second}/s"
        report("redis publish->other node delivery p50", statistics.median(ms), "ms", note)
        report("redis publish->other node delivery p99", ms[int(len(ms) * 0.99) - 1], "ms", note)
    finally:
        await publisher.close()
        await receiver.close()


async def bench_kafka(count: int) -> None:
    bus = KafkaBus(KAFKA, client_id="bench", partitions=6)
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    await bus.start()
    try:
        await bus.ensure_topics([topic])
        report(
            "kafka publish (idempotent, acks=all), 1000 in flight",
            await rate(lambda i: bus.publish(topic, PAYLOAD, key=f"user-{i % 64}"), count, 1000),
            "events/s",
        )
        seen = 0
        done = asyncio.Event()

        async def handle(message: BusMessage) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        started = time.perf_counter()
        consumer = await bus.consume([topic], f"bench-{uuid.uuid4().hex[:6]}", handle)
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - started
        await consumer.stop()
        report(
            "kafka group consume (handler + offset store per event)", count / elapsed, "events/s", "includes group join"
        )
    finally:
        await bus.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--memory-only", action="store_true", help="skip Redis and Kafka")
    args = parser.parse_args()
    print(f"tsunagu bench: {os.cpu_count()} cores, payload {len(PAYLOAD)} B, {args.count} operations per row")
    await bench_broker("memory broker", MemoryBroker(), args.count)
    if not args.memory_only:
        await bench_broker("redis broker", RedisBroker(REDIS_URL, prefix=f"bench-{uuid.uuid4().hex[:6]}"), args.count)
        await bench_redis_fanout(2_000, 1_000)
        await bench_kafka(args.count)


if __name__ == "__main__":
    asyncio.run(main())
