"""The presence domain: gateway events in, who is online out, and the sweep of dead gateway nodes.

Liveness. Every event a node sends (NODE_HEARTBEAT every 5 s, connection events) marks it seen at
the time presence processes it. A node not seen for `dead_after` seconds (default 15 s, three
heartbeats) is dead: one replica claims it (a Redis claim per node), marks it dead, removes each of
its clients from the per-user state and, on every channel where the client still has a presence
entry in the broker, removes that entry and publishes a leave. So a dead node's clients are gone
within dead_after + sweep_interval (+ the sweep itself) of its last processed event. A replica
sweeps only after it has itself been consuming for dead_after, so after a restart the replayed and
fresh heartbeats land before anything is judged.

Ordering. The gateway keys events by user, so one user's events are ordered within a partition,
but it sends them from concurrent tasks, so a DISCONNECTED may still land before the CONNECTED or
SUBSCRIBED of the same client: a disconnect leaves a tombstone (tombstone_ttl) that makes later
CONNECTED/SUBSCRIBED of that client no-ops. Replays after a restart repeat idempotent operations.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram
from tsunagu_core.broker import Broker
from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.wire.events_pb2 import GatewayEvent

from tsunagu_presence.store import PresenceStore

log = logging.getLogger("tsunagu.presence")

ONLINE_USERS = Gauge("tsunagu_presence_online_users", "Users with at least one connection (cluster-wide)")
DEAD_NODES = Counter("tsunagu_presence_dead_nodes_total", "Gateway nodes this replica swept as dead")
SWEEP_SECONDS = Histogram(
    "tsunagu_presence_sweep_seconds",
    "Time to sweep one dead gateway node",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LEAVES = Counter("tsunagu_presence_leaves_published_total", "Leaves published for clients of dead nodes")
EVENTS = Counter("tsunagu_presence_events_total", "Gateway events processed", ["kind", "outcome"])

_KINDS = {
    GatewayEvent.CONNECTED: "connected",
    GatewayEvent.DISCONNECTED: "disconnected",
    GatewayEvent.SUBSCRIBED: "subscribed",
    GatewayEvent.UNSUBSCRIBED: "unsubscribed",
    GatewayEvent.NODE_HEARTBEAT: "heartbeat",
}


class PresenceTracker:
    def __init__(
        self,
        store: PresenceStore,
        broker: Broker,
        *,
        dead_after: float = 15.0,
        sweep_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.broker = broker
        self.dead_after = dead_after
        self.sweep_interval = sweep_interval
        self.clock = clock
        self.owner = uuid.uuid4().hex

    # events

    async def handle(self, message: BusMessage) -> None:
        """Bus handler for `tsunagu.gateway.events`; store errors raise so the bus retries."""
        try:
            envelope = envelope_of(message)
            if not envelope.type.startswith("gateway."):
                return
            event = payload_of(envelope, GatewayEvent)
        except EnvelopeError as exc:
            EVENTS.labels("invalid", "ignored").inc()
            log.warning("skipping %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
            return
        at_ms = envelope.time_unix_ms or int(self.clock() * 1000)
        await self.apply(event, at_ms)

    async def apply(self, event: GatewayEvent, at_ms: int) -> bool:
        """Apply one event; False when it was ignored (tombstoned client, dead node, incomplete)."""
        kind = _KINDS.get(event.kind)
        if kind is None or not event.node:
            EVENTS.labels("unknown", "ignored").inc()
            return False
        now = self.clock()
        store = self.store
        applied = True
        if event.kind == GatewayEvent.NODE_HEARTBEAT:
            applied = await store.heartbeat(event.node, at_ms, now)
        elif not event.client_id:
            applied = False
        elif event.kind == GatewayEvent.CONNECTED:
            applied = await store.connected(event.node, event.client_id, event.user_id, event.session_id, at_ms, now)
        elif event.kind == GatewayEvent.DISCONNECTED:
            await store.disconnected(event.node, event.client_id, event.user_id)
        elif not event.channel:
            applied = False
        elif event.kind == GatewayEvent.SUBSCRIBED:
            applied = await store.subscribed(event.node, event.client_id, event.user_id, event.channel, at_ms, now)
        else:
            await store.unsubscribed(event.client_id, event.channel)
        EVENTS.labels(kind, "applied" if applied else "ignored").inc()
        return applied

    # dead nodes

    async def sweep(self) -> list[str]:
        """Sweep every node silent for dead_after that no other replica is sweeping; return them."""
        now = self.clock()
        cutoff = now - self.dead_after
        swept = []
        for node in await self.store.silent_nodes(cutoff):
            if not await self.store.claim(node, self.owner, ttl=max(30.0, 4 * self.dead_after)):
                continue
            seen = await self.store.last_seen(node)
            if seen is None or seen >= cutoff:  # heard from since we looked, or swept by another replica
                await self.store.forget_node(node, self.owner, cutoff)
                continue
            started = time.perf_counter()
            leaves = await self._sweep_node(node, int(now * 1000))
            await self.store.forget_node(node, self.owner, cutoff)
            SWEEP_SECONDS.observe(time.perf_counter() - started)
            DEAD_NODES.inc()
            log.warning("gateway node %s silent since %.1fs: removed, %d leaves published", node, now - seen, leaves)
            swept.append(node)
        return swept

    async def _sweep_node(self, node: str, dead_at_ms: int) -> int:
        # Marked dead first, so its events still in flight (stamped before now) are refused from here on.
        await self.store.declare_dead(node, dead_at_ms)
        leaves = 0
        for tracked in await self.store.node_clients(node):
            for channel in tracked.channels:
                present = await self.broker.presence(channel)
                info = present.get(tracked.client)
                if info is None:  # left already, or never in presence (presence off on the channel)
                    continue
                await self.broker.remove_presence(channel, tracked.client)
                await self.broker.publish_presence(channel, False, info)
                LEAVES.inc()
                leaves += 1
            await self.store.forget_client(node, tracked.client, tracked.user)
        return leaves

    async def run_sweeper(self) -> None:
        """Sweep every sweep_interval, after a first dead_after of consuming (see the module docstring)."""
        await asyncio.sleep(self.dead_after)
        while True:
            try:
                await self.sweep()
                ONLINE_USERS.set(await self.store.online_users())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence sweep failed, retrying: %r", exc)
            await asyncio.sleep(self.sweep_interval)
