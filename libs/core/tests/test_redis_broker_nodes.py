"""Redis-only: what only shows with several nodes or a broken connection."""

from __future__ import annotations

import asyncio
import uuid

from tsunagu_core.broker import PublishOptions
from tsunagu_core.broker.redis import RedisBroker
from tsunagu_core.testing import REDIS_URL, Recorder, require_stack


async def test_two_nodes_see_one_order_for_concurrent_publishers() -> None:
    require_stack("two Redis broker nodes")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    nodes = [RedisBroker(REDIS_URL, prefix=prefix) for _ in range(2)]
    recorders = [Recorder(), Recorder()]
    for node, recorder in zip(nodes, recorders, strict=True):
        node.set_handler(recorder)
        await node.start()
        await node.subscribe("chat:room")
    try:
        options = PublishOptions(history_size=500, history_ttl=60)

        async def publish_many(node: RedisBroker, name: str) -> None:
            for i in range(100):
                await node.publish("chat:room", f"{name}-{i}".encode(), options)

        await asyncio.gather(publish_many(nodes[0], "a"), publish_many(nodes[1], "b"))
        async with asyncio.timeout(5):
            while any(len(r.publications) < 200 for r in recorders):
                await asyncio.sleep(0.01)
        seen = [[(p.offset, p.data) for _, p in r.publications] for r in recorders]
        assert seen[0] == seen[1]
        assert [offset for offset, _ in seen[0]] == list(range(1, 201))
        history = await nodes[0].history("chat:room")
        assert [(p.offset, p.data) for p in history.publications] == seen[0]
    finally:
        for node in nodes:
            await node.close()


async def test_lost_fanout_connection_is_restored_and_reported() -> None:
    require_stack("the Redis broker")
    broker = RedisBroker(REDIS_URL, prefix=f"test-{uuid.uuid4().hex[:10]}", retry_max=0.5)
    recorder = Recorder()
    broker.set_handler(recorder)
    await broker.start()
    try:
        await broker.subscribe("chat:kill")
        killed = await broker.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) >= 1
        async with asyncio.timeout(10):
            while recorder.resubscribed == 0:
                await asyncio.sleep(0.02)
        await broker.publish("chat:kill", b"after", PublishOptions(history_size=10))
        async with asyncio.timeout(5):
            while not recorder.publications:
                await asyncio.sleep(0.01)
        assert recorder.publications[0][1].data == b"after"
    finally:
        await broker.close()


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing() -> None:
    """A thousand clients subscribing at once read history concurrently: with 4 connections in the pool
    every read still succeeds (callers queue for a connection) rather than "Too many connections"."""
    require_stack("the Redis broker")
    broker = RedisBroker(REDIS_URL, prefix=f"test-{uuid.uuid4().hex[:10]}", max_connections=4)
    broker.set_handler(Recorder())
    await broker.start()
    try:
        await broker.publish("chat:burst", b"1", PublishOptions(history_size=10, history_ttl=60))
        results = await asyncio.gather(*(broker.history("chat:burst", limit=10) for _ in range(500)))
        assert all(len(r.publications) == 1 for r in results)
    finally:
        await broker.close()
