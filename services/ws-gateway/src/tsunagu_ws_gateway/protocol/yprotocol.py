"""y-protocols (the y-websocket wire format), sans I/O: bytes in, messages out, and back.

One WebSocket binary message carries one y-protocols message, each field var-uint framed
(lib0 encoding: 7 bits a byte, least significant group first, high bit = more follows):

    sync:            0, subtype (0 SyncStep1 | 1 SyncStep2 | 2 Update), var-bytes payload
    awareness:       1, var-bytes awareness update
    auth:            2, 0 (permission denied), var-string reason
    query awareness: 3

An awareness update is var-uint count, then per client: var-uint client id, var-uint clock,
var-string JSON state ("null" = the client left).
"""

from __future__ import annotations

from dataclasses import dataclass

MESSAGE_SYNC = 0
MESSAGE_AWARENESS = 1
MESSAGE_AUTH = 2
MESSAGE_QUERY_AWARENESS = 3

SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2

AUTH_PERMISSION_DENIED = 0

# Close codes of the /collab endpoint (4xxx: application codes; stock clients reconnect after any close).
CLOSE_BAD_MESSAGE = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_LARGE = 4413
CLOSE_TOO_MANY = 4429
CLOSE_UNAVAILABLE = 4503

MAX_VAR_UINT_BYTES = 8  # lib0 numbers are at most 53 bits


class YProtocolError(ValueError):
    """A malformed frame: the connection is closed with `code` and the message as reason."""

    def __init__(self, message: str, code: int = CLOSE_BAD_MESSAGE) -> None:
        super().__init__(message)
        self.code = code


# encoding


def write_var_uint(value: int) -> bytes:
    if value < 0:
        raise ValueError("var-uint must not be negative")
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def write_var_bytes(data: bytes) -> bytes:
    return write_var_uint(len(data)) + data


def write_var_string(text: str) -> bytes:
    return write_var_bytes(text.encode())


def sync_step1(state_vector: bytes) -> bytes:
    return bytes((MESSAGE_SYNC, SYNC_STEP1)) + write_var_bytes(state_vector)


def sync_step2(update: bytes) -> bytes:
    return bytes((MESSAGE_SYNC, SYNC_STEP2)) + write_var_bytes(update)


def sync_update(update: bytes) -> bytes:
    return bytes((MESSAGE_SYNC, SYNC_UPDATE)) + write_var_bytes(update)


def awareness_message(update: bytes) -> bytes:
    return bytes((MESSAGE_AWARENESS,)) + write_var_bytes(update)


def query_awareness() -> bytes:
    return bytes((MESSAGE_QUERY_AWARENESS,))


def permission_denied(reason: str) -> bytes:
    return bytes((MESSAGE_AUTH, AUTH_PERMISSION_DENIED)) + write_var_string(reason)


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client: int
    clock: int
    state: str  # JSON text; "null" when the client is gone


def encode_awareness(entries: list[AwarenessEntry]) -> bytes:
    out = bytearray(write_var_uint(len(entries)))
    for entry in entries:
        out += write_var_uint(entry.client)
        out += write_var_uint(entry.clock)
        out += write_var_string(entry.state)
    return bytes(out)


# decoding


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def var_uint(self) -> int:
        value = 0
        shift = 0
        for _ in range(MAX_VAR_UINT_BYTES):
            if self.pos >= len(self.data):
                raise YProtocolError("truncated var-uint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise YProtocolError("var-uint longer than 53 bits")

    def var_bytes(self) -> bytes:
        length = self.var_uint()
        end = self.pos + length
        if end > len(self.data):
            raise YProtocolError(f"truncated payload: {length} bytes announced, {len(self.data) - self.pos} present")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def var_string(self) -> str:
        try:
            return self.var_bytes().decode()
        except UnicodeDecodeError:
            raise YProtocolError("string is not UTF-8") from None

    def done(self) -> bool:
        return self.pos >= len(self.data)


@dataclass(frozen=True, slots=True)
class SyncMessage:
    step: int  # SYNC_STEP1 | SYNC_STEP2 | SYNC_UPDATE
    payload: bytes


@dataclass(frozen=True, slots=True)
class AwarenessMessage:
    update: bytes
    entries: tuple[AwarenessEntry, ...]


@dataclass(frozen=True, slots=True)
class QueryAwarenessMessage:
    pass


@dataclass(frozen=True, slots=True)
class AuthMessage:
    reason: str


Message = SyncMessage | AwarenessMessage | QueryAwarenessMessage | AuthMessage


def decode_awareness(update: bytes) -> tuple[AwarenessEntry, ...]:
    reader = Reader(update)
    count = reader.var_uint()
    if count > len(update):
        raise YProtocolError(f"awareness update announces {count} clients in {len(update)} bytes")
    entries = [AwarenessEntry(reader.var_uint(), reader.var_uint(), reader.var_string()) for _ in range(count)]
    return tuple(entries)


def decode_message(frame: bytes) -> Message:
    """One WebSocket message to one y-protocols message; YProtocolError when it is malformed."""
    if not frame:
        raise YProtocolError("empty message")
    reader = Reader(frame)
    kind = reader.var_uint()
    message: Message
    if kind == MESSAGE_SYNC:
        step = reader.var_uint()
        if step not in (SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE):
            raise YProtocolError(f"unknown sync message type {step}")
        message = SyncMessage(step, reader.var_bytes())
    elif kind == MESSAGE_AWARENESS:
        update = reader.var_bytes()
        message = AwarenessMessage(update, decode_awareness(update))
    elif kind == MESSAGE_QUERY_AWARENESS:
        message = QueryAwarenessMessage()
    elif kind == MESSAGE_AUTH:
        if reader.var_uint() != AUTH_PERMISSION_DENIED:
            raise YProtocolError("unknown auth message type")
        message = AuthMessage(reader.var_string())
    else:
        raise YProtocolError(f"unknown message type {kind}")
    if not reader.done():
        raise YProtocolError(f"{len(frame) - reader.pos} trailing bytes after the message")
    return message
