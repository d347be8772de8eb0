"""STOMP 1.2 (https://stomp.github.io/stomp-specification-1.2.html), sans I/O: WebSocket messages in,
frames and heart-beats out, frames back as bytes. Malformed input raises `StompError` with a message
fit for the ERROR frame; nothing else escapes.

A message may hold several frames and heart-beats (bare EOLs). Header values are escaped as 1.2
says (`\\\\`, `\\n`, `\\r`, `\\c`) except in CONNECT and CONNECTED frames; the first of repeated headers
wins. A body is read up to the NUL octet, or `content-length` octets when the header is there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson
from tsunagu_core.broker import Publication

TOPIC_PREFIX = "/topic/"
COMMANDS = frozenset(
    {"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT", "DISCONNECT"}
)
# What a server sends: parsed only when asked (tests, tools reading the gateway's frames).
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
MAX_HEADERS = 64
_UNESCAPE = {b"\\\\": b"\\", b"\\n": b"\n", b"\\r": b"\r", b"\\c": b":"}


class StompError(Exception):
    """The client sent something that is not STOMP 1.2; the message goes into the ERROR frame."""


@dataclass(slots=True)
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


HEARTBEAT = None  # what `parse` yields for a heart-beat (a bare EOL)


def _unescape(value: bytes) -> bytes:
    if b"\\" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i : i + 1] == b"\\":
            pair = value[i : i + 2]
            if pair not in _UNESCAPE:
                raise StompError(f"undefined escape sequence {pair!r} in a header")
            out += _UNESCAPE[pair]
            i += 2
        else:
            out.append(value[i])
            i += 1
    return bytes(out)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace(":", "\\c")


def parse(message: bytes | str, max_frames: int = 100, *, server_frames: bool = False) -> list[Frame | None]:
    """The frames (and heart-beats, as None) of one WebSocket message; a client's unless `server_frames`."""
    commands = SERVER_COMMANDS if server_frames else COMMANDS
    data = message.encode() if isinstance(message, str) else message
    out: list[Frame | None] = []
    pos = 0
    while pos < len(data):
        if data.startswith(b"\r\n", pos):
            out.append(HEARTBEAT)
            pos += 2
            continue
        if data[pos : pos + 1] == b"\n":
            out.append(HEARTBEAT)
            pos += 1
            continue
        frame, pos = _frame(data, pos, commands)
        out.append(frame)
        if sum(1 for f in out if f is not None) > max_frames:
            raise StompError(f"more than {max_frames} frames in one message")
    return out


def _line(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\n", pos)
    if end < 0:
        raise StompError("incomplete frame: a line has no end")
    line = data[pos:end]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, end + 1


def _frame(data: bytes, pos: int, commands: frozenset[str]) -> tuple[Frame, int]:
    raw_command, pos = _line(data, pos)
    try:
        command = raw_command.decode("ascii")
    except UnicodeDecodeError:
        raise StompError("the command is not ASCII") from None
    if command not in commands:
        raise StompError(f"unknown command {command[:32]!r}")
    raw_escapes = command not in ("CONNECT", "STOMP", "CONNECTED")
    headers: dict[str, str] = {}
    count = 0
    while True:
        line, pos = _line(data, pos)
        if not line:
            break
        count += 1
        if count > MAX_HEADERS:
            raise StompError(f"more than {MAX_HEADERS} headers")
        name, colon, value = line.partition(b":")
        if not colon or not name:
            raise StompError(f"malformed header line {line[:64]!r}")
        if raw_escapes:
            name, value = _unescape(name), _unescape(value)
        try:
            key, text = name.decode(), value.decode()
        except UnicodeDecodeError:
            raise StompError("a header is not UTF-8") from None
        headers.setdefault(key, text)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise StompError("content-length must be a non-negative integer")
        end = pos + int(length)
        if end >= len(data) or data[end] != 0:
            raise StompError("the body does not end with NUL after content-length octets")
    else:
        end = data.find(b"\0", pos)
        if end < 0:
            raise StompError("incomplete frame: no NUL octet ends it")
    return Frame(command, headers, data[pos:end]), end + 1


def encode(command: str, headers: Iterable[tuple[str, str]] | Mapping[str, str] = (), body: bytes = b"") -> bytes:
    items = headers.items() if isinstance(headers, Mapping) else headers
    raw = command == "CONNECTED"
    lines = [command]
    lines += [f"{k}:{v}" if raw else f"{escape(k)}:{escape(v)}" for k, v in items]
    if body:
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode() + body + b"\0"


def error(message: str, *, receipt_id: str = "", detail: str = "") -> bytes:
    headers = [("message", message.replace("\n", " ")[:200]), ("content-type", "text/plain")]
    if receipt_id:
        headers.append(("receipt-id", receipt_id))
    return encode("ERROR", headers, (detail or message).encode())


def receipt(receipt_id: str) -> bytes:
    return encode("RECEIPT", [("receipt-id", receipt_id)])


def channel_of(destination: str) -> str:
    if not destination.startswith(TOPIC_PREFIX) or len(destination) == len(TOPIC_PREFIX):
        raise StompError(f"destination must be {TOPIC_PREFIX}<channel>, not {destination[:64]!r}")
    return destination[len(TOPIC_PREFIX) :]


def destination_line(channel: str) -> bytes:
    return f"destination:{escape(TOPIC_PREFIX + channel)}".encode()


def content_type(data: bytes) -> str:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return "application/octet-stream"
    return "application/json"


def publication_message(channel: str, pub: Publication) -> bytes:
    """A MESSAGE frame for every STOMP subscriber of the channel, without its per-connection headers:
    `with_subscription` puts `subscription` and `message-id` in right after the command line."""
    head = [
        b"MESSAGE",
        destination_line(channel),
        f"content-type:{content_type(pub.data)}".encode(),
        f"content-length:{len(pub.data)}".encode(),
        f"offset:{pub.offset}".encode(),
    ]
    return b"\n".join(head) + b"\n\n" + pub.data + b"\0"


def destination_of(message: bytes) -> bytes:
    """The destination line of a frame made by `publication_message`."""
    start = len(b"MESSAGE\n")
    return message[start : message.index(b"\n", start)]


def with_subscription(message: bytes, subscription: str, message_id: str) -> bytes:
    start = len(b"MESSAGE\n")
    extra = f"subscription:{escape(subscription)}\nmessage-id:{escape(message_id)}\n".encode()
    return message[:start] + extra + message[start:]


def heart_beat(value: str) -> tuple[int, int]:
    """A `heart-beat` header: (cx, cy) in milliseconds."""
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise StompError("heart-beat must be two non-negative integers: cx,cy")
    return int(parts[0]), int(parts[1])


def negotiate(ours: int, theirs: int) -> int:
    """One direction of heart-beating: 0 (off) unless both sides want it, else the larger interval."""
    return 0 if ours == 0 or theirs == 0 else max(ours, theirs)
