"""The broker: fast fan-out between gateway replicas, offset-numbered channel history, presence.

Its promises, which the contract tests check against every engine:
- Publications in a channel with history get offsets 1, 2, 3... within an epoch; a new epoch
  (history lost: expiry, a Redis flush) starts again at 1, so a client holding the old epoch
  knows it cannot recover from history.
- A publish with an idempotency key that was seen within its TTL is not applied again; the
  original offset and epoch come back with `duplicate=True`.
- `subscribe()` returns only after the subscription is live, so "subscribe, then read history"
  leaves no gap between the history read and the live stream.
- After a fan-out connection is lost and restored, the handler's `on_resubscribed()` is called:
  publications may have been missed and subscribers should recover from history.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ClientInfo:
    user: str = ""
    client: str = ""
    conn_info: bytes = b""
    chan_info: bytes = b""


@dataclass(frozen=True, slots=True)
class StreamPosition:
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Publication:
    data: bytes
    offset: int = 0
    epoch: str = ""
    info: ClientInfo | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    time_ms: int = 0


@dataclass(frozen=True, slots=True)
class PublishOptions:
    """How to keep a publication. `history_size == 0` means fan-out only, with no offset."""

    history_size: int = 0
    history_ttl: float = 0.0
    # How long the stream position (epoch and top offset) outlives the history itself.
    meta_ttl: float = 86400.0
    idempotency_key: str | None = None
    idempotency_ttl: float = 300.0
    info: ClientInfo | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """One publication of `Broker.publish_many`."""

    channel: str
    data: bytes
    options: PublishOptions = PublishOptions()


@dataclass(frozen=True, slots=True)
class PublishResult:
    offset: int
    epoch: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class HistoryResult:
    publications: list[Publication]
    position: StreamPosition


@dataclass(frozen=True, slots=True)
class PresenceStats:
    num_clients: int
    num_users: int


class BrokerError(Exception):
    """The broker could not carry out an operation."""


class BrokerEventHandler(Protocol):
    async def on_publication(self, channel: str, publication: Publication) -> None: ...

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None: ...

    async def on_resubscribed(self) -> None: ...


class Broker(abc.ABC):
    """See the module docstring for what every engine promises."""

    handler: BrokerEventHandler | None = None

    def set_handler(self, handler: BrokerEventHandler) -> None:
        self.handler = handler

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None: ...

    # fan-out and history

    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes, options: PublishOptions = PublishOptions()) -> PublishResult: ...

    async def publish_many(self, requests: Sequence[PublishRequest]) -> list[PublishResult]:
        """Publish each request, in order, with the same promises as `publish`; engines carry the
        whole batch in one round trip. When it raises, a prefix of the batch may have been applied:
        retry it with idempotency keys to apply the rest exactly once."""
        return [await self.publish(r.channel, r.data, r.options) for r in requests]

    @abc.abstractmethod
    async def publish_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        """Fan out a join or leave to this channel's subscribers on every node."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abc.abstractmethod
    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = -1,
        reverse: bool = False,
        meta_ttl: float = 86400.0,
    ) -> HistoryResult:
        """Publications after `since` (before it when `reverse`), at most `limit` (-1: all kept, 0: none),
        and the stream's current position. A `since` from another epoch reads from the start."""

    @abc.abstractmethod
    async def remove_history(self, channel: str) -> None: ...

    # presence

    @abc.abstractmethod
    async def add_presence(self, channel: str, client_id: str, info: ClientInfo, ttl: float = 60.0) -> None: ...

    @abc.abstractmethod
    async def remove_presence(self, channel: str, client_id: str) -> None: ...

    @abc.abstractmethod
    async def presence(self, channel: str) -> dict[str, ClientInfo]: ...

    async def presence_stats(self, channel: str) -> PresenceStats:
        clients = await self.presence(channel)
        return PresenceStats(len(clients), len({info.user for info in clients.values()}))


def select_window(
    publications: list[Publication], since: StreamPosition | None, epoch: str, limit: int, reverse: bool
) -> list[Publication]:
    """Apply since/limit/reverse to a channel's kept publications (oldest first)."""
    if limit == 0:
        return []
    chosen = publications
    if since is not None and since.epoch == epoch:
        if reverse:
            chosen = [p for p in chosen if p.offset < since.offset]
        else:
            chosen = [p for p in chosen if p.offset > since.offset]
    if reverse:
        chosen = list(reversed(chosen))
    if limit > 0:
        chosen = chosen[:limit]
    return chosen
