"""Centrifugo's unidirectional client protocol, JSON: a connect request in, pushes out.

A unidirectional client sends one thing, its connect request (`{"token": ..., "subs": {channel:
{"recover": true, "offset": N, "epoch": "..."}}}`, no command id), and from then on only reads. What it
reads are Push objects without the bidirectional protocol's `{"push": ...}` envelope: `{"connect":
{...}}` first (the connect result, with its server-side subscriptions and what they recovered), then
`{"channel": ..., "pub": {...}}`, `join`, `leave`, `unsubscribe`, `subscribe`, `{"message": ...}`, an
empty `{}` as the ping, and `{"disconnect": {"code": ..., "reason": ...}}` before the server ends the
stream. uni_websocket, uni_http_stream and uni_sse carry the same objects (docs/protocol.md).

`UNI_JSON` is a `Codec` (codec.py) whose `reply` renders the connect result as that first push, so the
session's connect is the native one. The hub renders each publication once for every unidirectional
subscriber of the node; the frame is a `Positioned` (bytes that also say channel and offset) so the SSE
transport can keep the stream position it writes as each event's id without parsing JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import Disconnect, ErrorCode, ProtocolError

PING_PUSH = b"{}"


class Positioned(bytes):
    """A publication push, with the channel and offset it carries (an attribute per frame, set once per
    node: every subscriber gets the same object)."""

    channel: str
    offset: int


def publication_push(channel: str, pub: Publication) -> bytes:
    frame = Positioned(orjson.dumps({"channel": channel, "pub": json_frames.publication(pub)}))
    frame.channel = channel
    frame.offset = pub.offset
    return frame


def join_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"channel": channel, "join": {"info": json_frames._info(info)}})


def leave_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"channel": channel, "leave": {"info": json_frames._info(info)}})


def unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    return orjson.dumps({"channel": channel, "unsubscribe": {"code": code, "reason": reason}})


def subscribe_push(channel: str, result: Mapping[str, Any]) -> bytes:
    return orjson.dumps(
        {"channel": channel, "subscribe": json_frames._omit_empty(result)},
        default=json_frames._default,
        option=orjson.OPT_PASSTHROUGH_DATACLASS,
    )


def message_push(data: bytes) -> bytes:
    return orjson.dumps({"message": {"data": json_frames.json_data(data)}})


def reply(command_id: int, method: str, result: Mapping[str, Any]) -> bytes:
    """The one reply a unidirectional client gets: its connect result, as the `connect` push (zero values
    left out in the subscriptions' results too, as Centrifugo's; tests/conformance compares them)."""
    body = json_frames.connect_result(result) if method == "connect" else json_frames._omit_empty(result)
    return orjson.dumps({method: body}, default=json_frames._default, option=orjson.OPT_PASSTHROUGH_DATACLASS)


def disconnect_push(disconnect: Disconnect) -> bytes:
    return orjson.dumps({"disconnect": {"code": disconnect.code, "reason": disconnect.reason}})


# An error the connect got (a unidirectional client has no error replies) closes the connection with
# this disconnect, as Centrifugo's default mapping; any other error is 3004.
ERROR_DISCONNECTS = {
    codes.EXPIRED.code: codes.CONNECTION_EXPIRED,
    codes.TOKEN_EXPIRED.code: codes.CONNECTION_EXPIRED,
    codes.TOO_MANY_REQUESTS.code: codes.TOO_MANY_REQUESTS_DISCONNECT,
    codes.PERMISSION_DENIED.code: codes.PERMISSION_DENIED_DISCONNECT,
}


def disconnect_for(error: ErrorCode) -> Disconnect:
    return ERROR_DISCONNECTS.get(error.code, codes.SERVER_ERROR)


def _error_reply(command_id: int, error: ErrorCode, temporary: bool = False) -> bytes:
    return disconnect_push(disconnect_for(error))


def _no_commands(frame: bytes | str, max_commands: int) -> list[dict[str, Any]]:
    raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "a unidirectional connection sends no commands")


def connect_request(raw: bytes | str) -> dict[str, Any]:
    """A connect request as a client sent it (JSON; `null` or nothing is an empty one, as Centrifugo
    takes it); ProtocolError(3501) for anything that is not a JSON object."""
    if not raw or raw == b"null" or raw == "null":
        return {}
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"the connect request is not JSON: {exc}") from None
    if request is None:
        return {}
    if not isinstance(request, dict):
        raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "the connect request must be a JSON object")
    return request


def delta_publication_push(channel: str, pub: Publication, payload: bytes, is_delta: bool) -> bytes:
    # (uni clients subscribe server-side, without asking for deltas; the shape is there for the Codec)
    return orjson.dumps({"channel": channel, "pub": json_frames.delta_publication(pub, payload, is_delta)})


UNI_JSON = Codec(
    name="json",  # (what the hooks' backends are told, as Centrifugo tells them of uni clients)
    separator=b"\n",
    binary=False,
    ping_frame=PING_PUSH,
    decode_commands=_no_commands,
    payload=json_frames.encode_data,
    rpc_data=lambda data: data,
    reply=reply,
    error_reply=_error_reply,
    publication_push=publication_push,
    join_push=join_push,
    leave_push=leave_push,
    unsubscribe_push=unsubscribe_push,
    subscribe_push=subscribe_push,
    message_push=message_push,
    delta_base=json_frames.delta_base,
    delta_publication_push=delta_publication_push,
)
