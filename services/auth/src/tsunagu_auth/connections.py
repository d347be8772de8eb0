"""Which connections each session has open, on which gateway, in which channels: learnt from the
gateways' connection events (Kafka `tsunagu.gateway.events`, the ones presence consumes too).

auth reads the topic in a consumer group of its own (`sessions_consumer_group`), so the replicas share
the work, and keeps what it learns where every replica sees it: Redis when the broker is Redis, memory
in one process (`tsunagu run`). Events may arrive out of order (the gateway sends them from concurrent
tasks): a DISCONNECTED leaves a tombstone that makes a later CONNECTED or SUBSCRIBED of that client a
no-op. A gateway is alive while its heartbeats (every 5 s) arrive; the connections of one silent for
`dead_after` are not shown (its sockets are gone with it). Connections without an auth session (`sid`)
are counted per gateway but belong to no session.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from tsunagu_core.bus import BusMessage
from tsunagu_core.dependency import NothingToConnect
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.redis_store import RedisStore
from tsunagu_core.wire.events_pb2 import GatewayEvent

TOMBSTONE_TTL = 900.0
ENTRY_TTL = 86400.0
PREFIX = "tsunagu:auth:{connections}:"


@dataclass(frozen=True, slots=True)
class LiveConnection:
    client: str
    session: str
    user: str
    node: str
    transport: str
    ip: str
    since_ms: int
    channels: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "node": self.node,
            "transport": self.transport,
            "ip": self.ip,
            "since": self.since_ms,
            "channels": sorted(self.channels),
        }


@dataclass(frozen=True, slots=True)
class NodeState:
    node: str
    last_seen_ms: int
    alive: bool
    connections: int = 0
    sessions: int = 0
    users: int = 0


class ConnectionIndex(NothingToConnect, abc.ABC):
    def __init__(self, dead_after: float) -> None:
        self.dead_after = dead_after

    async def handle(self, message: BusMessage) -> None:
        """Bus handler of `tsunagu.gateway.events`."""
        try:
            envelope = envelope_of(message)
            if not envelope.type.startswith("gateway."):
                return
            event = payload_of(envelope, GatewayEvent)
        except EnvelopeError:
            return
        if event.node:
            await self.apply(event, envelope.time_unix_ms or int(time.time() * 1000))

    @abc.abstractmethod
    async def apply(self, event: GatewayEvent, at_ms: int) -> None: ...

    @abc.abstractmethod
    async def _all(self) -> tuple[list[LiveConnection], dict[str, int]]:
        """Every recorded connection, and each node's last heartbeat (unix ms)."""

    async def snapshot(self) -> tuple[list[LiveConnection], list[NodeState]]:
        """The connections on live gateways, and every gateway heard of with its counts."""
        connections, seen = await self._all()
        cutoff = int((time.time() - self.dead_after) * 1000)
        live = [c for c in connections if seen.get(c.node, 0) >= cutoff]
        nodes = []
        for node, at in sorted(seen.items()):
            mine = [c for c in live if c.node == node]
            nodes.append(
                NodeState(
                    node,
                    at,
                    at >= cutoff,
                    len(mine),
                    len({c.session for c in mine if c.session}),
                    len({c.user for c in mine}),
                )
            )
        return live, nodes


def by_session(connections: Iterable[LiveConnection]) -> dict[str, list[LiveConnection]]:
    grouped: dict[str, list[LiveConnection]] = {}
    for connection in connections:
        if connection.session:
            grouped.setdefault(connection.session, []).append(connection)
    return grouped


@dataclass
class _Entry:
    connection: LiveConnection
    channels: set[str] = field(default_factory=set)


class MemoryConnectionIndex(ConnectionIndex):
    def __init__(self, dead_after: float) -> None:
        super().__init__(dead_after)
        self.entries: dict[str, _Entry] = {}
        self.gone: dict[str, float] = {}
        self.nodes: dict[str, int] = {}

    async def apply(self, event: GatewayEvent, at_ms: int) -> None:
        now = time.monotonic()
        self.nodes[event.node] = max(self.nodes.get(event.node, 0), at_ms)
        client = event.client_id
        if not client or event.kind == GatewayEvent.NODE_HEARTBEAT:
            return
        if event.kind == GatewayEvent.DISCONNECTED:
            self.entries.pop(client, None)
            self.gone[client] = now + TOMBSTONE_TTL
            if len(self.gone) > 100_000:
                self.gone = {c: t for c, t in self.gone.items() if t > now}
            return
        if self.gone.get(client, 0) > now:
            return
        entry = self.entries.get(client)
        if event.kind == GatewayEvent.CONNECTED:
            connection = _connection(event, at_ms)
            self.entries[client] = _Entry(connection, entry.channels if entry else set())
        elif entry is None:
            return
        elif event.kind == GatewayEvent.SUBSCRIBED and event.channel:
            entry.channels.add(event.channel)
        elif event.kind == GatewayEvent.UNSUBSCRIBED:
            entry.channels.discard(event.channel)

    async def _all(self) -> tuple[list[LiveConnection], dict[str, int]]:
        connections = [replace(e.connection, channels=tuple(e.channels)) for e in self.entries.values()]
        return connections, dict(self.nodes)


def _connection(event: GatewayEvent, at_ms: int) -> LiveConnection:
    return LiveConnection(
        client=event.client_id,
        session=event.session_id,
        user=event.user_id,
        node=event.node,
        transport=event.transport,
        ip=event.client_ip,
        since_ms=at_ms,
    )


class RedisConnectionIndex(RedisStore, ConnectionIndex):
    """Keys (one hash tag, one slot): `conns` hash client -> connection JSON, `chan:<client>` set of its
    channels, `gone:<client>` tombstones, `nodes` hash node -> last heartbeat ms."""

    def __init__(self, url: str, dead_after: float) -> None:
        RedisStore.__init__(self, url, socket_timeout=2.0, connect_timeout=2.0)
        ConnectionIndex.__init__(self, dead_after)

    async def apply(self, event: GatewayEvent, at_ms: int) -> None:
        redis, client = self.redis, event.client_id
        nodes = PREFIX + "nodes"
        if event.kind == GatewayEvent.NODE_HEARTBEAT or not client:
            await redis.hset(nodes, event.node, str(at_ms))
            return
        if event.kind == GatewayEvent.DISCONNECTED:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(PREFIX + "conns", client)
                pipe.delete(PREFIX + f"chan:{client}")
                pipe.set(PREFIX + f"gone:{client}", "1", ex=int(TOMBSTONE_TTL))
                await pipe.execute()
            return
        if await redis.exists(PREFIX + f"gone:{client}"):
            return
        if event.kind == GatewayEvent.CONNECTED:
            connection = _connection(event, at_ms)
            body = json.dumps(
                {
                    "session": connection.session,
                    "user": connection.user,
                    "node": connection.node,
                    "transport": connection.transport,
                    "ip": connection.ip,
                    "since": connection.since_ms,
                }
            )
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(PREFIX + "conns", client, body)
                pipe.hset(nodes, event.node, str(at_ms))
                await pipe.execute()
        elif event.kind in (GatewayEvent.SUBSCRIBED, GatewayEvent.UNSUBSCRIBED) and event.channel:
            key = PREFIX + f"chan:{client}"
            if event.kind == GatewayEvent.SUBSCRIBED:
                await redis.sadd(key, event.channel)
                await redis.expire(key, int(ENTRY_TTL))
            else:
                await redis.srem(key, event.channel)

    async def _all(self) -> tuple[list[LiveConnection], dict[str, int]]:
        redis = self.redis
        raw_nodes = await redis.hgetall(PREFIX + "nodes")
        nodes = {_text(k): int(v) for k, v in raw_nodes.items()}
        cutoff = int((time.time() - self.dead_after) * 1000)
        raw = await redis.hgetall(PREFIX + "conns")
        entries = []
        dead = []
        for key, value in raw.items():
            body = json.loads(value)
            client = _text(key)
            if nodes.get(body["node"], 0) < cutoff - int(ENTRY_TTL * 1000):
                dead.append(client)  # its gateway has been silent for a day: forget it
                continue
            entries.append((client, body))
        if dead:
            await redis.hdel(PREFIX + "conns", *dead)
        async with redis.pipeline(transaction=False) as pipe:
            for client, _ in entries:
                pipe.smembers(PREFIX + f"chan:{client}")
            channel_sets = await pipe.execute() if entries else []
        connections = [
            LiveConnection(
                client=client,
                session=body["session"],
                user=body["user"],
                node=body["node"],
                transport=body["transport"],
                ip=body["ip"],
                since_ms=body["since"],
                channels=tuple(_text(c) for c in channels),
            )
            for (client, body), channels in zip(entries, channel_sets, strict=True)
        ]
        return connections, nodes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def create_index(broker: str, redis_url: str, dead_after: float) -> ConnectionIndex:
    return RedisConnectionIndex(redis_url, dead_after) if broker == "redis" else MemoryConnectionIndex(dead_after)
