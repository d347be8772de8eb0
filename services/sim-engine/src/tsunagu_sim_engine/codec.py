"""Quantized entity state and the two encodings of keyframes and deltas.

Quantization: positions in 1/100 units (int32 on the wire: ±21,474,836 units), headings in
1/100 degree in [0, 36000) (uint16). Two entities states are "the same" when their quantized
forms are, so sub-centimetre jitter sends nothing.

JSON (default), one object per publication:
    {"type": "keyframe" | "delta", "room": R, "tick": n, "time": unix_ms, "q": 0.01,
     "e": {"<id>": [x, y, z, r] | [x, y, z, r, {extra}]}, "gone": ["<id>", ...]}
`x, y, z` are quantized integers (multiply by `q`), `r` is hundredths of a degree. A keyframe holds
every entity (of the room, or of the cell); a delta holds those whose quantized state changed since
the previous tick and, in `gone`, those removed (or, on a cell channel, those that left the cell).

Binary (room param `encoding: "binary"`), little-endian; JSON gateway clients get it base64-encoded:
    header  "<2sBBIQHH": magic b"TS", version 1, type (1 keyframe, 2 delta), tick u32, time_ms u64,
            entity count u16, gone count u16                                       (20 bytes)
    entity  id_len u8, id (UTF-8), then "<iiiHH": x, y, z i32, r u16, extra_len u16, extra (JSON)
    gone    id_len u8, id (UTF-8)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tsunagu_sim_engine.kinds import Entity

QUANTUM = 0.01
_POSITION = 1 / QUANTUM
_INT32 = 2**31 - 1

QEntity = tuple[int, int, int, int, str]
"""x, y, z (1/100 units), r (1/100 degree), extra as compact JSON ('' when none)."""

Encoding = Literal["json", "binary"]

HEADER = struct.Struct("<2sBBIQHH")
BODY = struct.Struct("<iiiHH")
MAGIC = b"TS"
VERSION = 1
TYPES = {"keyframe": 1, "delta": 2}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
_JSON_NAMES: dict[str, str] = {}  # entity names as JSON strings, cached: the same names are encoded every tick


def _clamp(value: float) -> int:
    return max(-_INT32, min(_INT32, round(value * _POSITION)))


def quantize(entity: Entity) -> QEntity:
    x, y, z = round(entity.x * _POSITION), round(entity.y * _POSITION), round(entity.z * _POSITION)
    if not (-_INT32 <= x <= _INT32 and -_INT32 <= y <= _INT32 and -_INT32 <= z <= _INT32):
        x, y, z = _clamp(entity.x), _clamp(entity.y), _clamp(entity.z)
    heading = round((entity.r % 360.0) * 100) % 36000
    extra = json.dumps(entity.extra, separators=(",", ":"), sort_keys=True) if entity.extra else ""
    return (x, y, z, heading, extra)


def dequantize(q: QEntity) -> Entity:
    return Entity(q[0] * QUANTUM, q[1] * QUANTUM, q[2] * QUANTUM, q[3] / 100, json.loads(q[4]) if q[4] else {})


def encode(
    encoding: Encoding,
    frame_type: str,
    room: str,
    tick: int,
    time_ms: int,
    entities: Mapping[str, QEntity],
    gone: Sequence[str] = (),
) -> bytes:
    if encoding == "binary":
        return encode_binary(frame_type, tick, time_ms, entities, gone)
    return encode_json(frame_type, room, tick, time_ms, entities, gone)


def encode_json(
    frame_type: str, room: str, tick: int, time_ms: int, entities: Mapping[str, QEntity], gone: Sequence[str] = ()
) -> bytes:
    parts = []
    names = _JSON_NAMES
    for name, q in entities.items():
        quoted = names.get(name)
        if quoted is None:
            if len(names) > 100_000:
                names.clear()
            quoted = names[name] = json.dumps(name)
        tail = "," + q[4] if q[4] else ""
        parts.append(f"{quoted}:[{q[0]},{q[1]},{q[2]},{q[3]}{tail}]")
    head = f'{{"type":"{frame_type}","room":{json.dumps(room)},"tick":{tick},"time":{time_ms},"q":{QUANTUM}'
    body = f',"e":{{{",".join(parts)}}}'
    tail = f',"gone":{json.dumps(list(gone), separators=(",", ":"))}}}' if gone else "}"
    return (head + body + tail).encode()


def encode_binary(
    frame_type: str, tick: int, time_ms: int, entities: Mapping[str, QEntity], gone: Sequence[str] = ()
) -> bytes:
    header = HEADER.pack(MAGIC, VERSION, TYPES[frame_type], tick & 0xFFFFFFFF, time_ms, len(entities), len(gone))
    out = bytearray(header)
    for name, q in entities.items():
        raw = name.encode()[:255]
        extra = q[4].encode()
        out.append(len(raw))
        out += raw
        out += BODY.pack(q[0], q[1], q[2], q[3], len(extra))
        out += extra
    for name in gone:
        raw = name.encode()[:255]
        out.append(len(raw))
        out += raw
    return bytes(out)


def decode(data: bytes) -> dict[str, Any]:
    """Either encoding back to the JSON shape (with `e` values as lists), for clients and tests."""
    if data[:2] != MAGIC:
        decoded: dict[str, Any] = json.loads(data)
        return decoded
    _, version, kind, tick, time_ms, count, gone_count = HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise ValueError(f"unknown binary frame version {version}")
    at = HEADER.size
    entities: dict[str, list[Any]] = {}
    for _ in range(count):
        size = data[at]
        name = data[at + 1 : at + 1 + size].decode()
        at += 1 + size
        x, y, z, r, extra_len = BODY.unpack_from(data, at)
        at += BODY.size
        value: list[Any] = [x, y, z, r]
        if extra_len:
            value.append(json.loads(data[at : at + extra_len]))
        at += extra_len
        entities[name] = value
    gone = []
    for _ in range(gone_count):
        size = data[at]
        gone.append(data[at + 1 : at + 1 + size].decode())
        at += 1 + size
    frame: dict[str, Any] = {"type": TYPE_NAMES[kind], "tick": tick, "time": time_ms, "q": QUANTUM, "e": entities}
    if gone:
        frame["gone"] = gone
    return frame
