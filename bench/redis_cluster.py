"""One Redis primary vs a 3-primary Redis Cluster under the same broker load (issue 23).

Both are private servers started here (no persistence, the same redis-server), so the shared stack is
not needed and the two runs differ only in the engine. Per engine:
- publications/s with 64 concurrent publishers over `--channels` channels (single publishes, which the
  broker batches: per slot on the cluster) and with `publish_many` batches of 512;
- publish -> deliver latency p50/p99 at a second broker node subscribed to every channel (sharded
  pub/sub on the cluster), at a steady rate below saturation;
- on the cluster, per-primary `INFO commandstats` after the load: script calls (EVALSHA) and
  SPUBLISH counts, and how many of the channels each primary holds (the spread, target within
  +-15 % of the mean), plus a check that each single publish ran on exactly one primary.

    .venv/bin/python bench/redis_cluster.py [--channels 300] [--seconds 5]

Writes bench/results/redis-cluster-<time>.json. On a 2-core machine the cluster's three primaries
and the client share the same cores: the figures show the cost per publication, not scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from record import Recorder
from tsunagu_core.broker import Publication, PublishOptions, PublishRequest
from tsunagu_core.broker.redis import RedisBroker

from tsunagu.stack.redis import PrivateRedis
from tsunagu.stack.redis_sets import PrivateRedisCluster

OPTIONS = PublishOptions(history_size=100, history_ttl=300)
PAD = b"x" * 180  # ~200 B publications, as bench/run.py
IN_FLIGHT = 64


class LatencyProbe:
    """A subscriber node's handler: publish time is in the payload, delivery time is now."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.delivered = 0

    async def on_publication(self, channel: str, publication: Publication) -> None:
        self.delivered += 1
        if publication.data[:1] == b"t":
            (sent,) = struct.unpack(">d", publication.data[1:9])
            self.latencies.append(time.perf_counter() - sent)

    async def on_presence(self, channel: str, join: bool, info: object) -> None:
        return None

    async def on_resubscribed(self) -> None:
        return None


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


async def measure(url: str, channels: list[str], seconds: float, report: Any) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    publisher = RedisBroker(url, prefix=prefix)
    subscriber = RedisBroker(url, prefix=prefix)
    probe = LatencyProbe()
    subscriber.set_handler(probe)
    await publisher.start()
    await subscriber.start()
    try:
        for name in channels:
            await subscriber.subscribe(name)
        report("fan-out connections of the subscriber node", subscriber.fanout_connections, "connections")

        # saturation: 64 publishers, each awaiting its publish
        deadline = time.perf_counter() + seconds
        counts = [0] * IN_FLIGHT

        async def publisher_loop(index: int) -> None:
            i = index
            while time.perf_counter() < deadline:
                await publisher.publish(channels[i % len(channels)], b"s" + PAD, OPTIONS)
                counts[index] += 1
                i += IN_FLIGHT

        started = time.perf_counter()
        await asyncio.gather(*(publisher_loop(i) for i in range(IN_FLIGHT)))
        report("publish, 64 in flight", sum(counts) / (time.perf_counter() - started), "publications/s")

        batch = [PublishRequest(channels[i % len(channels)], b"b" + PAD, OPTIONS) for i in range(512)]
        started = time.perf_counter()
        rounds = 0
        while time.perf_counter() - started < seconds:
            await publisher.publish_many(batch)
            rounds += 1
        report("publish_many, batches of 512", rounds * 512 / (time.perf_counter() - started), "publications/s")

        # latency at a steady 2,000/s (below saturation on either engine here)
        probe.latencies.clear()
        rate, count = 2000, int(2000 * min(seconds, 5))
        started = time.perf_counter()
        pending: set[asyncio.Task[Any]] = set()
        for i in range(count):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            data = b"t" + struct.pack(">d", time.perf_counter()) + PAD
            task = asyncio.create_task(publisher.publish(channels[i % len(channels)], data, OPTIONS))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        wait_until = time.perf_counter() + 10
        while len(probe.latencies) < count and time.perf_counter() < wait_until:
            await asyncio.sleep(0.05)
        report("publish -> deliver p50 at 2,000/s", percentile(probe.latencies, 0.5) * 1000, "ms")
        report("publish -> deliver p99 at 2,000/s", percentile(probe.latencies, 0.99) * 1000, "ms")
        report("delivered of those published at 2,000/s", len(probe.latencies) / count * 100, "%")
    finally:
        await publisher.close()
        await subscriber.close()


def primaries(cluster: PrivateRedisCluster) -> list[redis.Redis]:
    clients = [redis.Redis(port=port, socket_timeout=5) for port in cluster.ports]
    return [client for client in clients if client.info("replication")["role"] == "master"]


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def one_shard_per_publish(url: str, nodes: list[redis.Redis], channels: list[str]) -> tuple[int, int]:
    """Sequential single publishes: how many primaries ran a script call for each (expected: exactly 1)."""
    broker = RedisBroker(url, prefix=f"bench-{uuid.uuid4().hex[:6]}")
    await broker.start()
    exact = 0
    try:
        for name in channels[:100]:
            before = [command_calls(node).get("evalsha", 0) for node in nodes]
            await broker.publish(name, b"one", OPTIONS)
            after = [command_calls(node).get("evalsha", 0) for node in nodes]
            touched = sum(1 for b, a in zip(before, after, strict=True) if a > b)
            exact += touched == 1
    finally:
        await broker.close()
    return exact, min(100, len(channels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    recorder = Recorder("redis-cluster", {"channels": args.channels, "seconds": args.seconds, "in_flight": IN_FLIGHT})
    channels = [f"bench:{uuid.uuid4().hex[:8]}" for _ in range(args.channels)]
    directory = Path(tempfile.mkdtemp(prefix="tsunagu-bench-cluster-"))

    def reporter(engine: str) -> Any:
        def report(name: str, value: float, unit: str, **details: Any) -> None:
            recorder.add(f"{engine}: {name}", value, unit, engine=engine, **details)
            print(f"  {engine:<14} {name:<46} {value:>12,.2f} {unit}", flush=True)

        return report

    with PrivateRedis(directory / "single") as single:
        asyncio.run(measure(single.url, channels, args.seconds, reporter("one primary")))

    with PrivateRedisCluster(directory / "cluster") as cluster:
        nodes = primaries(cluster)
        for node in nodes:
            node.config_resetstat()
        report = reporter("3-primary cluster")
        asyncio.run(measure(cluster.url, channels, args.seconds, report))
        slot_owner = {}
        for start, end, primary, *_ in nodes[0].execute_command("CLUSTER", "SLOTS"):
            slot_owner[(int(start), int(end))] = int(primary[1])
        per_node: dict[int, int] = {node.connection_pool.connection_kwargs["port"]: 0 for node in nodes}
        for name in channels:
            slot = int(nodes[0].cluster("keyslot", "{" + name + "}"))
            port = next(p for (s, e), p in slot_owner.items() if s <= slot <= e)
            per_node[port] += 1
        mean = statistics.mean(per_node.values())
        for node in nodes:
            port = node.connection_pool.connection_kwargs["port"]
            calls = command_calls(node)
            details = {"port": port, "evalsha": calls.get("evalsha", 0), "spublish": calls.get("spublish", 0)}
            report(f"primary :{port} channels held", per_node[port], "channels", **details)
            report(f"primary :{port} script calls (EVALSHA)", calls.get("evalsha", 0), "calls", port=port)
            report(f"primary :{port} SPUBLISH", calls.get("spublish", 0), "calls", port=port)
            report(f"primary :{port} PUBLISH (unsharded)", calls.get("publish", 0), "calls", port=port)
        spread = max(abs(count - mean) / mean * 100 for count in per_node.values())
        report("largest deviation of channels per primary from the mean", spread, "%", target="<= 15 %")
        exact, total = asyncio.run(one_shard_per_publish(cluster.url, nodes, channels))
        report("single publishes that ran on exactly one primary", exact / total * 100, "%", target="100 %")
    recorder.save()


if __name__ == "__main__":
    main()
