"""The commands a session carries out, typed: the native protocol's decoders produce them through
`parse`, the protocol adapters build them directly.

`parse` is where poison input stops: a field of the wrong type or out of range is error 107 (bad
request) for that one command, and the connection goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tsunagu_core.broker import StreamPosition

from tsunagu_ws_gateway.filters import TagsFilter, compile_filter
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ProtocolError, ReplyError

# Subscribe flag a client sets to get error 112 instead of `recovered: false` (it reloads state itself).
REJECT_UNRECOVERED_FLAG = 2
MAX_IDEMPOTENCY_KEY = 128
_UINT64 = 2**64


@dataclass(frozen=True, slots=True)
class Subscribe:
    method: ClassVar[str] = "subscribe"
    channel: str
    token: str = ""
    # Recover from here (the client's last offset and epoch); None: start at the top.
    since: StreamPosition | None = None
    reject_unrecovered: bool = False
    join_leave: bool = False
    # The client asks for the stream position, or to be recoverable (where the namespace lets it).
    positioned: bool = False
    recoverable: bool = False
    # Only publications whose tags match reach this subscriber (where the namespace allows filters).
    tags_filter: TagsFilter | None = None
    # The delta format asked for ("fossil", the only one), or "" for full payloads.
    delta: str = ""
    # For the subscribe hook's backend.
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Connect:
    method: ClassVar[str] = "connect"
    token: str = ""
    # Where the client stands in the channels the server subscribes it to (the token's `subs`).
    subs: Mapping[str, Subscribe] = field(default_factory=dict)
    # For the connect hook's backend: the client's data, name and version, and the headers it sets
    # in the command (browsers cannot set handshake headers).
    data: bytes = b""
    name: str = ""
    version: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refresh:
    method: ClassVar[str] = "refresh"
    token: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    method: ClassVar[str] = "unsubscribe"
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    method: ClassVar[str] = "publish"
    channel: str
    data: bytes
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class History:
    method: ClassVar[str] = "history"
    channel: str
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class Presence:
    method: ClassVar[str] = "presence"
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceStats:
    method: ClassVar[str] = "presence_stats"
    channel: str


@dataclass(frozen=True, slots=True)
class Ping:
    method: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class Send:
    method: ClassVar[str] = "send"


@dataclass(frozen=True, slots=True)
class Rpc:
    method: ClassVar[str] = "rpc"
    name: str
    data: Any = None  # a JSON value


@dataclass(frozen=True, slots=True)
class SubRefresh:
    method: ClassVar[str] = "sub_refresh"
    channel: str
    token: str


Command = (
    Connect | Refresh | Subscribe | Unsubscribe | Publish | History | Presence | PresenceStats | Ping | Send | Rpc
    | SubRefresh
)  # fmt: skip
METHODS = (
    "connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats",
    "history", "ping", "send", "rpc", "refresh", "sub_refresh",
)  # fmt: skip


# reading fields


def _bad(detail: str) -> ReplyError:
    return ReplyError(codes.BAD_REQUEST, detail)


def _string(request: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = request.get(name)
    if value is None or value == "":
        if required:
            raise _bad(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    return value


def _integer(value: Any, name: str, *, default: int = 0, low: int = 0, high: int = _UINT64) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise _bad(f"{name} must be an integer from {low}")
    return value


def _flag(request: Mapping[str, Any], name: str) -> bool:
    value = request.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean")
    return value


def position_of(value: Any, name: str) -> StreamPosition:
    if not isinstance(value, Mapping):
        raise _bad(f"{name} must be an object {{offset, epoch}}")
    epoch = value.get("epoch")
    if epoch is not None and not isinstance(epoch, str):
        raise _bad(f"{name}.epoch must be a string")
    return StreamPosition(_integer(value.get("offset"), f"{name}.offset"), epoch or "")


def subscribe_of(
    request: Mapping[str, Any], *, channel: str | None = None, payload: Callable[[Any], bytes] | None = None
) -> Subscribe:
    channel = channel if channel is not None else _string(request, "channel", required=True)
    since = None
    if _flag(request, "recover"):
        # An empty epoch is "whatever the stream's epoch is" (a client that knows only an offset, or
        # none: a cache-mode subscriber asking for the latest publication).
        since = StreamPosition(_integer(request.get("offset"), "offset"), _string(request, "epoch"))
    flags = _integer(request.get("flag"), "flag", high=2**63)
    tree = request.get("tf")
    return Subscribe(
        channel=channel,
        token=_string(request, "token"),
        since=since,
        reject_unrecovered=bool(flags & REJECT_UNRECOVERED_FLAG),
        join_leave=_flag(request, "join_leave"),
        positioned=_flag(request, "positioned"),
        recoverable=_flag(request, "recoverable"),
        tags_filter=compile_filter(tree) if tree else None,
        delta=_delta_type(request),
        data=encode(payload, request["data"]) if payload is not None and request.get("data") else b"",
    )


DELTA_TYPES = frozenset({"fossil"})


def _delta_type(request: Mapping[str, Any]) -> str:
    delta = _string(request, "delta")
    if delta and delta not in DELTA_TYPES:
        raise ReplyError(codes.BAD_REQUEST, f"unknown delta type {delta!r} (the one there is: fossil)")
    return delta


def parse(
    method: str,
    request: Mapping[str, Any],
    payload: Callable[[Any], bytes],
    rpc_data: Callable[[Any], Any],
) -> Command:
    """The typed command of a decoded native request; `payload` and `rpc_data` are the codec's, which
    knows whether `data` is a JSON value or bytes. ReplyError(107) for a bad field."""
    if method == "connect":
        token = request.get("token") or ""
        if not isinstance(token, str):
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "token must be a string")
        subs = request.get("subs") or {}
        if not isinstance(subs, Mapping):
            raise _bad("subs must be an object")
        wanted = {
            channel: subscribe_of(sub, channel=channel)
            for channel, sub in subs.items()
            if isinstance(channel, str) and isinstance(sub, Mapping)
        }
        headers = request.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values()):
            raise _bad("headers must map names to strings")
        return Connect(
            token=token,
            subs=wanted,
            data=encode(payload, request["data"]) if request.get("data") else b"",
            name=_string(request, "name"),
            version=_string(request, "version"),
            headers={str(k).lower(): v for k, v in headers.items()},
        )
    if method == "subscribe":
        return subscribe_of(request, payload=payload)
    if method == "unsubscribe":
        return Unsubscribe(_string(request, "channel", required=True))
    if method == "publish":
        if "data" not in request:
            raise _bad("publish needs data")
        key = request.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or len(key) > MAX_IDEMPOTENCY_KEY):
            raise _bad(f"idempotency_key must be a string of at most {MAX_IDEMPOTENCY_KEY} characters")
        return Publish(_string(request, "channel", required=True), encode(payload, request["data"]), key or None)
    if method == "history":
        since = request.get("since")
        return History(
            channel=_string(request, "channel", required=True),
            limit=_integer(request.get("limit"), "limit", low=-(2**31), high=2**31),
            since=position_of(since, "since") if since is not None else None,
            reverse=_flag(request, "reverse"),
        )
    if method == "presence":
        return Presence(_string(request, "channel", required=True))
    if method == "presence_stats":
        return PresenceStats(_string(request, "channel", required=True))
    if method == "ping":
        return Ping()
    if method == "send":
        return Send()
    if method == "rpc":
        name = request.get("method")
        if not isinstance(name, str) or not name:
            raise ReplyError(codes.METHOD_NOT_FOUND, "rpc needs a method")
        return Rpc(name, rpc_data(request.get("data")))
    if method == "refresh":
        return Refresh(_string(request, "token", required=True))
    if method == "sub_refresh":
        return SubRefresh(_string(request, "channel", required=True), _string(request, "token", required=True))
    raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"unknown method {method!r}")


def encode(payload: Callable[[Any], bytes], data: Any) -> bytes:
    """A JSON value as the bytes a publication carries; 107 when it cannot be (nested too deep...)."""
    try:
        return payload(data)
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        raise _bad(f"data cannot be published: {exc}") from None
