"""The Centrifugo client protocol v2, JSON flavour: newline-delimited commands in, replies out.

Publication payloads are kept as the JSON text the publisher sent and are embedded in outgoing
frames verbatim (orjson.Fragment), so a publication is parsed once on the way in and never
re-encoded per subscriber.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.protocol.codes import BAD_REQUEST_DISCONNECT, ErrorCode, ProtocolError

# A server ping is an empty reply; a client pong is an empty command.
PING_FRAME = b"{}"


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


def _info(info: ClientInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.conn_info:
        out["conn_info"] = orjson.Fragment(info.conn_info)
    if info.chan_info:
        out["chan_info"] = orjson.Fragment(info.chan_info)
    return out


def publication(pub: Publication) -> dict[str, Any]:
    out: dict[str, Any] = {"data": orjson.Fragment(pub.data or b"null")}
    if pub.offset:
        out["offset"] = pub.offset
    if pub.info is not None:
        out["info"] = _info(pub.info)
    if pub.tags:
        out["tags"] = dict(pub.tags)
    return out


def reply(command_id: int, method: str, result: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"id": command_id, method: result})


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
    return orjson.dumps({"push": {"channel": channel, "subscribe": result}})


def message_push(data: bytes) -> bytes:
    return orjson.dumps({"push": {"message": {"data": orjson.Fragment(data)}}})


def presence_result(clients: Mapping[str, ClientInfo]) -> dict[str, Any]:
    return {"presence": {client_id: _info(info) for client_id, info in clients.items()}}
