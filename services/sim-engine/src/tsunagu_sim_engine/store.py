"""The rooms registry, room snapshots and ownership leases: Redis across replicas, memory in one process.

Ownership rule (several replicas, one Redis):
- A room's owner holds its lease `lease:<room>` (value: node name, TTL `lease_ttl`), renewed every
  `scan_interval`. Snapshots are written only while holding the lease (one atomic script).
- The replica that consumes a room's inputs (the Kafka partition of the room key is assigned to it)
  claims the lease outright and resumes from the snapshot: the partition decides in the end.
- A registered room with no live lease (just created, or its owner died) is adopted by the first
  replica whose scan finds it (SET NX), so rooms tick even before any input arrives.
- A replica whose renewal finds the lease taken, or the room deleted, stops the room at once
  without writing a snapshot.
"""

from __future__ import annotations

import abc
import json
import time
from typing import Any

from tsunagu_core.dependency import NothingToConnect
from tsunagu_core.redis_pool import slot_tagged
from tsunagu_core.redis_store import RedisStore

# Seconds a connection's bookkeeping (its bound seats, a node's clients) outlives its last update.
BOUND_TTL = 86400


class StoreError(Exception):
    """The rooms store could not carry out an operation."""


class RoomStore(NothingToConnect, abc.ABC):
    @abc.abstractmethod
    async def register(self, room: str, spec: dict[str, Any]) -> bool:
        """Add a room; False when it exists already."""

    @abc.abstractmethod
    async def spec(self, room: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def specs(self) -> dict[str, dict[str, Any]]: ...

    @abc.abstractmethod
    async def delete(self, room: str) -> bool: ...

    @abc.abstractmethod
    async def adopt(self, room: str, node: str, ttl: float) -> bool:
        """Take the lease if nobody holds it."""

    @abc.abstractmethod
    async def claim(self, room: str, node: str, ttl: float) -> None:
        """Take the lease whoever holds it."""

    @abc.abstractmethod
    async def renew(self, room: str, node: str, ttl: float) -> int:
        """1: renewed; 0: the lease is someone else's; -1: the room was deleted."""

    @abc.abstractmethod
    async def release(self, room: str, node: str) -> None: ...

    @abc.abstractmethod
    async def owner(self, room: str) -> str | None: ...

    @abc.abstractmethod
    async def save_snapshot(self, room: str, node: str, ttl: float, snapshot: dict[str, Any]) -> bool:
        """Write the snapshot and renew the lease if `node` holds it; False (nothing written) otherwise."""

    @abc.abstractmethod
    async def snapshot(self, room: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def claim_forming(self, key: str, room: str, ttl: float) -> str | None:
        """Name `room` the one being formed for the filters `key`: None when this call did, else the room
        another replica named (so racing creators agree on one room)."""

    @abc.abstractmethod
    async def clear_forming(self, key: str, room: str) -> None:
        """Forget that `room` is being formed for `key` (it is full, locked or never came), if it still is."""

    @abc.abstractmethod
    async def set_locked(self, room: str, locked: bool) -> bool:
        """Lock or unlock a matchmade room (spec() and specs() show it as `match.locked`); False: no room."""

    # Seats (matchmaking): a seat is held until its expiry; a full room refuses a new session.
    @abc.abstractmethod
    async def reserve_seat(self, room: str, session: str, ttl: float, max_clients: int) -> bool:
        """Hold (or refresh) `session`'s seat for `ttl` seconds; False when the room is full."""

    @abc.abstractmethod
    async def seats(self, room: str) -> int:
        """Seats held now (expired ones are not counted)."""

    @abc.abstractmethod
    async def has_seat(self, room: str, session: str) -> bool:
        """`session` holds a live seat in `room` (a locked room still takes its own back)."""

    # Seats tied to connections (see matchmaker.SeatWatcher): a seat taken over a gateway connection is
    # bound to that client id; the client's gateway node keeps it alive while it beats.
    @abc.abstractmethod
    async def bind_seat(self, room: str, session: str, client: str) -> None:
        """`session`'s seat in `room` is held by the connection `client` (replacing an earlier holder)."""

    @abc.abstractmethod
    async def track_client(self, node: str, client: str) -> None:
        """`client` is connected to the gateway node `node`."""

    @abc.abstractmethod
    async def untrack_client(self, node: str, client: str) -> None: ...

    @abc.abstractmethod
    async def refresh_node(self, node: str, hold: float) -> int:
        """Push the expiry of every live seat bound to a client of `node` to `hold` seconds from now."""

    @abc.abstractmethod
    async def release_client(self, client: str, room: str | None, window: float | None) -> int:
        """Unbind the seats `client` holds (in `room`, or all): freed now when `window` is None, else held
        `window` more seconds for a reconnection. A seat re-bound to another connection is left alone."""


def _with_lock(spec: dict[str, Any], locked: bool) -> dict[str, Any]:
    """The spec with its matchmaking block's `locked` as it is now (kept apart so a lock is one write)."""
    match = spec.get("match")
    if not isinstance(match, dict):
        return dict(spec)
    return {**spec, "match": {**match, "locked": locked}}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MemoryRoomStore(RoomStore):
    def __init__(self) -> None:
        self._specs: dict[str, dict[str, Any]] = {}
        self._snapshots: dict[str, str] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._seats: dict[str, dict[str, float]] = {}
        self._holders: dict[str, dict[str, str]] = {}  # room -> session -> client
        self._bound: dict[str, set[tuple[str, str]]] = {}  # client -> {(room, session)}
        self._nodes: dict[str, set[str]] = {}  # node -> clients
        self._locked: set[str] = set()
        self._forming: dict[str, tuple[str, float]] = {}

    def _holder(self, room: str) -> str | None:
        lease = self._leases.get(room)
        if lease is None or lease[1] <= time.monotonic():
            return None
        return lease[0]

    async def register(self, room: str, spec: dict[str, Any]) -> bool:
        if room in self._specs:
            return False
        self._specs[room] = dict(spec)
        return True

    async def spec(self, room: str) -> dict[str, Any] | None:
        raw = self._specs.get(room)
        return None if raw is None else _with_lock(raw, room in self._locked)

    async def claim_forming(self, key: str, room: str, ttl: float) -> str | None:
        held = self._forming.get(key)
        if held is not None and held[1] > time.monotonic():
            return held[0]
        self._forming[key] = (room, time.monotonic() + ttl)
        return None

    async def clear_forming(self, key: str, room: str) -> None:
        if self._forming.get(key, ("", 0.0))[0] == room:
            del self._forming[key]

    async def set_locked(self, room: str, locked: bool) -> bool:
        if room not in self._specs:
            return False
        (self._locked.add if locked else self._locked.discard)(room)
        return True

    def _live_seats(self, room: str) -> dict[str, float]:
        now = time.monotonic()
        held = {s: t for s, t in self._seats.get(room, {}).items() if t > now}
        self._seats[room] = held
        return held

    async def reserve_seat(self, room: str, session: str, ttl: float, max_clients: int) -> bool:
        held = self._live_seats(room)
        if session not in held and len(held) >= max_clients:
            return False
        held[session] = time.monotonic() + ttl
        return True

    async def seats(self, room: str) -> int:
        return len(self._live_seats(room))

    async def has_seat(self, room: str, session: str) -> bool:
        return session in self._live_seats(room)

    async def bind_seat(self, room: str, session: str, client: str) -> None:
        self._holders.setdefault(room, {})[session] = client
        self._bound.setdefault(client, set()).add((room, session))

    async def track_client(self, node: str, client: str) -> None:
        self._nodes.setdefault(node, set()).add(client)

    async def untrack_client(self, node: str, client: str) -> None:
        self._nodes.get(node, set()).discard(client)

    async def refresh_node(self, node: str, hold: float) -> int:
        now, refreshed = time.monotonic(), 0
        for client in self._nodes.get(node, set()):
            for room, session in self._bound.get(client, set()):
                held = self._seats.get(room, {})
                if self._holders.get(room, {}).get(session) == client and held.get(session, 0) > now:
                    held[session] = max(held[session], now + hold)
                    refreshed += 1
        return refreshed

    async def release_client(self, client: str, room: str | None, window: float | None) -> int:
        released = 0
        for seat in [s for s in self._bound.get(client, set()) if room is None or s[0] == room]:
            self._bound[client].discard(seat)
            holders = self._holders.get(seat[0], {})
            if holders.get(seat[1]) != client:
                continue
            del holders[seat[1]]
            held = self._live_seats(seat[0])
            if seat[1] in held:
                if window is None:
                    del held[seat[1]]
                else:
                    held[seat[1]] = time.monotonic() + window
                released += 1
        return released

    async def specs(self) -> dict[str, dict[str, Any]]:
        return {room: _with_lock(raw, room in self._locked) for room, raw in self._specs.items()}

    async def delete(self, room: str) -> bool:
        self._snapshots.pop(room, None)
        self._leases.pop(room, None)
        self._seats.pop(room, None)
        self._holders.pop(room, None)
        self._locked.discard(room)
        return self._specs.pop(room, None) is not None

    async def adopt(self, room: str, node: str, ttl: float) -> bool:
        if self._holder(room) is not None:
            return False
        self._leases[room] = (node, time.monotonic() + ttl)
        return True

    async def claim(self, room: str, node: str, ttl: float) -> None:
        self._leases[room] = (node, time.monotonic() + ttl)

    async def renew(self, room: str, node: str, ttl: float) -> int:
        if room not in self._specs:
            return -1
        if self._holder(room) != node:
            return 0
        self._leases[room] = (node, time.monotonic() + ttl)
        return 1

    async def release(self, room: str, node: str) -> None:
        if self._holder(room) == node:
            del self._leases[room]

    async def owner(self, room: str) -> str | None:
        return self._holder(room)

    async def save_snapshot(self, room: str, node: str, ttl: float, snapshot: dict[str, Any]) -> bool:
        if await self.renew(room, node, ttl) != 1:
            return False
        self._snapshots[room] = json.dumps(snapshot)
        return True

    async def snapshot(self, room: str) -> dict[str, Any] | None:
        raw = self._snapshots.get(room)
        return None if raw is None else json.loads(raw)


_RENEW = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

_SAVE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
return 1
"""

# KEYS[1] the room's seat zset (member session, score expiry in ms of server time); ARGV session, ttl ms, max.
# One script so two replicas filling the last seat at once cannot both win it.
_SEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
-- never shorten the key's life: a seat held by a connection may outlive this one
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS seats zset, holders hash (session -> client); ARGV session, client, hold ms. A live seat still held by
# `client` lives `hold` more; an expired one is not brought back.
_SEAT_REFRESH = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score == false or tonumber(score) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', 'GT', now + tonumber(ARGV[3]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS seats zset, holders hash; ARGV session, client, window ms (-1: free the seat now). Only while `client`
# still holds it: the user may have taken it back from another connection meanwhile.
_SEAT_UNBIND = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score == false or tonumber(score) <= now then return 0 end
if tonumber(ARGV[3]) < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
end
return 1
"""

_FORMING = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisRoomStore(RedisStore, RoomStore):
    """Keys: `<prefix>:rooms` (hash room → spec), `<prefix>:snap:<room>`, `<prefix>:lease:<room>`;
    seats: `<prefix>:seats:<room>` (zset session → expiry ms), `<prefix>:holders:<room>` (hash session →
    client id), `<prefix>:bound:<client>` (set of `<room> <session>`), `<prefix>:node:<node>` (set of
    client ids), `<prefix>:locked` (set of locked rooms), `<prefix>:forming:<filters>` (the room being
    formed for those filters)."""

    unavailable = StoreError

    def __init__(self, url: str, prefix: str = "tsunagu:sim") -> None:
        RedisStore.__init__(self, url)
        self.prefix = prefix
        # (on Redis Cluster the prefix is a hash tag: a lease, its snapshot and the registry share a slot)
        self._tagged = slot_tagged(prefix, self.redis)
        self._renew = self.redis.register_script(_RENEW)
        self._save = self.redis.register_script(_SAVE)
        self._release = self.redis.register_script(_RELEASE)
        self._seat = self.redis.register_script(_SEAT)
        self._seat_refresh = self.redis.register_script(_SEAT_REFRESH)
        self._forming = self.redis.register_script(_FORMING)
        self._seat_unbind = self.redis.register_script(_SEAT_UNBIND)

    def _rooms(self) -> str:
        return f"{self._tagged}:rooms"

    def _lease(self, room: str) -> str:
        return f"{self._tagged}:lease:{room}"

    def _snap(self, room: str) -> str:
        return f"{self._tagged}:snap:{room}"

    async def register(self, room: str, spec: dict[str, Any]) -> bool:
        return bool(await self.redis.hsetnx(self._rooms(), room, json.dumps(spec)))

    def _locked_key(self) -> str:
        return f"{self._tagged}:locked"

    async def spec(self, room: str) -> dict[str, Any] | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._rooms(), room)
            pipe.sismember(self._locked_key(), room)
            raw, locked = await pipe.execute()
        return None if raw is None else _with_lock(json.loads(raw), bool(locked))

    async def specs(self) -> dict[str, dict[str, Any]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._rooms())
            pipe.smembers(self._locked_key())
            raw, locked = await pipe.execute()
        held = {_text(name) for name in locked}
        return {_text(key): _with_lock(json.loads(value), _text(key) in held) for key, value in raw.items()}

    def _forming_key(self, key: str) -> str:
        return f"{self._tagged}:forming:{key}"

    async def claim_forming(self, key: str, room: str, ttl: float) -> str | None:
        held = await self._forming(keys=[self._forming_key(key)], args=[room, max(1, int(ttl * 1000))])
        return None if held is None else _text(held)

    async def clear_forming(self, key: str, room: str) -> None:
        await self._release(keys=[self._forming_key(key)], args=[room])  # compare and delete, as a lease

    async def set_locked(self, room: str, locked: bool) -> bool:
        if not await self.redis.hexists(self._rooms(), room):
            return False
        if locked:
            await self.redis.sadd(self._locked_key(), room)
        else:
            await self.redis.srem(self._locked_key(), room)
        return True

    async def delete(self, room: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._rooms(), room)
            pipe.delete(self._snap(room), self._lease(room), self._seats_key(room), self._holders_key(room))
            pipe.srem(self._locked_key(), room)
            removed, _, _ = await pipe.execute()
        return bool(removed)

    async def adopt(self, room: str, node: str, ttl: float) -> bool:
        return bool(await self.redis.set(self._lease(room), node, nx=True, px=int(ttl * 1000)))

    async def claim(self, room: str, node: str, ttl: float) -> None:
        await self.redis.set(self._lease(room), node, px=int(ttl * 1000))

    async def renew(self, room: str, node: str, ttl: float) -> int:
        keys = [self._rooms(), self._lease(room)]
        return int(await self._renew(keys=keys, args=[room, node, int(ttl * 1000)]))

    async def release(self, room: str, node: str) -> None:
        await self._release(keys=[self._lease(room)], args=[node])

    async def owner(self, room: str) -> str | None:
        raw = await self.redis.get(self._lease(room))
        return None if raw is None else _text(raw)

    async def save_snapshot(self, room: str, node: str, ttl: float, snapshot: dict[str, Any]) -> bool:
        keys = [self._rooms(), self._lease(room), self._snap(room)]
        args: list[str | int] = [room, node, int(ttl * 1000), json.dumps(snapshot)]
        return int(await self._save(keys=keys, args=args)) == 1

    async def snapshot(self, room: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self._snap(room))
        return None if raw is None else json.loads(raw)

    def _seats_key(self, room: str) -> str:
        return f"{self._tagged}:seats:{room}"

    async def reserve_seat(self, room: str, session: str, ttl: float, max_clients: int) -> bool:
        args: list[str | int] = [session, max(1, int(ttl * 1000)), max_clients]
        return int(await self._seat(keys=[self._seats_key(room)], args=args)) == 1

    async def seats(self, room: str) -> int:
        key = self._seats_key(room)
        t = await self.redis.time()
        now = int(t[0]) * 1000 + int(t[1]) // 1000
        return int(await self.redis.zcount(key, now + 1, "+inf"))

    async def has_seat(self, room: str, session: str) -> bool:
        score = await self.redis.zscore(self._seats_key(room), session)
        if score is None:
            return False
        t = await self.redis.time()
        return float(score) > int(t[0]) * 1000 + int(t[1]) // 1000

    def _holders_key(self, room: str) -> str:
        return f"{self._tagged}:holders:{room}"

    def _bound_key(self, client: str) -> str:
        return f"{self._tagged}:bound:{client}"

    def _node_key(self, node: str) -> str:
        return f"{self._tagged}:node:{node}"

    async def bind_seat(self, room: str, session: str, client: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._holders_key(room), session, client)
            pipe.sadd(self._bound_key(client), f"{room} {session}")
            pipe.expire(self._bound_key(client), BOUND_TTL)
            await pipe.execute()

    async def track_client(self, node: str, client: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(self._node_key(node), client)
            pipe.expire(self._node_key(node), BOUND_TTL)
            await pipe.execute()

    async def untrack_client(self, node: str, client: str) -> None:
        await self.redis.srem(self._node_key(node), client)

    async def _bound(self, client: str) -> list[tuple[str, str]]:
        out = []
        for member in await self.redis.smembers(self._bound_key(client)):
            room, _, session = _text(member).partition(" ")
            out.append((room, session))
        return out

    async def refresh_node(self, node: str, hold: float) -> int:
        # (a dead node's set outlives it by BOUND_TTL at most: nothing refreshes it once its beats stop)
        await self.redis.expire(self._node_key(node), BOUND_TTL)
        refreshed = 0
        for raw in await self.redis.smembers(self._node_key(node)):
            client = _text(raw)
            for room, session in await self._bound(client):
                keys = [self._seats_key(room), self._holders_key(room)]
                refreshed += int(await self._seat_refresh(keys=keys, args=[session, client, int(hold * 1000)]))
        return refreshed

    async def release_client(self, client: str, room: str | None, window: float | None) -> int:
        released = 0
        ms = -1 if window is None else max(1, int(window * 1000))
        for seat_room, session in await self._bound(client):
            if room is not None and seat_room != room:
                continue
            keys = [self._seats_key(seat_room), self._holders_key(seat_room)]
            released += int(await self._seat_unbind(keys=keys, args=[session, client, ms]))
            await self.redis.srem(self._bound_key(client), f"{seat_room} {session}")
        return released
