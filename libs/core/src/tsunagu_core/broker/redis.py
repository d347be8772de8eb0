"""Redis engine: pub/sub for fan-out, a list per channel for history, hashes for presence.

A publish is one Lua script, so the idempotency check, the offset increment, the history append
and the fan-out happen atomically: every node sees one order per channel and no offset is ever
published twice or skipped. One script call carries many publications (`publish_many`, and the
publishes that concurrent callers issue while one call is in flight). A channel's history is a
list holding the publications with offsets `top - len + 1 .. top` (appended at the right, trimmed
at the left, dropped whole when it expires), so "publications after offset N" is one LRANGE by
index; a list append costs Redis a third of a stream append. Presence expiry uses the Redis
server's clock, so replicas with skewed clocks agree on who is still there.

The same engine runs on one Redis, on a Sentinel-watched primary (`redis-sentinel://`) and on Redis
Cluster (`redis-cluster://`). Every key of a channel carries the hash tag `{channel}`, so one channel
lives in one slot; on a cluster a batch is split by slot, each part one script call on the slot's
primary (the parts pipelined, one connection per primary), and fan-out is sharded pub/sub (SPUBLISH
inside the script, SSUBSCRIBE on one connection per shard: `broker/redis_shards.py`), so a publication
travels inside its shard only.

Failover fence (Sentinel and Cluster only): a channel's stream position records the replication id
of the primary that wrote it. A replica promoted after a failover, a restarted primary or a slot
moved to another primary has another id: the first publish or history read there starts a new epoch, because
the writes the old primary acknowledged but had not yet replicated may be gone and their offsets
would otherwise be handed out again. Subscribers holding the old epoch are told their position is
lost (`recovered: false`, or error 112 when they asked for it) instead of silently skipping those
publications. A single server (`redis://`) has no fence: restarted from its append-only file it keeps
its positions (its replication id changes at every start), and what it loses is its durability
setting's choice, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.client import PubSub
from redis.exceptions import NoScriptError, RedisError, ResponseError

from tsunagu_core.broker.base import (
    Broker,
    BrokerError,
    ClientInfo,
    HistoryResult,
    PublishOptions,
    PublishRequest,
    PublishResult,
    StreamPosition,
)
from tsunagu_core.broker.codec import (
    decode_client_info,
    decode_presence_event,
    decode_publication_body,
    encode_body,
    encode_client_info,
    encode_presence_event,
)
from tsunagu_core.broker.redis_shards import ShardedFanout
from tsunagu_core.redis_pool import AnyRedis, connect_redis, redis_mode
from tsunagu_core.telemetry import BROKER_OP_SECONDS, BROKER_PUBLISHED, BROKER_RESUBSCRIBES

log = logging.getLogger("tsunagu.broker.redis")

# Publications in one call, applied in order. ARGV[1] is the key prefix, ARGV[2] the epoch a new
# stream starts with, ARGV[3] the publications packed by `_pack_publication` (a few arguments for
# hundreds of publications: redis-py's per-argument encoding was most of the client's cost), ARGV[4]
# '1' for sharded fan-out (Redis Cluster: SPUBLISH on the channel's hash-tagged name), ARGV[5] '1' for
# the failover fence (Sentinel and Cluster; see the module's docstring). The keys are built
# here from the prefix; on a cluster they are also declared (KEYS) so that the call is routed to the
# slot's primary, and redirected or retried as a whole while the slot migrates. Returns offset, epoch
# and duplicate flag of each publication, flat.
_FENCE = """
-- The replication id of this primary: a stream written under another one may have lost writes.
local replid
local function current_replid()
  if not replid then
    replid = string.match(redis.call('info', 'replication'), 'master_replid:(%w+)') or '-'
  end
  return replid
end
-- The stream's epoch, started anew when it has none or (fenced) another primary wrote it.
local function stream_epoch(history, meta, new_epoch, fenced)
  if not fenced then
    local epoch = redis.call('hget', meta, 'e')
    if epoch then return epoch end
    redis.call('hset', meta, 'e', new_epoch)
    redis.call('del', history)
    return new_epoch
  end
  local stored = redis.call('hmget', meta, 'e', 'r')
  local epoch, writer = stored[1], stored[2]
  if epoch and writer == current_replid() then return epoch end
  if epoch and not writer then
    -- written before the fence was on (the same data moved from one Redis to replicated ones): adopt it
    redis.call('hset', meta, 'r', current_replid())
    return epoch
  end
  redis.call('hset', meta, 'e', new_epoch, 'r', current_replid(), 's', 0)
  redis.call('del', history)
  return new_epoch
end
"""

_PUBLISH = (
    _FENCE
    + """
local prefix, new_epoch, packed, sharded, fenced = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5] == '1'
local results, epochs, ttls = {}, {}, {}
local pos, n = 1, 0
while pos <= #packed do
  local channel, idem, body, size, history_ttl, meta_ttl, idem_ttl
  channel, idem, body, size, history_ttl, meta_ttl, idem_ttl, pos = struct.unpack('>I2c0I2c0I4c0I4I4I4I4', packed, pos)
  local tag = '{' .. channel .. '}'
  local seen = false
  local idem_key
  if idem ~= '' then
    idem_key = prefix .. ':i:' .. tag .. ':' .. idem
    seen = redis.call('get', idem_key)
  end
  if seen then
    local sep = string.find(seen, ':', 1, true)
    results[n + 1] = tonumber(string.sub(seen, 1, sep - 1))
    results[n + 2] = string.sub(seen, sep + 1)
    results[n + 3] = 1
  else
    local offset, epoch = 0, ''
    if size > 0 then
      local history, meta = prefix .. ':hl:' .. tag, prefix .. ':ml:' .. tag
      epoch = epochs[channel]
      if not epoch then
        epoch = stream_epoch(history, meta, new_epoch, fenced)
        epochs[channel] = epoch
      end
      offset = redis.call('hincrby', meta, 's', 1)
      redis.call('rpush', history, body)
      redis.call('ltrim', history, -size, -1)
      -- expiries once per channel and call, with the last publication's TTLs
      ttls[channel] = {history, meta, history_ttl, meta_ttl}
    end
    local message = 'p' .. offset .. ':' .. epoch .. ':' .. body
    if sharded then
      redis.call('spublish', prefix .. '.ch.' .. tag, message)
    else
      redis.call('publish', prefix .. '.ch.' .. channel, message)
    end
    if idem_key then redis.call('set', idem_key, offset .. ':' .. epoch, 'PX', idem_ttl) end
    results[n + 1] = offset
    results[n + 2] = epoch
    results[n + 3] = 0
  end
  n = n + 3
end
for _, t in pairs(ttls) do
  if t[3] > 0 then redis.call('pexpire', t[1], t[3]) end
  if t[4] > 0 then redis.call('pexpire', t[2], t[4]) end
end
return results
"""
)

# Redis Cluster: the same publications for every slot one primary serves, in one call. Every channel's
# meta key is read first, so that a slot this primary no longer serves (moved, failed over) is refused
# before anything is written: the caller then sends those publications slot by slot.
_PUBLISH_ON_NODE = (
    "#!lua flags=allow-cross-slot-keys\n"
    + """
local prefix, packed = ARGV[1], ARGV[3]
local at = 1
while at <= #packed do
  local channel, _i, _b, _s, _t1, _t2, _t3
  channel, _i, _b, _s, _t1, _t2, _t3, at = struct.unpack('>I2c0I2c0I4c0I4I4I4I4', packed, at)
  redis.call('exists', prefix .. ':ml:{' .. channel .. '}')
end
"""
    + _PUBLISH
)

# Returns the top offset, the epoch, the publications asked for (oldest first) and the offset of the
# first of them.
_HISTORY = (
    _FENCE
    + """
local epoch = stream_epoch(KEYS[1], KEYS[2], ARGV[1], ARGV[7] == '1')
if tonumber(ARGV[2]) > 0 then redis.call('pexpire', KEYS[2], ARGV[2]) end
local top = tonumber(redis.call('hget', KEYS[2], 's') or '0')
local limit = tonumber(ARGV[5])
if limit == 0 then return {top, epoch, {}, 0} end
local first = top - redis.call('llen', KEYS[1]) + 1
local since = tonumber(ARGV[3])
local use_since = since >= 0 and ARGV[4] == epoch
local lo, hi = first, top
if ARGV[6] == '1' then
  if use_since then hi = math.min(top, since - 1) end
  if limit > 0 then lo = math.max(first, hi - limit + 1) end
else
  if use_since then lo = math.max(first, since + 1) end
  if limit > 0 then hi = math.min(top, lo + limit - 1) end
end
if hi < lo then return {top, epoch, {}, 0} end
return {top, epoch, redis.call('lrange', KEYS[1], lo - first, hi - first), lo}
"""
)

_PRESENCE_ADD = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[1])
-- The keys live as long as their longest-lived member; a short TTL must not expire the others.
for _, key in ipairs(KEYS) do
  if redis.call('pttl', key) < tonumber(ARGV[3]) then redis.call('pexpire', key, ARGV[3]) end
end
return 1
"""

_PRESENCE_GET = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expired = redis.call('zrangebyscore', KEYS[2], '0', now_ms)
for _, client in ipairs(expired) do redis.call('hdel', KEYS[1], client) end
if #expired > 0 then redis.call('zremrangebyscore', KEYS[2], '0', now_ms) end
return redis.call('hgetall', KEYS[1])
"""

_PRESENCE_REMOVE = """
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('zrem', KEYS[2], ARGV[1])
return 1
"""


POOL_WAIT_SECONDS = 10.0
# Publications per script call: bounds how long one call holds Redis (a few ms).
PUBLISH_CHUNK = 512
# Auto-batching calls in flight at once (see RedisBroker.__init__).
SENDERS = 2
_HEADER = struct.Struct(">IIII")


def _pack_publication(channel: str, body: bytes, options: PublishOptions) -> bytes:
    """One publication for the _PUBLISH script: channel, idempotency key and body, each length-prefixed,
    then history size and the three TTLs in milliseconds."""
    name = channel.encode()
    key = (options.idempotency_key or "").encode()
    return b"".join(
        (
            len(name).to_bytes(2, "big"),
            name,
            len(key).to_bytes(2, "big"),
            key,
            len(body).to_bytes(4, "big"),
            body,
            _HEADER.pack(
                max(0, options.history_size),
                _ms(options.history_ttl),
                _ms(options.meta_ttl),
                _ms(options.idempotency_ttl),
            ),
        )
    )


def _results(flat: Sequence[Any]) -> list[PublishResult]:
    """The script's flat reply (offset, epoch, duplicate flag per publication)."""
    return [PublishResult(int(flat[i]), _text(flat[i + 1]), duplicate=flat[i + 2] == 1) for i in range(0, len(flat), 3)]


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


@dataclass(frozen=True, slots=True)
class _Packed:
    """A publication ready for the script, with what a cluster routes it by."""

    channel: str
    idempotency_key: str
    data: bytes


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBroker(Broker):
    def __init__(
        self, url: str, *, prefix: str = "tsunagu", retry_max: float = 15.0, max_connections: int = 128
    ) -> None:
        self.url = url
        self.max_connections = max_connections
        self.prefix = prefix
        self.retry_max = retry_max
        mode = redis_mode(url)
        self.cluster = mode == "cluster"
        # Script flags: SPUBLISH fan-out (cluster); the failover fence (replicated setups, where a
        # promoted replica may lack acknowledged writes). One server keeps its positions across a
        # restart from its append-only file, as before.
        self._sharded = "1" if self.cluster else "0"
        self._fenced = "0" if mode == "single" else "1"
        self._redis: AnyRedis | None = None
        self._channels: set[str] = set()
        self._pubsub: PubSub | None = None
        self._shards: ShardedFanout | None = None
        self._connected = asyncio.Event()
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        # Auto-batching: publishes issued while a call is in flight go out together in the next script
        # call, so N concurrent publishers cost ~1 round trip instead of N. Two senders let the client
        # prepare one batch while Redis runs the other (one caller's publishes are never in two
        # batches at once: it awaits each, so its order holds).
        self._queued: list[tuple[_Packed, asyncio.Future[PublishResult]]] = []
        self._senders = 0
        self._sender_tasks: set[asyncio.Task[None]] = set()
        self._direct = False

    # keys: the channel sits in a hash tag so one channel's keys share a Redis Cluster slot

    def _key(self, kind: str, channel: str) -> str:
        return f"{self.prefix}:{kind}:{{{channel}}}"

    def _fanout_name(self, channel: str) -> bytes:
        # On a cluster the name carries the channel's hash tag: SPUBLISH from the script stays in its slot.
        if self.cluster:
            return f"{self.prefix}.ch.{{{channel}}}".encode()
        return f"{self.prefix}.ch.{channel}".encode()

    def _channel_of(self, name: bytes) -> str:
        text = name.decode()[len(self.prefix) + 4 :]
        return text[1:-1] if self.cluster else text

    def _check_channel(self, channel: str) -> None:
        if self.cluster and channel.startswith("}"):
            # `{}...` is no hash tag: the channel's keys would fall into different slots
            raise BrokerError(f"channel {channel!r}: a name starting with '}}' cannot be used on Redis Cluster")

    @property
    def redis(self) -> AnyRedis:
        if self._redis is None:
            raise BrokerError("the Redis broker is not started")
        return self._redis

    @property
    def fanout_connections(self) -> int:
        """Subscriber connections this node holds: one, or on a cluster one per shard in use."""
        if self._shards is not None:
            return self._shards.connections
        return 1 if self._pubsub is not None and self._pubsub.connection is not None else 0

    async def start(self) -> None:
        if self._redis is not None:
            return
        try:
            client = await connect_redis(self.url, max_connections=self.max_connections, wait=POOL_WAIT_SECONDS)
        except (RedisError, OSError) as exc:
            raise BrokerError(f"Redis at {self.url} does not answer: {exc}") from None
        self._redis = client
        self._publish_script = client.register_script(_PUBLISH)
        self._publish_on_node = client.register_script(_PUBLISH_ON_NODE)
        self._history_script = client.register_script(_HISTORY)
        self._presence_add = client.register_script(_PRESENCE_ADD)
        self._presence_get = client.register_script(_PRESENCE_GET)
        self._presence_remove = client.register_script(_PRESENCE_REMOVE)
        self._closing = False
        if isinstance(client, RedisCluster):
            self._shards = ShardedFanout(client, self._dispatch, self._resubscribed, self.retry_max)
            self._connected.set()
        else:
            self._listener = asyncio.create_task(self._listen(), name="redis-broker-fanout")

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._shards is not None:
            await self._shards.close()
            self._shards = None
        if self._redis is not None:
            await self._redis.aclose()
        self._redis = None
        self._connected.clear()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerError(f"Redis at {self.url} does not answer: {exc}") from None

    # fan-out

    async def _resubscribed(self) -> None:
        if self.handler is not None:
            await self.handler.on_resubscribed()

    async def _listen(self) -> None:
        """One Redis (or Sentinel's primary): one subscriber connection, re-established when lost."""
        backoff = 0.1
        lost = False
        while not self._closing:
            assert not isinstance(self.redis, RedisCluster)
            pubsub = self.redis.pubsub()
            try:
                names = [self._fanout_name(c) for c in self._channels]
                if names:
                    await pubsub.subscribe(*names)
                self._pubsub = pubsub
                self._connected.set()
                if lost:
                    BROKER_RESUBSCRIBES.inc()
                    log.info("fan-out connection restored, %d channels resubscribed", len(names))
                    await self._resubscribed()
                backoff = 0.1
                while True:
                    if pubsub.connection is None:
                        # Nothing subscribed yet: redis-py opens the connection on the first subscribe.
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._dispatch(message)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:
                self._connected.clear()
                self._pubsub = None
                lost = True
                log.warning("fan-out connection to Redis lost (%s); retrying in %.1fs", exc, backoff)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        name: bytes = message["channel"]
        if kind == "subscribe":
            for waiter in self._confirmations.pop(name, []):
                if not waiter.done():
                    waiter.set_result(None)
            return
        if kind not in ("message", "smessage") or self.handler is None:
            return
        channel = self._channel_of(name)
        data: bytes = message["data"]
        try:
            if data[:1] == b"p":
                offset, epoch, body = data[1:].split(b":", 2)
                publication = decode_publication_body(body, int(offset), epoch.decode())
                await self.handler.on_publication(channel, publication)
            elif data[:1] == b"j":
                join, info = decode_presence_event(data[1:])
                await self.handler.on_presence(channel, join, info)
        except Exception as exc:  # one bad message must not stop the fan-out of every other one
            log.error("dropping undecodable fan-out message on %s: %r", channel, exc)

    async def subscribe(self, channel: str) -> None:
        self._check_channel(channel)
        if self._shards is not None:
            try:
                await self._shards.subscribe(self._fanout_name(channel))
            except (RedisError, OSError, TimeoutError) as exc:
                raise BrokerError(f"cannot subscribe to {channel}: {exc!r}") from None
            self._channels.add(channel)
            return
        self._channels.add(channel)
        await asyncio.wait_for(self._connected.wait(), timeout=self.retry_max + 5)
        pubsub = self._pubsub
        if pubsub is None:
            raise BrokerError("Redis fan-out connection is down")
        name = self._fanout_name(channel)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(name, []).append(waiter)
        try:
            await pubsub.subscribe(name)
            self._wake.set()
            await asyncio.wait_for(waiter, timeout=5)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerError(f"cannot subscribe to {channel}: {exc!r}") from None

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._shards is not None:
            await self._shards.unsubscribe(self._fanout_name(channel))
            return
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe(self._fanout_name(channel))

    def _pack(self, channel: str, data: bytes, options: PublishOptions, time_ms: int) -> _Packed:
        self._check_channel(channel)
        body = encode_body(data, options.info, options.tags, time_ms)
        return _Packed(channel, options.idempotency_key or "", _pack_publication(channel, body, options))

    async def publish(self, channel: str, data: bytes, options: PublishOptions = PublishOptions()) -> PublishResult:
        packed = self._pack(channel, data, options, int(time.time() * 1000))
        with BROKER_OP_SECONDS.labels("publish").time():
            try:
                if not self._senders and not self._direct:
                    # Nothing in flight: go straight out, no hop through the sender task.
                    self._direct = True
                    try:
                        result = (await self._run_publish([packed]))[0]
                    finally:
                        self._direct = False
                else:
                    result = await self._queue_publish(packed)
            except (RedisError, OSError) as exc:
                raise BrokerError(f"publish to {channel} failed: {exc}") from None
        if not result.duplicate:
            BROKER_PUBLISHED.inc()
        return result

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        """One script call per `PUBLISH_CHUNK` publications (per slot on a cluster), the calls pipelined."""
        if not requests:
            return []
        now_ms = int(time.time() * 1000)
        packed = [self._pack(r.channel, r.data, r.options, now_ms) for r in requests]
        with BROKER_OP_SECONDS.labels("publish_many").time():
            try:
                results = await self._run_publish(packed)
            except (RedisError, OSError) as exc:
                raise BrokerError(f"publishing {len(requests)} publications failed: {exc}") from None
        BROKER_PUBLISHED.inc(sum(1 for r in results if not r.duplicate))
        return results

    async def _run_publish(self, packed: Sequence[_Packed]) -> list[PublishResult]:
        epoch = uuid.uuid4().hex[:8]
        if self.cluster:
            return await self._run_publish_sharded(packed, epoch)
        chunks = [b"".join(p.data for p in packed[i : i + PUBLISH_CHUNK]) for i in range(0, len(packed), PUBLISH_CHUNK)]
        if len(chunks) == 1:
            replies = [await self._publish_script(args=[self.prefix, epoch, chunks[0], "0", self._fenced])]
        else:
            # One connection keeps the chunks in order. EVALSHA directly: a pipeline of registered
            # scripts asks SCRIPT EXISTS first, a round trip more per call.
            calls: list[tuple[list[str], bytes]] = [([], chunk) for chunk in chunks]
            replies = await self._pipeline_publish(calls, epoch)
        return [result for flat in replies for result in _results(flat)]

    async def _run_publish_sharded(self, packed: Sequence[_Packed], epoch: str) -> list[PublishResult]:
        """Redis Cluster: the publications grouped by the primary of their channel's slot (one channel's
        stay in order in one group), each group one script call (per `PUBLISH_CHUNK`) on its primary, the
        primaries called at once. A group its primary refuses (the slot moved) goes slot by slot."""
        assert isinstance(self.redis, RedisCluster)
        cluster = self.redis
        groups: dict[str, tuple[Any, list[int]]] = {}
        for index, item in enumerate(packed):
            node = cluster.get_node_from_key(self._key("ml", item.channel))
            if node is None:
                return await self._run_publish_by_slot(packed, epoch)  # no slot map yet: let redis-py route
            groups.setdefault(node.name, (node, []))[1].append(index)
        parts = [
            (node, indexes[start : start + PUBLISH_CHUNK])
            for node, indexes in groups.values()
            for start in range(0, len(indexes), PUBLISH_CHUNK)
        ]
        results: list[PublishResult | None] = [None] * len(packed)

        async def on_node(node: Any, part: list[int]) -> None:
            chunk = b"".join(packed[i].data for i in part)
            args: list[str | bytes | int] = [0, self.prefix, epoch, chunk, self._sharded, self._fenced]
            try:
                try:
                    flat = await cluster.execute_command("EVALSHA", self._publish_on_node.sha, *args, target_nodes=node)
                except NoScriptError:
                    await cluster.script_load(_PUBLISH_ON_NODE)
                    flat = await cluster.execute_command("EVALSHA", self._publish_on_node.sha, *args, target_nodes=node)
                replies = _results(flat)
            except ResponseError as exc:
                if "non local key" not in str(exc) and "hash to the same slot" not in str(exc):
                    raise
                # Refused before any write (the pre-check): the slot map changed; redis-py routes these.
                log.info(
                    "primary %s refused %d publications (slot moved); sending them slot by slot", node.name, len(part)
                )
                await cluster.nodes_manager.initialize()
                replies = await self._run_publish_by_slot([packed[i] for i in part], epoch)
            for i, result in zip(part, replies, strict=True):
                results[i] = result

        await asyncio.gather(*(on_node(node, part) for node, part in parts))
        return [r for r in results if r is not None]

    async def _run_publish_by_slot(self, packed: Sequence[_Packed], epoch: str) -> list[PublishResult]:
        """Redis Cluster, slot by slot: each call declares its keys, so redis-py routes it and follows
        MOVED/ASK (the path while slots move or a failover is under way)."""
        assert isinstance(self.redis, RedisCluster)
        keyslot = self.redis.keyslot
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(packed):
            groups.setdefault(keyslot(self._key("ml", item.channel)), []).append(index)
        calls: list[tuple[list[str], bytes]] = []
        positions: list[list[int]] = []
        for indexes in groups.values():
            for start in range(0, len(indexes), PUBLISH_CHUNK):
                part = indexes[start : start + PUBLISH_CHUNK]
                keys: dict[str, None] = {}
                for i in part:
                    item = packed[i]
                    keys[self._key("hl", item.channel)] = None
                    keys[self._key("ml", item.channel)] = None
                    if item.idempotency_key:
                        keys[f"{self.prefix}:i:{{{item.channel}}}:{item.idempotency_key}"] = None
                calls.append((list(keys), b"".join(packed[i].data for i in part)))
                positions.append(part)
        if len(calls) == 1:
            # one slot (a lone publish, a batch of one channel): a plain call, no cluster pipeline
            declared, chunk = calls[0]
            replies = [
                await self._publish_script(keys=declared, args=[self.prefix, epoch, chunk, self._sharded, self._fenced])
            ]
        else:
            replies = await self._pipeline_publish(calls, epoch)
        results: list[PublishResult | None] = [None] * len(packed)
        for part, flat in zip(positions, replies, strict=True):
            for i, result in zip(part, _results(flat), strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    async def _pipeline_publish(self, calls: list[tuple[list[str], bytes]], epoch: str) -> list[Any]:

        async def run(indexes: list[int]) -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for i in indexes:
                keys, chunk = calls[i]
                # (the cluster pipeline has no evalsha() of its own: the command routes by its keys)
                pipe.execute_command(
                    "EVALSHA",
                    self._publish_script.sha,
                    len(keys),
                    *keys,
                    self.prefix,
                    epoch,
                    chunk,
                    self._sharded,
                    self._fenced,
                )
            return list(await pipe.execute(raise_on_error=False))

        replies = await run(list(range(len(calls))))
        # A node without the script (a fresh server, a promoted replica) applied nothing of those calls:
        # only they are sent again, the others were applied.
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.redis.script_load(_PUBLISH)
            for i, reply in zip(missing, await run(missing), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _queue_publish(self, packed: _Packed) -> asyncio.Future[PublishResult]:
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        self._queued.append((packed, future))
        if self._senders < SENDERS:
            self._senders += 1
            task = asyncio.create_task(self._send_queued(), name="redis-broker-publish")
            self._sender_tasks.add(task)
            task.add_done_callback(self._sender_tasks.discard)
        return future

    async def _send_queued(self) -> None:
        """Auto-batching: publishes issued while one is in flight go out together in one script call."""
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    results: Sequence[PublishResult | BaseException] = await self._run_publish([p for p, _ in batch])
                except (RedisError, OSError, BrokerError) as exc:
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue  # the publisher gave up waiting (cancelled)
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._senders -= 1
            if not self._senders:
                for _, future in self._queued:
                    if not future.done():
                        future.set_exception(BrokerError("publish not sent: the broker is closing"))
                self._queued = []

    async def publish_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        message = b"j" + encode_presence_event(join, info)
        try:
            if self.cluster:
                await self.redis.spublish(self._fanout_name(channel), message)
            else:
                await self.redis.publish(self._fanout_name(channel), message)
        except (RedisError, OSError) as exc:
            raise BrokerError(f"presence event on {channel} failed: {exc}") from None

    # history

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = -1,
        reverse: bool = False,
        meta_ttl: float = 86400.0,
    ) -> HistoryResult:
        args: list[bytes | str | int] = [
            uuid.uuid4().hex[:8],
            _ms(meta_ttl),
            since.offset if since is not None else -1,
            since.epoch if since is not None else "",
            limit,
            "1" if reverse else "0",
            self._fenced,
        ]
        with BROKER_OP_SECONDS.labels("history").time():
            try:
                top, epoch, bodies, first = await self._history_script(
                    keys=[self._key("hl", channel), self._key("ml", channel)], args=args
                )
            except (RedisError, OSError) as exc:
                raise BrokerError(f"history of {channel} failed: {exc}") from None
        epoch_text = _text(epoch)
        publications = [decode_publication_body(body, first + i, epoch_text) for i, body in enumerate(bodies)]
        if reverse:
            publications.reverse()
        return HistoryResult(publications, StreamPosition(int(top), epoch_text))

    async def remove_history(self, channel: str) -> None:
        try:
            await self.redis.delete(self._key("hl", channel))
        except (RedisError, OSError) as exc:
            raise BrokerError(f"removing history of {channel} failed: {exc}") from None

    # presence

    async def add_presence(self, channel: str, client_id: str, info: ClientInfo, ttl: float = 60.0) -> None:
        keys = [self._key("p", channel), self._key("pz", channel)]
        try:
            await self._presence_add(keys=keys, args=[client_id, encode_client_info(info), _ms(ttl)])
        except (RedisError, OSError) as exc:
            raise BrokerError(f"presence update on {channel} failed: {exc}") from None

    async def remove_presence(self, channel: str, client_id: str) -> None:
        keys = [self._key("p", channel), self._key("pz", channel)]
        try:
            await self._presence_remove(keys=keys, args=[client_id])
        except (RedisError, OSError) as exc:
            raise BrokerError(f"presence update on {channel} failed: {exc}") from None

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = [self._key("p", channel), self._key("pz", channel)]
        try:
            flat = await self._presence_get(keys=keys, args=[])
        except (RedisError, OSError) as exc:
            raise BrokerError(f"presence of {channel} failed: {exc}") from None
        return {_text(flat[i]): decode_client_info(flat[i + 1]) for i in range(0, len(flat), 2)}
