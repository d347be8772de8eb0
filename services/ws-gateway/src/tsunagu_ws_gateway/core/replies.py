"""What a session hands back: typed results through a `Sink`.

A sink is where a session's output goes. The native protocol's (`FrameSink`) encodes every reply and push
with the connection's codec (JSON or protobuf) into frames for its transport; a protocol adapter is a sink
itself (`protocols/base.py`) and gets the results as they are: dicts typed below whose publications are
`Publication`s and whose presence holds `ClientInfo`s. No reply is encoded to be decoded again.

Publications the hub fans out are the exception, on purpose: the hub renders each publication once per
`Renderer` (JSON, protobuf, or an adapter's own) and hands every subscriber the same bytes (`deliver`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.core.transport import Transport
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import Disconnect, ErrorCode


class SubscribeResult(TypedDict, total=False):
    recoverable: bool
    positioned: bool
    epoch: str
    offset: int
    recovered: bool
    was_recovering: bool
    publications: list[Publication]
    expires: bool
    ttl: int
    # Publications come as fossil deltas (the client asked and the namespace allows it).
    delta: bool
    # From a subscribe hook's backend (raw JSON, or bytes for protobuf clients).
    data: bytes


class ConnectResult(TypedDict, total=False):
    client: str
    version: str
    ping: int
    pong: bool
    node: str
    session: str
    expires: bool
    ttl: int
    subs: dict[str, SubscribeResult]
    # From the connect hook's backend.
    data: bytes


class PublishResult(TypedDict, total=False):
    offset: int
    epoch: str
    # forwarded publications answer with what the service's forwarder returns
    command_id: str
    reply_channel: str


class HistoryResult(TypedDict):
    publications: list[Publication]
    epoch: str
    offset: int


class PresenceResult(TypedDict):
    presence: dict[str, ClientInfo]


class PresenceStatsResult(TypedDict):
    num_clients: int
    num_users: int


class RpcResult(TypedDict):
    data: Any


class RefreshResult(TypedDict, total=False):
    client: str
    version: str
    expires: bool
    ttl: int


@dataclass(frozen=True, slots=True)
class Reply:
    """One command's answer: its result, or the error it got."""

    method: str
    result: Mapping[str, Any] = field(default_factory=dict)
    error: ErrorCode | None = None
    temporary: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class Renderer(Protocol):
    """Renders what the hub fans out, once per node for every subscriber that shares the renderer.
    An empty frame means "nothing for this kind of client"."""

    @property
    def name(self) -> str: ...

    def publication_push(self, channel: str, pub: Publication) -> bytes: ...

    def join_push(self, channel: str, info: ClientInfo) -> bytes: ...

    def leave_push(self, channel: str, info: ClientInfo) -> bytes: ...


class Sink(Protocol):
    renderer: Renderer
    # Whether the session pings the client with the native protocol's empty reply...
    pings: bool
    # ...and waits for its pong (a unidirectional client cannot answer: it is pinged, never timed out).
    pongs: bool

    def deliver(self, frame: bytes) -> None:
        """A frame the renderer made (a publication, a join, a leave)."""
        ...

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> None: ...

    def error(self, command_id: int, error: ErrorCode, temporary: bool = False) -> None: ...

    def unsubscribed(self, channel: str, code: int, reason: str) -> None:
        """The server ended a subscription (server API, lost state, expiry)."""
        ...

    def subscribed(self, channel: str, result: Mapping[str, Any]) -> None:
        """The server subscribed the client (server API); it already gets the channel's publications."""
        ...

    def message(self, data: bytes) -> None: ...

    def ping(self) -> None: ...

    def close(self, disconnect: Disconnect) -> None: ...


class FrameSink:
    """The native protocol's sink: every reply and push encoded with the codec, queued to the transport."""

    __slots__ = ("codec", "deliver", "pings", "pongs", "renderer", "transport")

    def __init__(self, codec: Codec, transport: Transport) -> None:
        self.codec = codec
        self.renderer: Renderer = codec
        self.transport = transport
        self.pings = self.pongs = bool(codec.ping_frame)
        # The hub calls this once per subscriber per publication: the transport's own method, no hop.
        self.deliver = transport.send

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> None:
        self.transport.send(self.codec.reply(command_id, method, result))

    def error(self, command_id: int, error: ErrorCode, temporary: bool = False) -> None:
        self.transport.send(self.codec.error_reply(command_id, error, temporary))

    def unsubscribed(self, channel: str, code: int, reason: str) -> None:
        self.transport.send(self.codec.unsubscribe_push(channel, code, reason))

    def subscribed(self, channel: str, result: Mapping[str, Any]) -> None:
        self.transport.send(self.codec.subscribe_push(channel, result))

    def message(self, data: bytes) -> None:
        self.transport.send(self.codec.message_push(data))

    def ping(self) -> None:
        self.transport.send(self.codec.ping_frame)

    def close(self, disconnect: Disconnect) -> None:
        self.transport.close(disconnect)
