"""Redis engine: pub/sub for fan-out, a stream per channel for history, hashes for presence.

A publish is one Lua script, so the idempotency check, the offset increment, the history append
and the fan-out happen atomically: every node sees one order per channel and no offset is ever
published twice or skipped. Stream entry ids are `0-<offset>`, which makes "publications after
offset N" a plain exclusive XRANGE. Presence expiry uses the Redis server's clock, so replicas
with skewed clocks agree on who is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from tsunagu_core.broker.base import (
    Broker,
    BrokerError,
    ClientInfo,
    HistoryResult,
    Publication,
    PublishOptions,
    PublishRequest,
    PublishResult,
    StreamPosition,
)
from tsunagu_core.broker.codec import (
    decode_client_info,
    decode_presence_event,
    decode_publication_body,
    encode_client_info,
    encode_presence_event,
    encode_publication_body,
)
from tsunagu_core.redis_pool import connect_redis
from tsunagu_core.telemetry import BROKER_OP_SECONDS, BROKER_PUBLISHED, BROKER_RESUBSCRIBES

log = logging.getLogger("tsunagu.broker.redis")

_PUBLISH = """
if ARGV[8] == '1' then
  local seen = redis.call('get', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    return {tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1), 1}
  end
end
local offset = 0
local epoch = ''
if tonumber(ARGV[2]) > 0 then
  epoch = redis.call('hget', KEYS[2], 'e')
  if not epoch then
    epoch = ARGV[7]
    redis.call('hset', KEYS[2], 'e', epoch)
    redis.call('del', KEYS[1])
  end
  offset = redis.call('hincrby', KEYS[2], 's', 1)
  redis.call('xadd', KEYS[1], 'MAXLEN', '=', ARGV[2], '0-' .. offset, 'd', ARGV[1])
  if tonumber(ARGV[3]) > 0 then redis.call('pexpire', KEYS[1], ARGV[3]) end
  if tonumber(ARGV[4]) > 0 then redis.call('pexpire', KEYS[2], ARGV[4]) end
end
redis.call('publish', ARGV[6], 'p' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
if ARGV[8] == '1' then redis.call('set', KEYS[3], offset .. ':' .. epoch, 'PX', ARGV[5]) end
return {offset, epoch, 0}
"""

# Many publications in one call: the steps of _PUBLISH for each, in order. ARGV[1] is the count and
# ARGV[2] the epoch a stream starts with; then 7 arguments per publication, 3 keys each.
_PUBLISH_MANY = """
local results = {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local a = 2 + i * 7
  local k = i * 3
  local body, size, idempotent = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 7] == '1'
  local seen = false
  if idempotent then seen = redis.call('get', KEYS[k + 3]) end
  if seen then
    local sep = string.find(seen, ':', 1, true)
    results[i + 1] = {tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1), 1}
  else
    local offset = 0
    local epoch = ''
    if size > 0 then
      epoch = redis.call('hget', KEYS[k + 2], 'e')
      if not epoch then
        epoch = ARGV[2]
        redis.call('hset', KEYS[k + 2], 'e', epoch)
        redis.call('del', KEYS[k + 1])
      end
      offset = redis.call('hincrby', KEYS[k + 2], 's', 1)
      redis.call('xadd', KEYS[k + 1], 'MAXLEN', '=', size, '0-' .. offset, 'd', body)
      if tonumber(ARGV[a + 3]) > 0 then redis.call('pexpire', KEYS[k + 1], ARGV[a + 3]) end
      if tonumber(ARGV[a + 4]) > 0 then redis.call('pexpire', KEYS[k + 2], ARGV[a + 4]) end
    end
    redis.call('publish', ARGV[a + 6], 'p' .. offset .. ':' .. epoch .. ':' .. body)
    if idempotent then redis.call('set', KEYS[k + 3], offset .. ':' .. epoch, 'PX', ARGV[a + 5]) end
    results[i + 1] = {offset, epoch, 0}
  end
end
return results
"""

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
if limit == 0 then return {top, epoch, {}} end
local since = tonumber(ARGV[3])
local use_since = since >= 0 and ARGV[4] == epoch
local entries
if ARGV[6] == '1' then
  local hi = '+'
  if use_since then
    if since <= 1 then return {top, epoch, {}} end
    hi = '(0-' .. since
  end
  if limit > 0 then
    entries = redis.call('xrevrange', KEYS[1], hi, '-', 'COUNT', limit)
  else
    entries = redis.call('xrevrange', KEYS[1], hi, '-')
  end
else
  local lo = '-'
  if use_since then lo = '(0-' .. since end
  if limit > 0 then
    entries = redis.call('xrange', KEYS[1], lo, '+', 'COUNT', limit)
  else
    entries = redis.call('xrange', KEYS[1], lo, '+')
  end
end
return {top, epoch, entries}
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
# Publications per script call of publish_many: bounds how long one call holds Redis (~1 ms).
PUBLISH_MANY_CHUNK = 256


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
        # Auto-pipelining: publishes issued while a round trip is in flight go out together in the
        # next pipeline, so N concurrent publishers cost ~1 round trip instead of N.
        self._queued: list[tuple[list[str], Sequence[bytes | str | int], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
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
        self._publish_many_script = client.register_script(_PUBLISH_MANY)
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

    async def publish(self, channel: str, data: bytes, options: PublishOptions = PublishOptions()) -> PublishResult:
        body = encode_publication_body(
            Publication(data=data, info=options.info, tags=options.tags, time_ms=int(time.time() * 1000))
        )
        idempotent = bool(options.idempotency_key)
        keys = [
            self._key("h", channel),
            self._key("m", channel),
            self._key("i", channel) + f":{options.idempotency_key or ''}",
        ]
        args: Sequence[bytes | str | int] = [
            body,
            options.history_size,
            _ms(options.history_ttl),
            _ms(options.meta_ttl),
            _ms(options.idempotency_ttl),
            self._fanout_name(channel),
            uuid.uuid4().hex[:8],
            "1" if idempotent else "0",
        ]
        with BROKER_OP_SECONDS.labels("publish").time():
            try:
                if self._sender is None and not self._direct:
                    # Nothing in flight: go straight out, no hop through the sender task.
                    self._direct = True
                    try:
                        offset, epoch, duplicate = await self._publish_script(keys=keys, args=args)
                    finally:
                        self._direct = False
                else:
                    offset, epoch, duplicate = await self._queue_publish(keys, args)
            except (RedisError, OSError) as exc:
                raise BrokerError(f"publish to {channel} failed: {exc}") from None
        if not duplicate:
            BROKER_PUBLISHED.inc()
        return PublishResult(int(offset), _text(epoch), duplicate=bool(duplicate))

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        """One script call per `PUBLISH_MANY_CHUNK` publications, the chunks in one pipeline."""
        if not requests:
            return []
        now_ms = int(time.time() * 1000)
        epoch = uuid.uuid4().hex[:8]
        calls: list[tuple[list[str], list[bytes | str | int]]] = []
        for first in range(0, len(requests), PUBLISH_MANY_CHUNK):
            chunk = requests[first : first + PUBLISH_MANY_CHUNK]
            keys: list[str] = []
            args: list[bytes | str | int] = [len(chunk), epoch]
            for request in chunk:
                options = request.options
                channel = request.channel
                keys += (
                    self._key("h", channel),
                    self._key("m", channel),
                    self._key("i", channel) + f":{options.idempotency_key or ''}",
                )
                args += (
                    encode_publication_body(
                        Publication(data=request.data, info=options.info, tags=options.tags, time_ms=now_ms)
                    ),
                    options.history_size,
                    _ms(options.history_ttl),
                    _ms(options.meta_ttl),
                    _ms(options.idempotency_ttl),
                    self._fanout_name(channel),
                    "1" if options.idempotency_key else "0",
                )
            calls.append((keys, args))
        with BROKER_OP_SECONDS.labels("publish_many").time():
            try:
                if len(calls) == 1:
                    replies = [await self._publish_many_script(keys=calls[0][0], args=calls[0][1])]
                else:
                    pipe = self.redis.pipeline(transaction=False)
                    for keys, args in calls:
                        await self._publish_many_script(keys=keys, args=args, client=pipe)
                    replies = await pipe.execute()
            except (RedisError, OSError) as exc:
                raise BrokerError(f"publishing {len(requests)} publications failed: {exc}") from None
        results = [
            PublishResult(int(offset), _text(stream_epoch), duplicate=bool(duplicate))
            for reply in replies
            for offset, stream_epoch, duplicate in reply
        ]
        BROKER_PUBLISHED.inc(sum(1 for r in results if not r.duplicate))
        return results

    def _queue_publish(self, keys: list[str], args: Sequence[bytes | str | int]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued(), name="redis-broker-publish")
        return future

    async def _send_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    if len(batch) == 1:
                        keys, args, _ = batch[0]
                        results: list[Any] = [await self._publish_script(keys=keys, args=args)]
                    else:
                        pipe = self.redis.pipeline(transaction=False)
                        for keys, args, _ in batch:
                            await self._publish_script(keys=keys, args=args, client=pipe)
                        results = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError, BrokerError) as exc:
                    results = [exc] * len(batch)
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue  # the publisher gave up waiting (cancelled)
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._sender = None
            for _, _, future in self._queued:
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
                top, epoch, entries = await self._history_script(
                    keys=[self._key("h", channel), self._key("m", channel)], args=args
                )
            except (RedisError, OSError) as exc:
                raise BrokerError(f"history of {channel} failed: {exc}") from None
        epoch_text = _text(epoch)
        publications = []
        for entry_id, fields in entries:
            offset = int(_text(entry_id).split("-", 1)[1])
            publications.append(decode_publication_body(fields[1], offset, epoch_text))
        return HistoryResult(publications, StreamPosition(int(top), epoch_text))

    async def remove_history(self, channel: str) -> None:
        try:
            await self.redis.delete(self._key("h", channel))
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
