"""A Redis primary killed, or a slot moved, while publications flow (Redis Cluster and Sentinel): nobody
silently misses one.

Each test runs its own set of private servers (it kills one). A subscriber node acts as the gateway
does: when the broker reports its fan-out was re-established it recovers every channel from history
since the last position it holds; a recovery that finds another epoch is Centrifugo's
"unrecoverable position" (the client is told and starts again from the top). The publisher retries a
failed publish under its idempotency key, as a client whose publish errored does.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from tsunagu_core.broker import BrokerError, Publication, PublishOptions, PublishRequest, StreamPosition
from tsunagu_core.broker.redis import RedisBroker
from tsunagu_core.testing import eventually, require_stack

from tsunagu.stack.redis import PrivateRedis
from tsunagu.stack.redis_sets import PrivateRedisCluster, PrivateRedisSentinel

KEEP = PublishOptions(history_size=1000, history_ttl=120)
CHANNELS = 6
PER_CHANNEL = 60


@dataclass
class ChannelState:
    """What one client subscribed to one channel holds."""

    position: StreamPosition | None = None
    received: list[bytes] = field(default_factory=list)
    # Set when a recovery found another epoch: the client was told its position is lost.
    told_lost: bool = False
    gaps: list[str] = field(default_factory=list)

    def take(self, publication: Publication) -> None:
        position = self.position
        if position is not None and publication.epoch == position.epoch and publication.offset <= position.offset:
            return  # already had it (live and recovered both carried it)
        if position is not None and publication.epoch == position.epoch and publication.offset != position.offset + 1:
            self.gaps.append(f"{position.offset} -> {publication.offset} in epoch {publication.epoch}")
        if position is not None and publication.epoch != position.epoch:
            # A live publication of another epoch: only a recovery may tell the client, never skip silently.
            self.gaps.append(f"epoch {position.epoch} -> {publication.epoch} without a recovery")
        self.received.append(publication.data)
        self.position = StreamPosition(publication.offset, publication.epoch)


class RecoveringSubscriber:
    """The gateway's part: live publications in order, and a history recovery after every resubscribe."""

    def __init__(self, broker: RedisBroker, channels: list[str]) -> None:
        self.broker = broker
        self.channels = {name: ChannelState() for name in channels}
        self.recoveries = 0
        self._lock = asyncio.Lock()

    async def on_publication(self, channel: str, publication: Publication) -> None:
        if channel in self.channels:
            async with self._lock:
                self.channels[channel].take(publication)

    async def on_presence(self, channel: str, join: bool, info: object) -> None:
        return None

    async def on_resubscribed(self) -> None:
        async with self._lock:
            for name, state in self.channels.items():
                await self._recover(name, state)
            self.recoveries += 1

    async def _recover(self, name: str, state: ChannelState) -> None:
        for _ in range(100):
            try:
                history = await self.broker.history(name, since=state.position)
                break
            except BrokerError:
                await asyncio.sleep(0.1)  # the cluster is still promoting the slot's replica
        else:
            raise AssertionError(f"no history of {name} after the failover")
        if state.position is not None and history.position.epoch != state.position.epoch:
            state.told_lost = True
            state.position = history.position
            return
        for publication in history.publications:
            state.take(publication)

    async def catch_up(self) -> None:
        async with self._lock:
            for name, state in self.channels.items():
                await self._recover(name, state)


async def publish_steadily(broker: RedisBroker, channel: str, acknowledged: list[bytes]) -> None:
    for i in range(PER_CHANNEL):
        data = f"{channel}#{i}".encode()
        options = PublishOptions(history_size=KEEP.history_size, history_ttl=KEEP.history_ttl, idempotency_key=f"k{i}")
        for _ in range(200):
            try:
                await broker.publish(channel, data, options)
                acknowledged.append(data)
                break
            except BrokerError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{channel}: publication {i} never accepted after the failover")
        await asyncio.sleep(0.04)


async def run_failover(
    url: str, channels: list[str], kill: Callable[[], PrivateRedis], wait_failover: Callable[[PrivateRedis], object]
) -> RecoveringSubscriber:
    """Publish on `channels`, `kill` a primary a third of the way through, and check what the subscriber got."""
    prefix = f"test-failover-{uuid.uuid4().hex[:8]}"
    publisher = RedisBroker(url, prefix=prefix, retry_max=0.5)
    subscriber_node = RedisBroker(url, prefix=prefix, retry_max=0.5)
    subscriber = RecoveringSubscriber(subscriber_node, channels)
    subscriber_node.set_handler(subscriber)
    await publisher.start()
    await subscriber_node.start()
    acknowledged: dict[str, list[bytes]] = {name: [] for name in channels}
    try:
        for name in channels:
            await subscriber_node.subscribe(name)
        publishers = [asyncio.create_task(publish_steadily(publisher, n, acknowledged[n])) for n in channels]
        await eventually(lambda: all(len(a) >= PER_CHANNEL // 3 for a in acknowledged.values()), timeout=20)
        killed = kill()
        await asyncio.to_thread(wait_failover, killed)
        await asyncio.wait_for(asyncio.gather(*publishers), timeout=60)
        await eventually(lambda: subscriber.recoveries >= 1, timeout=20)
        await subscriber.catch_up()
    finally:
        await publisher.close()
        await subscriber_node.close()
    for name, state in subscriber.channels.items():
        assert not state.gaps, f"{name}: publications skipped without telling: {state.gaps}"
        missing = [data for data in acknowledged[name] if data not in state.received]
        assert not missing or state.told_lost, f"{name}: {len(missing)} acknowledged publications silently missed"
        assert len(acknowledged[name]) == PER_CHANNEL
    return subscriber


def new_channels() -> list[str]:
    return [f"chat:{uuid.uuid4().hex[:8]}" for _ in range(CHANNELS)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivateRedisCluster]:
    require_stack("the Redis Cluster failover test")
    with PrivateRedisCluster(tmp_path / "cluster") as servers:
        yield servers


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[PrivateRedisSentinel]:
    require_stack("the Redis Sentinel failover test")
    with PrivateRedisSentinel(tmp_path / "sentinel") as servers:
        yield servers


async def test_a_cluster_primary_killed_mid_stream_loses_nobody_silently(cluster: PrivateRedisCluster) -> None:
    channels = new_channels()
    victim = cluster.primary_of("{" + channels[0] + "}")
    on_victim = {name for name in channels if cluster.primary_of("{" + name + "}") is victim}
    subscriber = await run_failover(
        cluster.url, channels, lambda: cluster.kill_primary_of("{" + channels[0] + "}"), cluster.wait_failover
    )
    # The shards that kept their primary keep their positions: their channels recover everything.
    for name, state in subscriber.channels.items():
        if name not in on_victim:
            assert not state.told_lost, f"{name} lost its position though its primary was not killed"
            assert len(state.received) == PER_CHANNEL
    assert len(on_victim) < CHANNELS or CHANNELS == 1


async def test_a_sentinel_primary_killed_mid_stream_loses_nobody_silently(sentinel: PrivateRedisSentinel) -> None:
    subscriber = await run_failover(sentinel.url, new_channels(), sentinel.kill_primary, sentinel.wait_failover)
    # The promoted replica starts new epochs: every subscriber whose recovery crossed it was told so.
    assert all(state.told_lost for state in subscriber.channels.values())


async def test_a_slot_moved_to_another_primary_is_followed_by_publishers_and_subscribers(
    cluster: PrivateRedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsunagu.broker.redis")
    name = new_channels()[0]
    prefix = f"test-reshard-{uuid.uuid4().hex[:8]}"
    publisher = RedisBroker(cluster.url, prefix=prefix, retry_max=0.5)
    subscriber_node = RedisBroker(cluster.url, prefix=prefix, retry_max=0.5)
    subscriber = RecoveringSubscriber(subscriber_node, [name])
    subscriber_node.set_handler(subscriber)
    await publisher.start()
    await subscriber_node.start()
    try:
        await subscriber_node.subscribe(name)
        before = [f"before-{i}".encode() for i in range(10)]
        await publisher.publish_many([PublishRequest(name, data, KEEP) for data in before])
        await eventually(lambda: len(subscriber.channels[name].received) == 10)
        old = cluster.primary_of("{" + name + "}")
        new = await asyncio.to_thread(cluster.move_slot_of, "{" + name + "}")
        assert new is not old
        # The publisher's slot map is stale: its batch is refused by the old owner before any write,
        # then sent to the new one.
        after = [f"after-{i}".encode() for i in range(10)]
        results = await publisher.publish_many([PublishRequest(name, data, KEEP) for data in after])
        assert len({r.epoch for r in results}) == 1 and [r.offset for r in results] == sorted(r.offset for r in results)
        assert any("refused 10 publications" in record.message for record in caplog.records)
        history = await publisher.history(name)
        assert [p.data for p in history.publications][-10:] == after
        # The subscriber follows the slot (Redis dropped its shard channel) and catches up or is told.
        await eventually(lambda: subscriber.recoveries >= 1, timeout=10)
        late = [f"late-{i}".encode() for i in range(5)]
        for data in late:
            await publisher.publish(name, data, KEEP)
        state = subscriber.channels[name]
        await eventually(lambda: state.received[-1:] == late[-1:], timeout=10)
    finally:
        await publisher.close()
        await subscriber_node.close()
    assert not state.gaps, state.gaps
    missing = [data for data in [*before, *after, *late] if data not in state.received]
    assert not missing or state.told_lost, f"{len(missing)} publications silently missed"
    assert all(data in state.received for data in late)


async def test_publish_and_ssubscribe_during_a_slot_migration_follow_ask_redirections(
    cluster: PrivateRedisCluster,
) -> None:
    """Mid-reshard (the slot MIGRATING on its owner, IMPORTING on the target, its keys moved already),
    the owner answers the publish script with ASK: publications are accepted in order and readable in
    history, a subscriber that joins meanwhile (still on the owner) and one from before both end with
    every publication or are told their position is lost once the slot has moved."""
    name = new_channels()[0]
    prefix = f"test-ask-{uuid.uuid4().hex[:8]}"
    publisher = RedisBroker(cluster.url, prefix=prefix, retry_max=0.5)
    nodes = [RedisBroker(cluster.url, prefix=prefix, retry_max=0.5) for _ in range(2)]
    subscribers = [RecoveringSubscriber(node, [name]) for node in nodes]
    for node, subscriber in zip(nodes, subscribers, strict=True):
        node.set_handler(subscriber)
        await node.start()
    await publisher.start()
    sent: list[bytes] = []
    try:
        await nodes[0].subscribe(name)
        before = [f"before-{i}".encode() for i in range(10)]
        await publisher.publish_many([PublishRequest(name, data, KEEP) for data in before])
        sent += before
        await eventually(lambda: len(subscribers[0].channels[name].received) == 10)
        move = await asyncio.to_thread(cluster.start_slot_move, "{" + name + "}")
        await nodes[1].subscribe(name)  # the owner still owns the slot: SSUBSCRIBE is served there
        during = [f"during-{i}".encode() for i in range(10)]
        results = [await publisher.publish(name, data, KEEP) for data in during]
        sent += during
        assert [r.offset for r in results] == sorted({r.offset for r in results}), "offsets out of order"
        history = await publisher.history(name)
        assert [p.data for p in history.publications][-10:] == during
        stats = await asyncio.to_thread(redis.Redis(port=move.target.port).info, "commandstats")
        assert stats.get("cmdstat_asking", {}).get("calls", 0) >= 10, "the owner never redirected with ASK"
        await asyncio.to_thread(cluster.finish_slot_move, move)
        await eventually(lambda: all(s.recoveries >= 1 for s in subscribers), timeout=10)
        late = [f"late-{i}".encode() for i in range(5)]
        for data in late:
            await publisher.publish(name, data, KEEP)
        sent += late
        states = [s.channels[name] for s in subscribers]
        await eventually(lambda: all(state.received[-1:] == late[-1:] for state in states), timeout=10)
    finally:
        await publisher.close()
        for node in nodes:
            await node.close()
    for index, state in enumerate(states):
        assert not state.gaps, state.gaps
        expected = sent if index == 0 else [*during, *late]
        missing = [data for data in expected if data not in state.received]
        assert not missing or state.told_lost, f"subscriber {index}: {len(missing)} publications silently missed"
        assert all(data in state.received for data in late)
