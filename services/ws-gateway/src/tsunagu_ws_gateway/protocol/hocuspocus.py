"""Hocuspocus v2 framing (@hocuspocus/provider, @hocuspocus/server), sans I/O: bytes in, messages out.

Hocuspocus multiplexes documents over one WebSocket by putting the document's name in front of every
message; the rest is y-protocols with a few more message types (lib0 encoding as in yprotocol.py):

    var-string document name, var-uint type, then by type:
    0 sync             y-protocols sync: subtype (SyncStep1 | SyncStep2 | Update), var-bytes payload
    1 awareness        var-bytes awareness update
    2 auth             client: 0 (token), var-string token
                       server: 1 (permission denied), var-string reason | 2 (authenticated), var-string scope
    3 query awareness
    4 sync reply       as sync (the server does not answer a SyncStep1 with its own SyncStep1)
    5 stateless        var-string payload
    6 broadcast stateless  var-string payload
    7 close            the client is done with the document
    8 sync status      var-uint 1 (update stored) | 0 (not stored: read-only, over a limit)

Types 0, 1 and 3 are byte for byte y-websocket messages after the name, so what the document fan-out
sends y-websocket clients goes to Hocuspocus ones with the name in front.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsunagu_ws_gateway.protocol import yprotocol as yp

MESSAGE_SYNC = 0
MESSAGE_AWARENESS = 1
MESSAGE_AUTH = 2
MESSAGE_QUERY_AWARENESS = 3
MESSAGE_SYNC_REPLY = 4
MESSAGE_STATELESS = 5
MESSAGE_BROADCAST_STATELESS = 6
MESSAGE_CLOSE = 7
MESSAGE_SYNC_STATUS = 8

AUTH_TOKEN = 0
AUTH_PERMISSION_DENIED = 1
AUTH_AUTHENTICATED = 2

SCOPE_READ_WRITE = "read-write"
SCOPE_READ_ONLY = "readonly"


class HocuspocusError(yp.YProtocolError):
    """A malformed frame; `document` is its document's name when that much could be read."""

    def __init__(self, message: str, document: str | None = None, code: int = yp.CLOSE_BAD_MESSAGE) -> None:
        super().__init__(f"document {document!r}: {message}" if document is not None else message, code)
        self.document = document


# client -> server


@dataclass(frozen=True, slots=True)
class DocumentMessage:
    """A y-protocols message (sync, awareness, query awareness) for one document."""

    document: str
    message: yp.Message
    reply: bool = False  # sent as "sync reply" (4)


@dataclass(frozen=True, slots=True)
class AuthMessage:
    document: str
    token: str


@dataclass(frozen=True, slots=True)
class StatelessMessage:
    document: str
    payload: str
    broadcast: bool = False


@dataclass(frozen=True, slots=True)
class CloseMessage:
    document: str


@dataclass(frozen=True, slots=True)
class SyncStatusMessage:
    document: str
    stored: bool


Message = DocumentMessage | AuthMessage | StatelessMessage | CloseMessage | SyncStatusMessage


def decode(frame: bytes) -> Message:
    """One WebSocket message to one Hocuspocus message; HocuspocusError when it is malformed."""
    if not frame:
        raise HocuspocusError("empty message")
    reader = yp.Reader(frame)
    try:
        document = reader.var_string()
    except yp.YProtocolError as exc:
        raise HocuspocusError(f"no document name: {exc}") from None
    try:
        return _decode_body(document, frame, reader)
    except HocuspocusError:
        raise
    except yp.YProtocolError as exc:
        raise HocuspocusError(str(exc), document, exc.code) from None


def _decode_body(document: str, frame: bytes, reader: yp.Reader) -> Message:
    start = reader.pos
    kind = reader.var_uint()
    message: Message
    if kind in (MESSAGE_SYNC, MESSAGE_AWARENESS, MESSAGE_QUERY_AWARENESS):
        return DocumentMessage(document, yp.decode_message(frame[start:]))
    if kind == MESSAGE_SYNC_REPLY:
        # The same sync message under another type: re-read it as a plain sync message.
        return DocumentMessage(document, yp.decode_message(yp.write_var_uint(MESSAGE_SYNC) + frame[reader.pos :]), True)
    if kind == MESSAGE_AUTH:
        subtype = reader.var_uint()
        if subtype != AUTH_TOKEN:
            raise HocuspocusError(f"a client sends auth messages of type {AUTH_TOKEN} (token), not {subtype}", document)
        message = AuthMessage(document, reader.var_string())
    elif kind in (MESSAGE_STATELESS, MESSAGE_BROADCAST_STATELESS):
        message = StatelessMessage(document, reader.var_string(), kind == MESSAGE_BROADCAST_STATELESS)
    elif kind == MESSAGE_CLOSE:
        message = CloseMessage(document)
    elif kind == MESSAGE_SYNC_STATUS:
        message = SyncStatusMessage(document, reader.var_uint() == 1)
    else:
        raise HocuspocusError(f"unknown message type {kind}", document)
    if not reader.done():
        raise HocuspocusError(f"{len(frame) - reader.pos} trailing bytes after the message", document)
    return message


# server -> client


def prefix(document: str) -> bytes:
    """What goes in front of a y-websocket message to make it this document's Hocuspocus message."""
    return yp.write_var_string(document)


def authenticated(document: str, read_only: bool) -> bytes:
    scope = SCOPE_READ_ONLY if read_only else SCOPE_READ_WRITE
    return prefix(document) + bytes((MESSAGE_AUTH, AUTH_AUTHENTICATED)) + yp.write_var_string(scope)


def permission_denied(document: str, reason: str) -> bytes:
    return prefix(document) + bytes((MESSAGE_AUTH, AUTH_PERMISSION_DENIED)) + yp.write_var_string(reason)


def sync_status(document: str, stored: bool) -> bytes:
    return prefix(document) + bytes((MESSAGE_SYNC_STATUS, 1 if stored else 0))


def auth_token(document: str, token: str) -> bytes:
    """What a provider sends (for tests and tools)."""
    return prefix(document) + bytes((MESSAGE_AUTH, AUTH_TOKEN)) + yp.write_var_string(token)
