"""`make bench`: throughput and latency of the core engines on this machine, before and after batching.

Rows, each with the issue's target where it has one:
- broker publish (history append + fan-out, one atomic step) per engine: sequential, 64 in flight
  (concurrent single publishes, which the Redis engine batches into one script call), and
  `publish_many` batches of 64 and 512 publications over 100 channels;
- "before" rows for Redis: the previous engine's way, one EVALSHA per publication with 11 arguments
  (stream history), sequential and pipelined 64 at a time, kept here as a baseline for the same run;
- broker history read of 100 publications (one channel, sequential and 64 concurrent);
- Redis fan-out: publish -> delivery latency to a second node, p50/p99;
- Kafka bus: publish awaiting each event (1,000 in flight) and `publish_many` batches of 1,000;
  a group consuming it back with an event handler (`consume`) and with a batch handler
  (`consume_batches`).
Run with the stack up (`make bench` starts Redis and Kafka). Prints a table and writes the raw
results to bench/results/<time>-engines.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from record import Recorder
from tsunagu_core.broker import Broker, ClientInfo, MemoryBroker, Publication, PublishOptions, PublishRequest
from tsunagu_core.broker.codec import encode_publication_body
from tsunagu_core.broker.redis import RedisBroker
from tsunagu_core.bus import BusMessage, Outgoing
from tsunagu_core.bus.kafka import KafkaBus

REDIS_URL = os.environ.get("TSUNAGU_REDIS_URL", "redis://127.0.0.1:6379/0")
KAFKA = os.environ.get("TSUNAGU_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
PAYLOAD = b'{"text":"' + b"x" * 180 + b'"}'  # ~200 B, a chat message
OPTIONS = PublishOptions(history_size=100, history_ttl=300, info=ClientInfo(user="bench", client="c"))

recorder: Recorder


def report(name: str, value: float, unit: str, note: str = "", target: str = "") -> None:
    text = f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.2f} {unit}"
    recorder.add(name, value, unit, note=note, target=target)
    print(f"  {name:<58} {text:>18}  {note}{'  target ' + target if target else ''}", flush=True)


async def rate(operation: Callable[[int], Awaitable[object]], count: int, in_flight: int) -> float:
    started = time.perf_counter()
    for first in range(0, count, in_flight):
        await asyncio.gather(*(operation(i) for i in range(first, min(count, first + in_flight))))
    return count / (time.perf_counter() - started)


async def batch_rate(publish: Callable[[Sequence[PublishRequest]], Awaitable[object]], count: int, size: int) -> float:
    requests = [PublishRequest(f"bench:{uuid.uuid4().hex[:4]}:{i % 100}", PAYLOAD, OPTIONS) for i in range(size)]
    started = time.perf_counter()
    for _ in range(max(1, count // size)):
        await publish(requests)
    return max(1, count // size) * size / (time.perf_counter() - started)


async def bench_broker(label: str, broker: Broker, count: int) -> None:
    channel = f"bench:{uuid.uuid4().hex[:8]}"
    await broker.start()
    try:
        report(
            f"{label} publish+history, sequential",
            await rate(lambda i: broker.publish(channel, PAYLOAD, OPTIONS), count, 1),
            "pub/s",
            target=">= 5,000/s (Redis)",
        )
        report(
            f"{label} publish+history, 64 in flight",
            await rate(lambda i: broker.publish(channel, PAYLOAD, OPTIONS), count, 64),
            "pub/s",
            target=">= 50,000/s (Redis)",
        )
        for size in (64, 512):
            report(
                f"{label} publish_many, batches of {size} (100 channels)",
                await batch_rate(broker.publish_many, count * 2, size),
                "pub/s",
                target=">= 50,000/s (Redis)",
            )
        callers, each = 4, max(1, count // 2 // 128) * 128
        started = time.perf_counter()
        await asyncio.gather(*(batch_rate(broker.publish_many, each, 128) for _ in range(callers)))
        total = callers * each
        report(
            f"{label} publish_many, {callers} callers x batches of 128",
            total / (time.perf_counter() - started),
            "pub/s",
            note="as a batch consumer's partition workers call it",
            target=">= 50,000/s (Redis)",
        )
        reads = max(200, count // 20)
        report(
            f"{label} history read (100 publications)",
            await rate(lambda i: broker.history(channel, limit=100), reads, 1),
            "reads/s",
        )
        report(
            f"{label} history read (100 publications), 64 in flight",
            await rate(lambda i: broker.history(channel, limit=100), reads, 64),
            "reads/s",
        )
    finally:
        await broker.close()


# The engine before batching, for a baseline in the same run: one script call per publication with
# its keys and arguments (stream history), as tsunagu 0.1's RedisBroker.publish sent it.
_LEGACY_PUBLISH = """
local offset = 0
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[7]
  redis.call('hset', KEYS[2], 'e', epoch)
  redis.call('del', KEYS[1])
end
offset = redis.call('hincrby', KEYS[2], 's', 1)
redis.call('xadd', KEYS[1], 'MAXLEN', '=', ARGV[2], '0-' .. offset, 'd', ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('pexpire', KEYS[1], ARGV[3]) end
if tonumber(ARGV[4]) > 0 then redis.call('pexpire', KEYS[2], ARGV[4]) end
redis.call('publish', ARGV[6], 'p' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
return {offset, epoch, 0}
"""


async def bench_legacy_redis(count: int) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    script = client.register_script(_LEGACY_PUBLISH)
    prefix = f"bench-legacy-{uuid.uuid4().hex[:6]}"

    def call(pipe: object = None) -> Awaitable[object]:
        body = encode_publication_body(Publication(data=PAYLOAD, info=OPTIONS.info, time_ms=int(time.time() * 1000)))
        keys = [f"{prefix}:h:{{c}}", f"{prefix}:m:{{c}}", f"{prefix}:i:{{c}}:"]
        args = [body, 100, 300000, 86400000, 300000, f"{prefix}.ch.c", uuid.uuid4().hex[:8], "0"]
        return script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]

    async def pipelined(i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(64):
            await call(pipe)
        await pipe.execute()

    try:
        report(
            "before: redis one script per publication, sequential", await rate(lambda i: call(), count // 4, 1), "pub/s"
        )
        started = time.perf_counter()
        rounds = max(1, count // 64)
        for i in range(rounds):
            await pipelined(i)
        report(
            "before: redis one script per publication, 64 pipelined",
            rounds * 64 / (time.perf_counter() - started),
            "pub/s",
        )
        history = client.register_script("return redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 100)")
        from tsunagu_core.broker.codec import decode_publication_body

        async def read(i: int) -> None:
            for entry_id, fields in await history(keys=[f"{prefix}:h:{{c}}"]):
                decode_publication_body(fields[1], int(entry_id.split(b"-")[1]), "e")

        report(
            "before: redis history read (stream, 100 publications)",
            await rate(read, max(200, count // 20), 1),
            "reads/s",
        )
    finally:
        await client.aclose()


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
            "kafka publish awaiting each (idempotent, acks=all), 1000 in flight",
            await rate(lambda i: bus.publish(topic, PAYLOAD, key=f"user-{i % 64}"), count, 1000),
            "events/s",
        )
        started = time.perf_counter()
        for first in range(0, count, 1000):
            await bus.publish_many([Outgoing(topic, PAYLOAD, key=f"user-{i % 64}") for i in range(first, first + 1000)])
        report("kafka publish_many, batches of 1000", count / (time.perf_counter() - started), "events/s")
        total = count * 2

        seen = 0
        done = asyncio.Event()

        async def handle(message: BusMessage) -> None:
            nonlocal seen
            seen += 1
            if seen >= total:
                done.set()

        started = time.perf_counter()
        consumer = await bus.consume([topic], f"bench-{uuid.uuid4().hex[:6]}", handle)
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
        await consumer.stop()
        report("kafka group consume, event handler (consume)", total / elapsed, "events/s", "includes group join")

        seen = 0
        done = asyncio.Event()

        async def handle_batch(messages: Sequence[BusMessage]) -> None:
            nonlocal seen
            seen += len(messages)
            if seen >= total:
                done.set()

        started = time.perf_counter()
        consumer = await bus.consume_batches([topic], f"bench-{uuid.uuid4().hex[:6]}", handle_batch)
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
        await consumer.stop()
        report(
            "kafka group consume, batch handler (consume_batches)",
            total / elapsed,
            "events/s",
            "includes group join",
            target=">= 50,000/s",
        )
    finally:
        await bus.close()


async def main() -> None:
    global recorder
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000, help="operations per row (Kafka: events per run)")
    parser.add_argument("--kafka-count", type=int, default=100_000, help="events produced for the Kafka rows")
    parser.add_argument("--memory-only", action="store_true", help="skip Redis and Kafka")
    args = parser.parse_args()
    recorder = Recorder("engines", vars(args) | {"payload_bytes": len(PAYLOAD)})
    print(f"tsunagu bench: {os.cpu_count()} cores, payload {len(PAYLOAD)} B, {args.count} operations per row")
    await bench_broker("memory broker", MemoryBroker(), args.count)
    if not args.memory_only:
        await bench_legacy_redis(args.count)
        await bench_broker("redis broker", RedisBroker(REDIS_URL, prefix=f"bench-{uuid.uuid4().hex[:6]}"), args.count)
        await bench_redis_fanout(2_000, 1_000)
        await bench_kafka(args.kafka_count // 2)
    recorder.save()


if __name__ == "__main__":
    asyncio.run(main())
