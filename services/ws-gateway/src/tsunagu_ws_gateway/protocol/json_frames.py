"""The Centrifugo client protocol v2, JSON flavour: newline-delimited commands in, replies out.

Publication payloads are kept as the JSON text the publisher sent and are embedded in outgoing
frames verbatim (orjson.Fragment), so a publication is parsed once on the way in and never
re-encoded per subscriber. Bytes that are not JSON (published by a protobuf client) are sent as a
JSON string of their base64 instead (`json_data`). The functions here also serve the server API,
which speaks the same JSON; `JSON` is the codec (protocol/codec.py) built on them.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import orjson
from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import BAD_REQUEST_DISCONNECT, ErrorCode, ProtocolError

# A server ping is an empty reply; a client pong is an empty command.
PING_FRAME = b"{}"
_NULL = orjson.Fragment(b"null")


def decode_commands(frame: bytes | str, max_commands: int) -> list[dict[str, Any]]:
    """Split a frame into commands; anything that is not a list of JSON objects with ids is a protocol error."""
    raw = frame.encode() if isinstance(frame, str) else frame
    commands: list[dict[str, Any]] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            command = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(BAD_REQUEST_DISCONNECT, f"malformed JSON: {exc}") from None
        if not isinstance(command, dict):
            raise ProtocolError(BAD_REQUEST_DISCONNECT, "a command must be a JSON object")
        command_id = command.get("id", 0)
        if not isinstance(command_id, int) or isinstance(command_id, bool) or not 0 <= command_id < 2**32:
            raise ProtocolError(BAD_REQUEST_DISCONNECT, "command id must be an unsigned 32-bit integer")
        commands.append(command)
        if len(commands) > max_commands:
            raise ProtocolError(BAD_REQUEST_DISCONNECT, f"more than {max_commands} commands in one frame")
    return commands


def encode_data(value: Any) -> bytes:
    """A client's or backend's JSON payload as the bytes every subscriber will receive."""
    return orjson.dumps(value)


def json_data(data: bytes) -> orjson.Fragment | str:
    """Stored publication bytes as a JSON value: embedded as they are when they are JSON, otherwise a
    string of their base64. Every publication passes here once per node for the JSON subscribers, so
    the check is a parse with orjson (no conversion unless the text holds a line break, which the
    newline-delimited framing cannot carry)."""
    if not data:
        return _NULL
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return base64.b64encode(data).decode()
    if data.find(b"\n") >= 0:
        return orjson.Fragment(orjson.dumps(value))
    return orjson.Fragment(data)


def json_value(data: bytes) -> Any:
    """Stored publication bytes as a Python JSON value, by the rule of `json_data` (not JSON: a string of
    their base64): what GraphQL clients and RPC backends get."""
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return base64.b64encode(data).decode()


def _info(info: ClientInfo) -> dict[str, Any]:
    # conn_info and chan_info come from the `info` claims of tokens, which the token verifier stores
    # as orjson output: JSON without line breaks, embedded as they are.
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.conn_info:
        out["conn_info"] = orjson.Fragment(info.conn_info)
    if info.chan_info:
        out["chan_info"] = orjson.Fragment(info.chan_info)
    return out


def publication(pub: Publication) -> dict[str, Any]:
    out: dict[str, Any] = {"data": json_data(pub.data)}
    if pub.offset:
        out["offset"] = pub.offset
    if pub.info is not None:
        out["info"] = _info(pub.info)
    if pub.tags:
        out["tags"] = dict(pub.tags)
    return out


def delta_base(data: bytes) -> bytes:
    """A publication's data as a JSON client of a delta subscription holds it: the JSON text the payload is
    (`json_data`'s rule, here as text), which deltas apply to."""
    if not data:
        return b"null"
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return orjson.dumps(base64.b64encode(data).decode())
    return data


def delta_publication(pub: Publication, payload: bytes, is_delta: bool) -> dict[str, Any]:
    """A publication of a delta subscription: Centrifugo's JSON form carries the payload (the JSON text,
    or the delta) as a JSON string, `delta: true` marking a delta."""
    out: dict[str, Any] = {"data": payload.decode()}
    if is_delta:
        out["delta"] = True
    if pub.offset:
        out["offset"] = pub.offset
    if pub.info is not None:
        out["info"] = _info(pub.info)
    if pub.tags:
        out["tags"] = dict(pub.tags)
    return out


def delta_publication_push(channel: str, pub: Publication, payload: bytes, is_delta: bool) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "pub": delta_publication(pub, payload, is_delta)}})


def _default(value: Any) -> Any:
    """Renders the Publication and ClientInfo objects that results hold (see protocol/codec.py)."""
    if isinstance(value, Publication):
        return publication(value)
    if isinstance(value, ClientInfo):
        return _info(value)
    if isinstance(value, bytes):
        # A payload in a result (a backend's connect or subscribe data): JSON as it is, else base64.
        return json_data(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _omit_empty(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result's fields without the zero values (false, 0, "", empty lists and maps), as Centrifugo's JSON
    leaves them out (its protobuf messages are encoded with omitempty); SDKs read a missing field as zero."""
    return {key: value for key, value in result.items() if value or isinstance(value, orjson.Fragment)}


def connect_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """A connect result without zero values, in its server-side subscriptions' results too."""
    body = _omit_empty(result)
    if isinstance(body.get("subs"), Mapping):
        body["subs"] = {channel: _omit_empty(sub) for channel, sub in body["subs"].items()}
    return body


def reply(command_id: int, method: str, result: Mapping[str, Any]) -> bytes:
    if result.get("delta") and result.get("publications"):
        # The recovered publications of a delta subscription, in full and in its form.
        publications = [delta_publication(p, delta_base(p.data), False) for p in result["publications"]]
        result = {**result, "publications": publications}
    body = connect_result(result) if method == "connect" else _omit_empty(result)
    return orjson.dumps({"id": command_id, method: body}, default=_default, option=orjson.OPT_PASSTHROUGH_DATACLASS)


def error_reply(command_id: int, error: ErrorCode, temporary: bool = False) -> bytes:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if temporary:
        body["temporary"] = True
    return orjson.dumps({"id": command_id, "error": body})


def publication_push(channel: str, pub: Publication) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "pub": publication(pub)}})


def join_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "join": {"info": _info(info)}}})


def leave_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "leave": {"info": _info(info)}}})


def unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "unsubscribe": {"code": code, "reason": reason}}})


def subscribe_push(channel: str, result: Mapping[str, Any]) -> bytes:
    return orjson.dumps(
        {"push": {"channel": channel, "subscribe": _omit_empty(result)}},
        default=_default,
        option=orjson.OPT_PASSTHROUGH_DATACLASS,
    )


def message_push(data: bytes) -> bytes:
    return orjson.dumps({"push": {"message": {"data": json_data(data)}}})


def presence_result(clients: Mapping[str, ClientInfo]) -> dict[str, Any]:
    return {"presence": {client_id: _info(info) for client_id, info in clients.items()}}


def _identity(data: Any) -> Any:
    return data


# Text messages, frames separated by newlines.
JSON = Codec(
    name="json",
    separator=b"\n",
    binary=False,
    ping_frame=PING_FRAME,
    decode_commands=decode_commands,
    payload=encode_data,
    rpc_data=_identity,
    reply=reply,
    error_reply=error_reply,
    publication_push=publication_push,
    join_push=join_push,
    leave_push=leave_push,
    unsubscribe_push=unsubscribe_push,
    subscribe_push=subscribe_push,
    message_push=message_push,
    delta_base=delta_base,
    delta_publication_push=delta_publication_push,
)
