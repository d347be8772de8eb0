"""Where presence keeps who is online: Redis across replicas, memory for `tsunagu run`.

What is kept (every operation is idempotent, so replayed events change nothing):
- per user: its connections `{client, node, session, since}` (a hash), and the set of online users;
- per client: user, node, session, connect time and the channels it subscribed (a hash);
- per node: the clients seen on it (a set), and when an event from it was last processed (a sorted set);
- tombstones: a disconnected client (for `tombstone_ttl`), so a CONNECTED or SUBSCRIBED that comes
  late or is replayed does not bring it back;
- dead nodes: the time a node was swept (for `dead_node_ttl`); its events stamped before that are
  ignored, a later one (the node was alive after all) lifts the mark;
- claims: the replica sweeping a dead node, so two replicas never sweep the same node at once.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass

from tsunagu_core.dependency import NothingToConnect
from tsunagu_core.redis_pool import slot_tagged
from tsunagu_core.redis_store import RedisStore


class StoreError(Exception):
    """The presence store could not carry out an operation."""


@dataclass(frozen=True, slots=True)
class Connection:
    client: str
    node: str
    session: str
    since: int  # unix ms of the CONNECTED event

    def as_dict(self) -> dict[str, str | int]:
        return {"client": self.client, "node": self.node, "session": self.session, "since": self.since}


@dataclass(frozen=True, slots=True)
class TrackedClient:
    client: str
    user: str
    channels: tuple[str, ...]


class PresenceStore(NothingToConnect, abc.ABC):
    def __init__(self, tombstone_ttl: float = 900.0, dead_node_ttl: float = 86400.0) -> None:
        self.tombstone_ttl = tombstone_ttl
        self.dead_node_ttl = dead_node_ttl

    # from the gateways' events; `at_ms` is the event's time, `now` the time it is processed

    @abc.abstractmethod
    async def connected(self, node: str, client: str, user: str, session: str, at_ms: int, now: float) -> bool:
        """Record a connection; False when the client is tombstoned or the node was declared dead."""

    @abc.abstractmethod
    async def disconnected(self, node: str, client: str, user: str) -> None: ...

    @abc.abstractmethod
    async def subscribed(self, node: str, client: str, user: str, channel: str, at_ms: int, now: float) -> bool: ...

    @abc.abstractmethod
    async def unsubscribed(self, client: str, channel: str) -> None: ...

    @abc.abstractmethod
    async def heartbeat(self, node: str, at_ms: int, now: float) -> bool: ...

    # queries

    @abc.abstractmethod
    async def connections(self, user: str) -> list[Connection]: ...

    @abc.abstractmethod
    async def online_users(self) -> int: ...

    @abc.abstractmethod
    async def silent_nodes(self, before: float) -> list[str]:
        """Nodes from which nothing was processed since `before`."""

    @abc.abstractmethod
    async def last_seen(self, node: str) -> float | None: ...

    # the dead-node sweep

    @abc.abstractmethod
    async def claim(self, node: str, owner: str, ttl: float) -> bool:
        """Take the sweep of `node` for `owner` unless another owner holds it."""

    @abc.abstractmethod
    async def declare_dead(self, node: str, at_ms: int) -> None: ...

    @abc.abstractmethod
    async def node_clients(self, node: str) -> list[TrackedClient]: ...

    async def forget_client(self, node: str, client: str, user: str) -> None:
        await self.disconnected(node, client, user)

    @abc.abstractmethod
    async def forget_node(self, node: str, owner: str, seen_before: float) -> None:
        """Drop the node's liveness (unless it was seen again since `seen_before`) and release the claim."""


# --- memory -------------------------------------------------------------------------------------


@dataclass
class _Client:
    user: str = ""
    node: str = ""
    session: str = ""
    since: int = 0
    channels: set[str] | None = None


class MemoryPresenceStore(PresenceStore):
    """The same semantics in one process (for `tsunagu run` and unit tests)."""

    def __init__(self, tombstone_ttl: float = 900.0, dead_node_ttl: float = 86400.0) -> None:
        super().__init__(tombstone_ttl, dead_node_ttl)
        self._users: dict[str, dict[str, Connection]] = {}
        self._clients: dict[str, _Client] = {}
        self._nodes: dict[str, set[str]] = {}
        self._seen: dict[str, float] = {}
        self._tombs: dict[str, float] = {}
        self._dead: dict[str, tuple[int, float]] = {}
        self._claims: dict[str, tuple[str, float]] = {}

    @staticmethod
    def _clock() -> float:
        return time.monotonic()

    def _tombstoned(self, client: str) -> bool:
        expires = self._tombs.get(client)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._tombs[client]
            return False
        return True

    def _alive(self, node: str, at_ms: int) -> bool:
        mark = self._dead.get(node)
        if mark is None:
            return True
        dead_at, expires = mark
        if expires > self._clock() and at_ms <= dead_at:
            return False
        del self._dead[node]
        return True

    def _touch(self, node: str, now: float) -> None:
        self._seen[node] = max(now, self._seen.get(node, now))

    async def connected(self, node: str, client: str, user: str, session: str, at_ms: int, now: float) -> bool:
        if self._tombstoned(client) or not self._alive(node, at_ms):
            return False
        self._touch(node, now)
        record = self._clients.setdefault(client, _Client(channels=set()))
        record.user, record.node, record.session, record.since = user, node, session, at_ms
        self._nodes.setdefault(node, set()).add(client)
        if user:
            self._users.setdefault(user, {})[client] = Connection(client, node, session, at_ms)
        return True

    async def disconnected(self, node: str, client: str, user: str) -> None:
        self._tombs[client] = self._clock() + self.tombstone_ttl
        record = self._clients.pop(client, None)
        for name in {user, record.user if record else ""} - {""}:
            connections = self._users.get(name)
            if connections is not None:
                connections.pop(client, None)
                if not connections:
                    del self._users[name]
        for name in {node, record.node if record else ""} - {""}:
            clients = self._nodes.get(name)
            if clients is not None:
                clients.discard(client)

    async def subscribed(self, node: str, client: str, user: str, channel: str, at_ms: int, now: float) -> bool:
        if self._tombstoned(client) or not self._alive(node, at_ms):
            return False
        self._touch(node, now)
        record = self._clients.setdefault(client, _Client(user=user, node=node, channels=set()))
        assert record.channels is not None
        record.channels.add(channel)
        self._nodes.setdefault(record.node or node, set()).add(client)
        return True

    async def unsubscribed(self, client: str, channel: str) -> None:
        record = self._clients.get(client)
        if record is not None and record.channels is not None:
            record.channels.discard(channel)

    async def heartbeat(self, node: str, at_ms: int, now: float) -> bool:
        if not self._alive(node, at_ms):
            return False
        self._touch(node, now)
        return True

    async def connections(self, user: str) -> list[Connection]:
        return sorted(self._users.get(user, {}).values(), key=lambda c: (c.since, c.client))

    async def online_users(self) -> int:
        return len(self._users)

    async def silent_nodes(self, before: float) -> list[str]:
        return sorted(node for node, seen in self._seen.items() if seen < before)

    async def last_seen(self, node: str) -> float | None:
        return self._seen.get(node)

    async def claim(self, node: str, owner: str, ttl: float) -> bool:
        held = self._claims.get(node)
        if held is not None and held[0] != owner and held[1] > self._clock():
            return False
        self._claims[node] = (owner, self._clock() + ttl)
        return True

    async def declare_dead(self, node: str, at_ms: int) -> None:
        self._dead[node] = (at_ms, self._clock() + self.dead_node_ttl)

    async def node_clients(self, node: str) -> list[TrackedClient]:
        out = []
        for client in sorted(self._nodes.get(node, set())):
            record = self._clients.get(client) or _Client()
            out.append(TrackedClient(client, record.user, tuple(sorted(record.channels or ()))))
        return out

    async def forget_node(self, node: str, owner: str, seen_before: float) -> None:
        seen = self._seen.get(node)
        if seen is not None and seen < seen_before:
            del self._seen[node]
        if not self._nodes.get(node):
            self._nodes.pop(node, None)
        if self._claims.get(node, ("", 0.0))[0] == owner:
            del self._claims[node]


# --- Redis --------------------------------------------------------------------------------------

# A node's events stamped before it was declared dead are refused; a later one lifts the mark.
_ALIVE = """
local function alive(dead_key, at)
  local mark = redis.call('get', dead_key)
  if mark then
    if tonumber(at) <= tonumber(mark) then return false end
    redis.call('del', dead_key)
  end
  return true
end
"""

# KEYS: tomb, dead, user, online, client, node, seen
# ARGV: client, user, node, session, at_ms, now, connection json
_CONNECTED = (
    _ALIVE
    + """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
if not alive(KEYS[2], ARGV[5]) then return 0 end
redis.call('zadd', KEYS[7], 'GT', ARGV[6], ARGV[3])
redis.call('hset', KEYS[5], 'u', ARGV[2], 'n', ARGV[3], 's', ARGV[4], 't', ARGV[5])
redis.call('sadd', KEYS[6], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('hset', KEYS[3], ARGV[1], ARGV[7])
  redis.call('sadd', KEYS[4], ARGV[2])
end
return 1
"""
)

# KEYS: tomb, dead, client, node, seen; ARGV: client, user, node, channel field, at_ms, now
_SUBSCRIBED = (
    _ALIVE
    + """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
if not alive(KEYS[2], ARGV[5]) then return 0 end
redis.call('zadd', KEYS[5], 'GT', ARGV[6], ARGV[3])
redis.call('hset', KEYS[3], ARGV[4], '1')
redis.call('hsetnx', KEYS[3], 'u', ARGV[2])
redis.call('hsetnx', KEYS[3], 'n', ARGV[3])
redis.call('sadd', KEYS[4], ARGV[1])
return 1
"""
)

# KEYS: dead, seen; ARGV: node, at_ms, now
_HEARTBEAT = (
    _ALIVE
    + """
if not alive(KEYS[1], ARGV[2]) then return 0 end
redis.call('zadd', KEYS[2], 'GT', ARGV[3], ARGV[1])
return 1
"""
)

# KEYS: tomb, client, online, node; ARGV: client, user, tombstone ms, user key prefix, node key prefix
_DISCONNECTED = """
redis.call('set', KEYS[1], '1', 'PX', ARGV[3])
local record = redis.call('hmget', KEYS[2], 'u', 'n')
local users = {}
if ARGV[2] ~= '' then users[ARGV[2]] = true end
if record[1] and record[1] ~= '' then users[record[1]] = true end
for user, _ in pairs(users) do
  local key = ARGV[4] .. user
  redis.call('hdel', key, ARGV[1])
  if redis.call('hlen', key) == 0 then redis.call('srem', KEYS[3], user) end
end
redis.call('srem', KEYS[4], ARGV[1])
if record[2] and record[2] ~= '' then redis.call('srem', ARGV[5] .. record[2], ARGV[1]) end
redis.call('del', KEYS[2])
return 1
"""

# KEYS: seen, node, claim; ARGV: node, seen_before, owner
_FORGET_NODE = """
local seen = redis.call('zscore', KEYS[1], ARGV[1])
if seen and tonumber(seen) < tonumber(ARGV[2]) then redis.call('zrem', KEYS[1], ARGV[1]) end
if redis.call('scard', KEYS[2]) == 0 then redis.call('del', KEYS[2]) end
if redis.call('get', KEYS[3]) == ARGV[3] then redis.call('del', KEYS[3]) end
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisPresenceStore(RedisStore, PresenceStore):
    """State in Redis, shared by every presence replica. An operation touches keys of several users and
    nodes at once, so on Redis Cluster every key carries the prefix as its hash tag: the whole state lives
    in one slot (one shard), which presence's size affords."""

    unavailable = StoreError

    def __init__(
        self, url: str, prefix: str = "tsunagu:presence", tombstone_ttl: float = 900.0, dead_node_ttl: float = 86400.0
    ) -> None:
        PresenceStore.__init__(self, tombstone_ttl, dead_node_ttl)
        RedisStore.__init__(self, url)
        self.prefix = prefix
        self._tagged = slot_tagged(prefix, self.redis)
        self._connected = self.redis.register_script(_CONNECTED)
        self._subscribed = self.redis.register_script(_SUBSCRIBED)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._disconnected = self.redis.register_script(_DISCONNECTED)
        self._forget_node = self.redis.register_script(_FORGET_NODE)

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._tagged}:{kind}:{name}" if name else f"{self._tagged}:{kind}"

    async def connected(self, node: str, client: str, user: str, session: str, at_ms: int, now: float) -> bool:
        connection = json.dumps({"node": node, "session": session, "since": at_ms})
        keys = [
            self._key("tomb", client),
            self._key("dead", node),
            self._key("user", user),
            self._key("online"),
            self._key("client", client),
            self._key("node", node),
            self._key("seen"),
        ]
        return bool(await self._connected(keys=keys, args=[client, user, node, session, at_ms, now, connection]))

    async def disconnected(self, node: str, client: str, user: str) -> None:
        keys = [self._key("tomb", client), self._key("client", client), self._key("online"), self._key("node", node)]
        args: list[str | int] = [
            client,
            user,
            _ms(self.tombstone_ttl),
            self._key("user") + ":",
            self._key("node") + ":",
        ]
        await self._disconnected(keys=keys, args=args)

    async def subscribed(self, node: str, client: str, user: str, channel: str, at_ms: int, now: float) -> bool:
        keys = [
            self._key("tomb", client),
            self._key("dead", node),
            self._key("client", client),
            self._key("node", node),
            self._key("seen"),
        ]
        return bool(await self._subscribed(keys=keys, args=[client, user, node, "c:" + channel, at_ms, now]))

    async def unsubscribed(self, client: str, channel: str) -> None:
        await self.redis.hdel(self._key("client", client), "c:" + channel)

    async def heartbeat(self, node: str, at_ms: int, now: float) -> bool:
        keys = [self._key("dead", node), self._key("seen")]
        return bool(await self._heartbeat(keys=keys, args=[node, at_ms, now]))

    async def connections(self, user: str) -> list[Connection]:
        raw = await self.redis.hgetall(self._key("user", user))
        out = []
        for client, value in raw.items():
            data = json.loads(value)
            out.append(Connection(_text(client), str(data["node"]), str(data["session"]), int(data["since"])))
        return sorted(out, key=lambda c: (c.since, c.client))

    async def online_users(self) -> int:
        return int(await self.redis.scard(self._key("online")))

    async def silent_nodes(self, before: float) -> list[str]:
        nodes = await self.redis.zrangebyscore(self._key("seen"), "-inf", f"({before}")
        return [_text(node) for node in nodes if isinstance(node, bytes | str)]

    async def last_seen(self, node: str) -> float | None:
        score = await self.redis.zscore(self._key("seen"), node)
        return None if score is None else float(score)

    async def claim(self, node: str, owner: str, ttl: float) -> bool:
        key = self._key("claim", node)
        if await self.redis.set(key, owner, nx=True, px=_ms(ttl)):
            return True
        held = await self.redis.get(key)
        return held is not None and _text(held) == owner

    async def declare_dead(self, node: str, at_ms: int) -> None:
        await self.redis.set(self._key("dead", node), at_ms, px=_ms(self.dead_node_ttl))

    async def node_clients(self, node: str) -> list[TrackedClient]:
        clients = sorted(_text(c) for c in await self.redis.smembers(self._key("node", node)))
        if not clients:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for client in clients:
                pipe.hgetall(self._key("client", client))
            records = await pipe.execute()
        out = []
        for client, record in zip(clients, records, strict=True):
            fields = {_text(k): _text(v) for k, v in record.items()}
            channels = tuple(sorted(k[2:] for k in fields if k.startswith("c:")))
            out.append(TrackedClient(client, fields.get("u", ""), channels))
        return out

    async def forget_node(self, node: str, owner: str, seen_before: float) -> None:
        keys = [self._key("seen"), self._key("node", node), self._key("claim", node)]
        await self._forget_node(keys=keys, args=[node, seen_before, owner])
