"""The presence domain on both engines: memory, and real Redis (store and broker) with a key prefix of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from tsunagu_core.broker import Broker, ClientInfo, MemoryBroker
from tsunagu_core.broker.redis import RedisBroker
from tsunagu_core.testing import REDIS_ENGINES, Recorder, eventually, redis_engine_url, require_stack
from tsunagu_core.wire.events_pb2 import GatewayEvent
from tsunagu_presence.store import MemoryPresenceStore, PresenceStore, RedisPresenceStore
from tsunagu_presence.tracker import PresenceTracker

DEAD_AFTER = 15.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


@dataclass
class Engines:
    store: PresenceStore
    broker: Broker
    recorder: Recorder
    clock: Clock

    def tracker(self) -> PresenceTracker:
        return PresenceTracker(self.store, self.broker, dead_after=DEAD_AFTER, clock=self.clock)


@pytest.fixture(params=["memory", *REDIS_ENGINES])
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[Engines]:
    store: PresenceStore
    broker: Broker
    prefix = f"test-presence-{uuid.uuid4().hex[:10]}"
    if request.param in REDIS_ENGINES:
        require_stack(f"the {request.param} presence store")
        url = redis_engine_url(request.param)
        store = RedisPresenceStore(url, prefix=prefix, tombstone_ttl=60)
        broker = RedisBroker(url, prefix=prefix)
    else:
        store = MemoryPresenceStore(tombstone_ttl=60)
        broker = MemoryBroker()
    await store.start()
    await broker.start()
    recorder = Recorder()
    broker.set_handler(recorder)
    try:
        yield Engines(store, broker, recorder, Clock())
    finally:
        if isinstance(store, RedisPresenceStore):
            keys = [key async for key in store.redis.scan_iter(f"*{prefix}*")]
            if keys:
                await store.redis.delete(*keys)
        await broker.close()
        await store.close()


def event(kind: int, node: str, client: str = "", user: str = "", channel: str = "") -> GatewayEvent:
    return GatewayEvent(
        kind=kind,  # type: ignore[arg-type]
        node=node,
        client_id=client,
        user_id=user,
        session_id=f"s-{client}" if client else "",
        channel=channel,
    )


def names() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"gw-{tag}", f"u-{tag}", f"chat:{tag}"


async def test_connect_and_disconnect(engines: Engines) -> None:
    tracker = engines.tracker()
    node, user, _ = names()
    at = engines.clock.ms
    assert await tracker.apply(event(GatewayEvent.CONNECTED, node, "c1", user), at)
    assert await tracker.apply(event(GatewayEvent.CONNECTED, node, "c2", user), at + 1)
    connections = await engines.store.connections(user)
    assert [(c.client, c.node, c.session, c.since) for c in connections] == [
        ("c1", node, "s-c1", at),
        ("c2", node, "s-c2", at + 1),
    ]
    assert await engines.store.online_users() >= 1
    await tracker.apply(event(GatewayEvent.DISCONNECTED, node, "c1", user), at + 2)
    assert [c.client for c in await engines.store.connections(user)] == ["c2"]
    await tracker.apply(event(GatewayEvent.DISCONNECTED, node, "c2", user), at + 3)
    assert await engines.store.connections(user) == []


async def test_replays_and_disconnect_before_connect_leave_no_stale_user(engines: Engines) -> None:
    tracker = engines.tracker()
    node, user, channel = names()
    at = engines.clock.ms
    stream = [
        event(GatewayEvent.CONNECTED, node, "c1", user),
        event(GatewayEvent.SUBSCRIBED, node, "c1", user, channel),
        event(GatewayEvent.UNSUBSCRIBED, node, "c1", user, channel),
        event(GatewayEvent.DISCONNECTED, node, "c1", user),
    ]
    for n, item in enumerate(stream * 3):  # a restart replays what was not committed, several times over
        await tracker.apply(item, at + n)
    assert await engines.store.connections(user) == []
    assert await engines.store.node_clients(node) == []

    # The gateway's concurrent sends can put DISCONNECTED first: the tombstone keeps the client out.
    await tracker.apply(event(GatewayEvent.DISCONNECTED, node, "c2", user), at)
    assert not await tracker.apply(event(GatewayEvent.SUBSCRIBED, node, "c2", user, channel), at)
    assert not await tracker.apply(event(GatewayEvent.CONNECTED, node, "c2", user), at)
    assert await engines.store.connections(user) == []
    assert await engines.store.node_clients(node) == []


async def test_dead_node_sweep_removes_entries_and_publishes_leaves_once(engines: Engines) -> None:
    clock, broker = engines.clock, engines.broker
    replicas = [engines.tracker(), engines.tracker()]
    dead, user, channel = names()
    alive, other_user, _ = names()
    quiet_channel = channel + "-nopresence"
    await broker.subscribe(channel)
    # The dead node's client is in the channel's presence (as the gateway leaves it on kill -9);
    # its other subscription had presence off, so no entry and no leave there.
    info = ClientInfo(user=user, client="c-dead", conn_info=b'{"name":"ann"}')
    await broker.add_presence(channel, "c-dead", info, ttl=60)
    await broker.add_presence(channel, "c-alive", ClientInfo(user=other_user, client="c-alive"), ttl=60)
    tracker = replicas[0]
    await tracker.apply(event(GatewayEvent.CONNECTED, dead, "c-dead", user), clock.ms)
    await tracker.apply(event(GatewayEvent.SUBSCRIBED, dead, "c-dead", user, channel), clock.ms)
    await tracker.apply(event(GatewayEvent.SUBSCRIBED, dead, "c-dead", user, quiet_channel), clock.ms)
    await tracker.apply(event(GatewayEvent.CONNECTED, alive, "c-alive", other_user), clock.ms)
    await tracker.apply(event(GatewayEvent.SUBSCRIBED, alive, "c-alive", other_user, channel), clock.ms)

    # Within the bound nothing happens, however often the alive node heartbeats.
    for _ in range(3):
        clock.now += DEAD_AFTER / 3
        await tracker.apply(event(GatewayEvent.NODE_HEARTBEAT, alive), clock.ms)
        assert await tracker.sweep() == []
    assert [c.client for c in await engines.store.connections(user)] == ["c-dead"]

    clock.now += 0.5
    await tracker.apply(event(GatewayEvent.NODE_HEARTBEAT, alive), clock.ms)
    # Two replicas sweep at the same moment: the claim lets exactly one of them do it.
    results = await asyncio.gather(*(replica.sweep() for replica in replicas))
    assert sorted(len(r) for r in results) == [0, 1] and [n for r in results for n in r] == [dead]
    assert await engines.store.connections(user) == []
    assert [c.client for c in await engines.store.connections(other_user)] == ["c-alive"]
    assert set(await broker.presence(channel)) == {"c-alive"}
    await eventually(lambda: len(engines.recorder.presence) >= 1)
    await asyncio.sleep(0.1)
    assert engines.recorder.presence == [(channel, False, info)]
    # Another round sweeps nothing more; a replayed event the dead node sent before dying is refused.
    assert await replicas[1].sweep() == []
    assert not await tracker.apply(event(GatewayEvent.CONNECTED, dead, "c-late", user), clock.ms - 20_000)
    assert await engines.store.connections(user) == []
    # If the node was alive after all, its next heartbeat brings it back for new connections.
    assert await tracker.apply(event(GatewayEvent.NODE_HEARTBEAT, dead), clock.ms + 1000)
    assert await tracker.apply(event(GatewayEvent.CONNECTED, dead, "c-new", user), clock.ms + 1001)
    assert [c.client for c in await engines.store.connections(user)] == ["c-new"]
