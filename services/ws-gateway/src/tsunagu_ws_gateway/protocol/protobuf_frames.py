"""The Centrifugo client protocol v2, protobuf flavour (subprotocol `centrifuge-protobuf`).

A binary WebSocket message holds one or more varint-length-delimited messages: `Command`s from the
client, `Reply`s from the server (schema: proto/centrifugal/centrifuge_client.proto). An empty Reply
is the server's ping, an empty Command the client's pong. Payloads are bytes and travel untouched:
what a JSON client published arrives as its JSON text, what a protobuf client published reaches
protobuf subscribers byte for byte (and JSON subscribers by the rule in `json_frames.json_data`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.protocol import json_frames
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import BAD_REQUEST_DISCONNECT, ErrorCode, ProtocolError
from tsunagu_ws_gateway.protocol.wire import centrifuge_client_pb2 as pb

# The longest length prefix we read: 5 varint bytes hold any uint32, far above any frame limit.
_MAX_VARINT_BYTES = 5


_SMALL_VARINTS = [bytes((n,)) for n in range(0x80)]


def varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(message: ProtoMessage) -> bytes:
    body = message.SerializeToString()
    return varint(len(body)) + body


def _read_varint(raw: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(position, min(position + _MAX_VARINT_BYTES, len(raw))):
        byte = raw[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise ProtocolError(BAD_REQUEST_DISCONNECT, "malformed length prefix")


def _fields(message: ProtoMessage) -> dict[str, Any]:
    """The set fields of a request as the JSON protocol's dict (bytes stay bytes)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is None:
            out[field.name] = list(value) if field.is_repeated else value
        elif entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].message_type is None:
                out[field.name] = dict(value)
            else:
                out[field.name] = {key: _fields(item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_fields(item) for item in value]
        else:
            out[field.name] = _fields(value)
    return out


def decode_commands(frame: bytes | str, max_commands: int) -> list[dict[str, Any]]:
    raw = frame.encode() if isinstance(frame, str) else frame
    commands: list[dict[str, Any]] = []
    position, end = 0, len(raw)
    while position < end:
        length, position = _read_varint(raw, position)
        if position + length > end:
            raise ProtocolError(BAD_REQUEST_DISCONNECT, "a command is cut short")
        try:
            command = pb.Command.FromString(raw[position : position + length])
        except DecodeError as exc:
            raise ProtocolError(BAD_REQUEST_DISCONNECT, f"malformed protobuf command: {exc}") from None
        position += length
        decoded = _fields(command)
        decoded.setdefault("id", 0)
        commands.append(decoded)
        if len(commands) > max_commands:
            raise ProtocolError(BAD_REQUEST_DISCONNECT, f"more than {max_commands} commands in one frame")
    return commands


def _info(info: ClientInfo) -> pb.ClientInfo:
    return pb.ClientInfo(user=info.user, client=info.client, conn_info=info.conn_info, chan_info=info.chan_info)


def publication(pub: Publication) -> pb.Publication:
    return pb.Publication(
        data=pub.data,
        offset=pub.offset,
        info=_info(pub.info) if pub.info is not None else None,
        tags=pub.tags or None,
    )


def _subscribe_result(result: Mapping[str, Any]) -> pb.SubscribeResult:
    fields = dict(result)
    publications = fields.pop("publications", ())
    return pb.SubscribeResult(publications=[publication(p) for p in publications], **fields)


def _connect_result(result: Mapping[str, Any]) -> pb.ConnectResult:
    fields = dict(result)
    subs = fields.pop("subs", {})
    return pb.ConnectResult(subs={channel: _subscribe_result(r) for channel, r in subs.items()}, **fields)


def _history_result(result: Mapping[str, Any]) -> pb.HistoryResult:
    fields = dict(result)
    publications = fields.pop("publications", ())
    return pb.HistoryResult(publications=[publication(p) for p in publications], **fields)


def _presence_result(result: Mapping[str, Any]) -> pb.PresenceResult:
    clients: Mapping[str, ClientInfo] = result.get("presence", {})
    return pb.PresenceResult(presence={client: _info(info) for client, info in clients.items()})


def _rpc_result(result: Mapping[str, Any]) -> pb.RPCResult:
    return pb.RPCResult(data=orjson.dumps(result.get("data")))


def _plain(message_type: Callable[..., ProtoMessage]) -> Callable[[Mapping[str, Any]], ProtoMessage]:
    def build(result: Mapping[str, Any]) -> ProtoMessage:
        return message_type(**result)

    return build


# Each method's result as its protobuf message (results: protocol/codec.py).
_RESULTS: dict[str, Callable[[Mapping[str, Any]], ProtoMessage]] = {
    "connect": _connect_result,
    "subscribe": _subscribe_result,
    "history": _history_result,
    "presence": _presence_result,
    "rpc": _rpc_result,
    "unsubscribe": _plain(pb.UnsubscribeResult),
    "publish": _plain(pb.PublishResult),
    "presence_stats": _plain(pb.PresenceStatsResult),
    "ping": _plain(pb.PingResult),
    "refresh": _plain(pb.RefreshResult),
    "sub_refresh": _plain(pb.SubRefreshResult),
}


def reply(command_id: int, method: str, result: Mapping[str, Any]) -> bytes:
    message = pb.Reply(id=command_id)
    # CopyFrom marks the field present even when the result is empty (a ping's, an unsubscribe's).
    getattr(message, method).CopyFrom(_RESULTS[method](result))
    return _delimited(message)


def error_reply(command_id: int, error: ErrorCode, temporary: bool = False) -> bytes:
    return _delimited(
        pb.Reply(id=command_id, error=pb.Error(code=error.code, message=error.message, temporary=temporary))
    )


# The hot path, encoded by hand: building protobuf objects costs several times more than these few
# concatenations, and a node encodes every publication it fans out. Each constant is a field's key:
# its number shifted left by three, or'ed with its wire type (0: varint, 2: length-delimited).
_REPLY_PUSH = b"\x22"  # Reply.push = 4
_PUSH_CHANNEL = b"\x12"  # Push.channel = 2
_PUSH_PUB = b"\x22"  # Push.pub = 4
_PUB_DATA = b"\x22"  # Publication.data = 4
_PUB_INFO = b"\x2a"  # Publication.info = 5
_PUB_OFFSET = b"\x30"  # Publication.offset = 6 (varint)
_PUB_TAGS = b"\x3a"  # Publication.tags = 7, entries of key = 1, value = 2
_PUB_DELTA = b"\x40\x01"  # Publication.delta = 8 (varint), true
_INFO_USER, _INFO_CLIENT, _INFO_CONN_INFO, _INFO_CHAN_INFO = b"\x0a", b"\x12", b"\x1a", b"\x22"  # ClientInfo 1-4
_MAP_KEY, _MAP_VALUE = b"\x0a", b"\x12"


def _length_delimited(key: bytes, value: bytes) -> bytes:
    return key + varint(len(value)) + value


def _info_bytes(info: ClientInfo) -> bytes:
    out = _length_delimited(_INFO_USER, info.user.encode()) if info.user else b""
    if info.client:
        out += _length_delimited(_INFO_CLIENT, info.client.encode())
    if info.conn_info:
        out += _length_delimited(_INFO_CONN_INFO, info.conn_info)
    if info.chan_info:
        out += _length_delimited(_INFO_CHAN_INFO, info.chan_info)
    return out


def _publication_bytes(pub: Publication) -> bytes:
    out = _length_delimited(_PUB_DATA, pub.data) if pub.data else b""
    if pub.info is not None:
        out += _length_delimited(_PUB_INFO, _info_bytes(pub.info))
    if pub.offset:
        out += _PUB_OFFSET + varint(pub.offset)
    for key, value in pub.tags.items():
        entry = _length_delimited(_MAP_KEY, key.encode()) + _length_delimited(_MAP_VALUE, value.encode())
        out += _length_delimited(_PUB_TAGS, entry)
    return out


def publication_push(channel: str, pub: Publication) -> bytes:
    push = _length_delimited(_PUSH_CHANNEL, channel.encode()) + _length_delimited(_PUSH_PUB, _publication_bytes(pub))
    body = _length_delimited(_REPLY_PUSH, push)
    return varint(len(body)) + body


def _identity_bytes(data: bytes) -> bytes:
    return data


def delta_publication_push(channel: str, pub: Publication, payload: bytes, is_delta: bool) -> bytes:
    """A publication of a delta subscription: the data as it is (is_delta false) or the delta, marked."""
    if not is_delta:
        return publication_push(channel, pub)
    fields = _publication_bytes(replace(pub, data=payload)) + _PUB_DELTA
    push = _length_delimited(_PUSH_CHANNEL, channel.encode()) + _length_delimited(_PUSH_PUB, fields)
    body = _length_delimited(_REPLY_PUSH, push)
    return varint(len(body)) + body


def join_push(channel: str, info: ClientInfo) -> bytes:
    return _delimited(pb.Reply(push=pb.Push(channel=channel, join=pb.Join(info=_info(info)))))


def leave_push(channel: str, info: ClientInfo) -> bytes:
    return _delimited(pb.Reply(push=pb.Push(channel=channel, leave=pb.Leave(info=_info(info)))))


def unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    return _delimited(pb.Reply(push=pb.Push(channel=channel, unsubscribe=pb.Unsubscribe(code=code, reason=reason))))


# What a subscribe push carries of a subscribe result (the rest is for replies only).
_SUBSCRIBE_PUSH_FIELDS = ("recoverable", "epoch", "offset", "positioned", "data")


def subscribe_push(channel: str, result: Mapping[str, Any]) -> bytes:
    subscribe = pb.Subscribe(**{k: result[k] for k in _SUBSCRIBE_PUSH_FIELDS if k in result})
    return _delimited(pb.Reply(push=pb.Push(channel=channel, subscribe=subscribe)))


def message_push(data: bytes) -> bytes:
    return _delimited(pb.Reply(push=pb.Push(message=pb.Message(data=data))))


# A server ping is an empty reply: its length, 0, and nothing else.
PING_FRAME = _delimited(pb.Reply())


def _rpc_data(data: Any) -> Any:
    return json_frames.json_value(data or b"")


# Binary messages, length-delimited frames simply concatenated.
PROTOBUF = Codec(
    name="protobuf",
    separator=b"",
    binary=True,
    ping_frame=PING_FRAME,
    decode_commands=decode_commands,
    payload=bytes,
    rpc_data=_rpc_data,
    reply=reply,
    error_reply=error_reply,
    publication_push=publication_push,
    join_push=join_push,
    leave_push=leave_push,
    unsubscribe_push=unsubscribe_push,
    subscribe_push=subscribe_push,
    message_push=message_push,
    delta_base=_identity_bytes,
    delta_publication_push=delta_publication_push,
)
