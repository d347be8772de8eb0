"""In-process broker for `tsunagu run` and unit tests: one node, same semantics as Redis."""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from tsunagu_core.broker.base import (
    Broker,
    ClientInfo,
    HistoryResult,
    Publication,
    PublishOptions,
    PublishResult,
    StreamPosition,
    select_window,
)
from tsunagu_core.telemetry import BROKER_PUBLISHED


@dataclass(slots=True)
class _Stream:
    epoch: str
    top: int = 0
    kept: deque[Publication] = field(default_factory=deque)
    history_expires: float = 0.0
    meta_expires: float = 0.0


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._idempotency: dict[tuple[str, str], tuple[PublishResult, float]] = {}
        self._subscribed: set[str] = set()
        self._presence: dict[str, dict[str, tuple[ClientInfo, float]]] = {}

    @staticmethod
    def now() -> float:
        return time.monotonic()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribed.clear()

    async def ping(self) -> None:
        return None

    def _stream(self, channel: str, meta_ttl: float) -> _Stream:
        now = self.now()
        stream = self._streams.get(channel)
        if stream is None or (stream.meta_expires and stream.meta_expires <= now):
            stream = _Stream(epoch=uuid.uuid4().hex[:8])
            self._streams[channel] = stream
        if stream.history_expires and stream.history_expires <= now:
            stream.kept.clear()
        if meta_ttl > 0:
            stream.meta_expires = now + meta_ttl
        return stream

    async def publish(self, channel: str, data: bytes, options: PublishOptions = PublishOptions()) -> PublishResult:
        now = self.now()
        if options.idempotency_key:
            seen = self._idempotency.get((channel, options.idempotency_key))
            if seen is not None and seen[1] > now:
                return PublishResult(seen[0].offset, seen[0].epoch, duplicate=True)
        offset, epoch = 0, ""
        if options.history_size > 0:
            stream = self._stream(channel, options.meta_ttl)
            stream.top += 1
            offset, epoch = stream.top, stream.epoch
        publication = Publication(
            data=bytes(data),
            offset=offset,
            epoch=epoch,
            info=options.info,
            tags=dict(options.tags),
            time_ms=int(time.time() * 1000),
        )
        if options.history_size > 0:
            stream.kept.append(publication)
            while len(stream.kept) > options.history_size:
                stream.kept.popleft()
            stream.history_expires = now + options.history_ttl if options.history_ttl > 0 else 0.0
        result = PublishResult(offset, epoch)
        if options.idempotency_key:
            self._idempotency[(channel, options.idempotency_key)] = (result, now + options.idempotency_ttl)
            if len(self._idempotency) > 100_000:
                self._forget_expired_keys(now)
        BROKER_PUBLISHED.inc()
        if channel in self._subscribed and self.handler is not None:
            await self.handler.on_publication(channel, publication)
        return result

    def _forget_expired_keys(self, now: float) -> None:
        for key in [k for k, (_, expires) in self._idempotency.items() if expires <= now]:
            del self._idempotency[key]

    async def publish_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        if channel in self._subscribed and self.handler is not None:
            await self.handler.on_presence(channel, join, info)

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = -1,
        reverse: bool = False,
        meta_ttl: float = 86400.0,
    ) -> HistoryResult:
        stream = self._stream(channel, meta_ttl)
        chosen = select_window(list(stream.kept), since, stream.epoch, limit, reverse)
        return HistoryResult(chosen, StreamPosition(stream.top, stream.epoch))

    async def remove_history(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is not None:
            stream.kept.clear()

    async def add_presence(self, channel: str, client_id: str, info: ClientInfo, ttl: float = 60.0) -> None:
        self._presence.setdefault(channel, {})[client_id] = (info, self.now() + ttl)

    async def remove_presence(self, channel: str, client_id: str) -> None:
        clients = self._presence.get(channel)
        if clients is not None:
            clients.pop(client_id, None)
            if not clients:
                del self._presence[channel]

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        now = self.now()
        clients = self._presence.get(channel, {})
        for client_id in [c for c, (_, expires) in clients.items() if expires <= now]:
            del clients[client_id]
        return {client_id: info for client_id, (info, _) in clients.items()}
