"""Redis engine: pub/sub for fan-out, a list per channel for history, hashes for presence.

A publish is one Lua script, so the idempotency check, the offset increment, the history append
and the fan-out happen atomically: every node sees one order per channel and no offset is ever
published twice or skipped. One script call carries many publications (`publish_many`, and the
publishes that concurrent callers issue while one call is in flight). A channel's history is a
list holding the publications with offsets `top - len + 1 .. top` (appended at the right, trimmed
at the left, dropped whole when it expires), so "publications after offset N" is one LRANGE by
index; a list append costs Redis a third of a stream append. Presence expiry uses the Redis
server's clock, so replicas with skewed clocks agree on who is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoScriptError, RedisError

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
from tsunagu_core.redis_pool import connect_redis
from tsunagu_core.telemetry import BROKER_OP_SECONDS, BROKER_PUBLISHED, BROKER_RESUBSCRIBES

log = logging.getLogger("tsunagu.broker.redis")

# Publications in one call, applied in order. ARGV[1] is the key prefix, ARGV[2] the epoch a new
# stream starts with, ARGV[3] the publications packed by `_pack_publication` (a few arguments for
# hundreds of publications: redis-py's per-argument encoding was most of the client's cost). The keys
# are built here from the prefix, so this runs on one Redis (with replicas), not a Redis Cluster.
# Returns offset, epoch and duplicate flag of each publication, flat.
_PUBLISH = """
local prefix, new_epoch, packed = ARGV[1], ARGV[2], ARGV[3]
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
        epoch = redis.call('hget', meta, 'e')
        if not epoch then
          epoch = new_epoch
          redis.call('hset', meta, 'e', epoch)
          redis.call('del', history)
        end
        epochs[channel] = epoch
      end
      offset = redis.call('hincrby', meta, 's', 1)
      redis.call('rpush', history, body)
      redis.call('ltrim', history, -size, -1)
      -- expiries once per channel and call, with the last publication's TTLs
      ttls[channel] = {history, meta, history_ttl, meta_ttl}
    end
    redis.call('publish', prefix .. '.ch.' .. channel, 'p' .. offset .. ':' .. epoch .. ':' .. body)
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

# Returns the top offset, the epoch, the publications asked for (oldest first) and the offset of the
# first of them.
_HISTORY = """
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('hset', KEYS[2], 'e', epoch)
  redis.call('del', KEYS[1])
end
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


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


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
        self._redis: Redis | None = None
        self._channels: set[str] = set()
        self._pubsub: PubSub | None = None
        self._connected = asyncio.Event()
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        # Auto-batching: publishes issued while a call is in flight go out together in the next script
        # call, so N concurrent publishers cost ~1 round trip instead of N. Two senders let the client
        # prepare one batch while Redis runs the other (one caller's publishes are never in two
        # batches at once: it awaits each, so its order holds).
        self._queued: list[tuple[bytes, asyncio.Future[PublishResult]]] = []
        self._senders = 0
        self._sender_tasks: set[asyncio.Task[None]] = set()
        self._direct = False

    # keys: the channel sits in a hash tag so one channel's keys share a Redis Cluster slot

    def _key(self, kind: str, channel: str) -> str:
        return f"{self.prefix}:{kind}:{{{channel}}}"

    def _fanout_name(self, channel: str) -> bytes:
        return f"{self.prefix}.ch.{channel}".encode()

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise BrokerError("the Redis broker is not started")
        return self._redis

    async def start(self) -> None:
        if self._redis is not None:
            return
        try:
            client = await connect_redis(self.url, max_connections=self.max_connections, wait=POOL_WAIT_SECONDS)
        except (RedisError, OSError) as exc:
            raise BrokerError(f"Redis at {self.url} does not answer: {exc}") from None
        self._redis = client
        self._publish_script = client.register_script(_PUBLISH)
        self._history_script = client.register_script(_HISTORY)
        self._presence_add = client.register_script(_PRESENCE_ADD)
        self._presence_get = client.register_script(_PRESENCE_GET)
        self._presence_remove = client.register_script(_PRESENCE_REMOVE)
        self._closing = False
        self._listener = asyncio.create_task(self._listen(), name="redis-broker-fanout")

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
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

    async def _listen(self) -> None:
        backoff = 0.1
        lost = False
        while not self._closing:
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
                    if self.handler is not None:
                        await self.handler.on_resubscribed()
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
        if kind != "message" or self.handler is None:
            return
        channel = name.decode()[len(self.prefix) + 4 :]
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
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe(self._fanout_name(channel))

    def _pack(self, channel: str, data: bytes, options: PublishOptions, time_ms: int) -> bytes:
        return _pack_publication(channel, encode_body(data, options.info, options.tags, time_ms), options)

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
        """One script call per `PUBLISH_CHUNK` publications, the chunks in one pipeline."""
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

    async def _run_publish(self, packed: Sequence[bytes]) -> list[PublishResult]:
        chunks = [b"".join(packed[i : i + PUBLISH_CHUNK]) for i in range(0, len(packed), PUBLISH_CHUNK)]
        epoch = uuid.uuid4().hex[:8]
        if len(chunks) == 1:
            replies = [await self._publish_script(args=[self.prefix, epoch, chunks[0]])]
        else:
            # One connection keeps the chunks in order. EVALSHA directly: a pipeline of registered
            # scripts asks SCRIPT EXISTS first, a round trip more per call.
            try:
                replies = await self._pipeline_publish(chunks, epoch)
            except NoScriptError:
                await self.redis.script_load(_PUBLISH)
                replies = await self._pipeline_publish(chunks, epoch)
        return [
            PublishResult(int(flat[i]), _text(flat[i + 1]), duplicate=flat[i + 2] == 1)
            for flat in replies
            for i in range(0, len(flat), 3)
        ]

    async def _pipeline_publish(self, chunks: list[bytes], epoch: str) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for chunk in chunks:
            pipe.evalsha(self._publish_script.sha, 0, self.prefix, epoch, chunk)
        return await pipe.execute()

    def _queue_publish(self, packed: bytes) -> asyncio.Future[PublishResult]:
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
        try:
            await self.redis.publish(self._fanout_name(channel), b"j" + encode_presence_event(join, info))
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
