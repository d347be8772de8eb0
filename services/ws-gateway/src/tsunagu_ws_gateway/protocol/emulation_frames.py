"""The wire of Centrifugo's bidirectional emulation: the `POST /emulation` body (its `EmulationRequest`,
JSON or protobuf) and the disconnect push an emulated stream ends with.

JSON: `{"node": "...", "session": "...", "data": "<the commands, as the JSON protocol's text>"}` (the
commands are a JSON string inside the JSON body, as centrifuge-js sends them). Protobuf
(`Content-Type: application/octet-stream`): `EmulationRequest{node = 1, session = 2, data = 3}`, data
holding varint-delimited `Command`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.protocol.protobuf_frames import varint

# Reply.push = 4, Push.disconnect = 11, Disconnect.code = 1 (varint), Disconnect.reason = 2 (string).
_REPLY_PUSH, _PUSH_DISCONNECT, _CODE, _REASON = b"\x22", b"\x5a", b"\x08", b"\x12"


class BadEmulation(ValueError):
    """An emulation request that cannot be read; the text says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class EmulationRequest:
    node: str
    session: str
    data: bytes
    binary: bool  # protobuf commands (else the JSON protocol's text)


def _delimited(key: bytes, value: bytes) -> bytes:
    return key + varint(len(value)) + value


def disconnect_reply(disconnect: Disconnect, *, binary: bool) -> bytes:
    """`{"push": {"disconnect": {"code", "reason"}}}`, the native protocol's disconnect push (Centrifugo
    sends it on emulated transports before it ends the response)."""
    if not binary:
        return orjson.dumps({"push": {"disconnect": {"code": disconnect.code, "reason": disconnect.reason}}})
    body = _CODE + varint(disconnect.code) + _delimited(_REASON, disconnect.reason.encode())
    reply = _delimited(_REPLY_PUSH, _delimited(_PUSH_DISCONNECT, body))
    return varint(len(reply)) + reply


def parse_request(body: bytes, *, binary: bool) -> EmulationRequest:
    request = _parse_protobuf(body) if binary else _parse_json(body)
    if not request.node:
        raise BadEmulation("the emulation request names no node")
    if not request.session:
        raise BadEmulation("the emulation request names no session")
    if not request.data:
        raise BadEmulation("the emulation request carries no commands")
    return request


def _parse_json(body: bytes) -> EmulationRequest:
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadEmulation(f"the emulation request is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise BadEmulation("the emulation request must be a JSON object")
    node, session, data = fields.get("node", ""), fields.get("session", ""), fields.get("data", "")
    if not isinstance(node, str) or not isinstance(session, str):
        raise BadEmulation("node and session must be strings")
    if not isinstance(data, str):
        raise BadEmulation("data must be a string holding the JSON protocol's commands")
    return EmulationRequest(node, session, data.encode(), binary=False)


def _read_varint(raw: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(raw) and shift < 64:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise BadEmulation("the emulation request is not a protobuf EmulationRequest")


def _parse_protobuf(body: bytes) -> EmulationRequest:
    fields: dict[int, bytes] = {}
    position = 0
    while position < len(body):
        key, position = _read_varint(body, position)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, position = _read_varint(body, position)
        elif kind == 1 or kind == 5:
            position += 8 if kind == 1 else 4
        elif kind == 2:
            length, position = _read_varint(body, position)
            if position + length > len(body):
                raise BadEmulation("the emulation request is cut short")
            fields[number] = body[position : position + length]
            position += length
        else:
            raise BadEmulation("the emulation request is not a protobuf EmulationRequest")
    if position != len(body):
        raise BadEmulation("the emulation request is cut short")
    try:
        node, session = fields.get(1, b"").decode(), fields.get(2, b"").decode()
    except UnicodeDecodeError:
        raise BadEmulation("node and session must be UTF-8 text") from None
    return EmulationRequest(node, session, fields.get(3, b""), binary=True)
