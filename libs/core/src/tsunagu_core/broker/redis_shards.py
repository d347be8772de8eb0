"""Sharded pub/sub on Redis Cluster: one subscriber connection per shard whose slots a node's channels use.

A channel's fan-out name carries its hash tag, so it lives in the slot of the channel's keys and is
SSUBSCRIBEd on that slot's primary. This node then holds one connection per primary serving at least one
of its channels (at most one per shard, whatever the number of channels), each read by a task of its own.

The subscription follows the slot:
- a slot moved to another primary (resharding): Redis drops its shard channels with a `sunsubscribe`
  nobody asked for; the channel is subscribed again on the new owner;
- a primary gone (killed, failed over): its connection breaks; once the cluster has promoted a replica
  (the slot map refreshed), every channel it carried is subscribed on its new owner;
- a SSUBSCRIBE answered MOVED (our slot map was stale): the map is refreshed and the channel retried.
Each of these may have lost publications in between, so the handler's `on_resubscribed` is called
after it: subscribers recover from history (or are told their position is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ClusterDownError, RedisError, ResponseError

from tsunagu_core.telemetry import BROKER_RESUBSCRIBES

log = logging.getLogger("tsunagu.broker.redis")

CONFIRM_SECONDS = 5.0


@dataclass(eq=False)
class _Shard:
    node: str
    client: Redis
    pubsub: PubSub
    names: set[bytes] = field(default_factory=set)
    reader: asyncio.Task[None] | None = None


class ShardedFanout:
    """SSUBSCRIBE bookkeeping of one broker: which fan-out names are wanted and on which shard each is."""

    def __init__(
        self,
        cluster: RedisCluster,
        on_message: Callable[[dict[str, Any]], Awaitable[None]],
        on_resubscribed: Callable[[], Awaitable[None]],
        retry_max: float,
    ) -> None:
        self.cluster = cluster
        self.on_message = on_message
        self.on_resubscribed = on_resubscribed
        self.retry_max = retry_max
        self.wanted: set[bytes] = set()
        self._shards: dict[str, _Shard] = {}
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()
        self._repairs: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def connections(self) -> int:
        """Subscriber connections held now (one per shard in use)."""
        return len(self._shards)

    def shard_of(self, name: bytes) -> str | None:
        return next((shard.node for shard in self._shards.values() if name in shard.names), None)

    async def subscribe(self, name: bytes) -> None:
        self.wanted.add(name)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(name, []).append(waiter)
        try:
            async with self._lock:
                await self._place(name)
            await asyncio.wait_for(waiter, timeout=CONFIRM_SECONDS)
        except BaseException:
            self.wanted.discard(name)
            raise
        finally:
            waiters = self._confirmations.get(name, [])
            if waiter in waiters:
                waiters.remove(waiter)

    async def unsubscribe(self, name: bytes) -> None:
        self.wanted.discard(name)
        async with self._lock:
            for shard in self._shards.values():
                if name in shard.names:
                    shard.names.discard(name)
                    with contextlib.suppress(RedisError, OSError):
                        await shard.pubsub.sunsubscribe(name)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._repairs):
            task.cancel()
        for shard in list(self._shards.values()):
            await self._drop(shard)

    # placing names on shards

    async def _place(self, name: bytes) -> None:
        """SSUBSCRIBE `name` on the primary of its slot (as the client's slot map has it)."""
        node = self._owner(name)
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._open(node)
        for other in self._shards.values():
            if other is not shard:
                other.names.discard(name)
        shard.names.add(name)
        try:
            await shard.pubsub.ssubscribe(name)
        except BaseException:
            shard.names.discard(name)
            if not shard.names:
                await self._drop(shard)  # (a node that is gone: no reader left polling it)
            raise

    def _owner(self, name: bytes) -> ClusterNode:
        node = self.cluster.get_node_from_key(name.decode())
        if node is None:
            raise ClusterDownError(f"no primary serves the slot of {name!r}")
        return node

    def _open(self, node: ClusterNode) -> _Shard:
        # A connection of its own on the node's address and credentials (TLS included).
        pool = ConnectionPool(connection_class=node.connection_class, max_connections=1, **node.connection_kwargs)
        client = Redis(connection_pool=pool)
        shard = _Shard(node.name, client, client.pubsub())
        shard.reader = asyncio.create_task(self._read(shard), name=f"redis-broker-shard-{node.name}")
        self._shards[node.name] = shard
        return shard

    async def _drop(self, shard: _Shard) -> None:
        if self._shards.get(shard.node) is shard:
            del self._shards[shard.node]
        if shard.reader is not None and shard.reader is not asyncio.current_task():
            shard.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await shard.reader
        with contextlib.suppress(Exception):
            await shard.pubsub.aclose()
        with contextlib.suppress(Exception):
            await shard.client.aclose()

    # reading one shard

    async def _read(self, shard: _Shard) -> None:
        while True:
            if shard.pubsub.connection is None:
                await asyncio.sleep(0.01)  # the first SSUBSCRIBE is on its way
                continue
            try:
                message = await shard.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                # MOVED/ASK: our slot map was stale when we subscribed; a name of this shard belongs elsewhere
                log.info("shard %s refused a subscription (%s); refreshing the slot map", shard.node, exc)
                self._repair(shard, lost=False)
                continue
            except Exception as exc:
                if self._closing:
                    return
                log.warning("fan-out connection to shard %s lost (%s)", shard.node, exc)
                self._repair(shard, lost=True)
                return
            if message is None:
                continue
            kind = message["type"]
            name = message["channel"]
            if kind == "ssubscribe":
                for waiter in self._confirmations.pop(name, []):
                    if not waiter.done():
                        waiter.set_result(None)
            elif kind == "sunsubscribe":
                if name in self.wanted and name in shard.names:
                    # Not ours: Redis dropped it because its slot moved to another primary.
                    log.info("shard %s gave up %r (slot moved); following it", shard.node, name)
                    shard.names.discard(name)
                    self._repair(shard, lost=False, names={name})
            else:
                await self.on_message(message)

    def _repair(self, shard: _Shard, *, lost: bool, names: set[bytes] | None = None) -> None:
        task = asyncio.create_task(self._move(shard, lost, names), name=f"redis-broker-repair-{shard.node}")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _move(self, shard: _Shard, lost: bool, names: set[bytes] | None) -> None:
        """Subscribe `names` (all of a lost shard's) on their owners now, retrying until the cluster has
        a primary for each, then tell the handler publications may have been missed."""
        backoff = 0.1
        if lost:
            names = set(shard.names)
            await self._drop(shard)
        elif names is None:
            # A MOVED names no channel, so every name of this shard is placed again (SSUBSCRIBE twice on one
            # node is harmless). While a slot moves, nodes can disagree for a moment (the source already
            # gave it up, the target not yet told): wait a little so the refreshed map is the settled one.
            await asyncio.sleep(backoff)
        while not self._closing:
            pending = {name for name in (names if names is not None else set(shard.names)) if name in self.wanted}
            try:
                await self.cluster.nodes_manager.initialize()
                async with self._lock:
                    for name in pending:
                        await self._place(name)
                break
            except (RedisError, OSError) as exc:
                log.info("cluster not ready to take over %d fan-out names yet (%s)", len(pending), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max)
        if self._closing:
            return
        BROKER_RESUBSCRIBES.inc()
        log.info("fan-out of %d channels moved off shard %s", len(names or ()), shard.node)
        await self.on_resubscribed()
