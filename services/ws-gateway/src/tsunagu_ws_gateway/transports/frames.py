"""WebSocket messages as bytes on the wire, prepared once for every socket that shares their framing.

A server's frames are not masked (RFC 6455 5.1), so without compression a message's bytes are the same
for every client; with permessage-deflate and no context takeover on our side (the only way the
gateway negotiates it, see server.py) each message is compressed on its own, so its bytes are the same
for every client that negotiated the same window size. A `Framing` is one such setting (text or binary,
plain or deflated with N window bits), shared by all its sockets: the hub hands every subscriber the
same payload object, and the framing frames it once and returns the same bytes to the rest (a cache of
one, keyed by the payload's identity, which holding the payload keeps unique). Compressed frames are
websockets' own (`Frame.serialize` with its `PerMessageDeflate`), once per message and framing. An
uncompressed frame is the payload behind a 2-10 byte header (RFC 6455 5.2), written here: it is also
built once per socket for a batch of joined publications, and `Frame.serialize` costs ~5x as much.
"""

from __future__ import annotations

import struct

from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Close, Frame, Opcode

# zlib settings of our compressed frames (uvicorn's: a 5 memLevel keeps a compressor small).
COMPRESS_SETTINGS = {"memLevel": 5}


class Framing:
    """Frames payloads as one kind of message (opcode, compression) for the sockets that share it."""

    __slots__ = ("_first_byte", "_framed", "_payload", "extensions", "opcode")

    def __init__(self, opcode: Opcode, extensions: list[Extension]) -> None:
        self.opcode = opcode
        self.extensions = extensions
        self._first_byte = 0x80 | opcode.value  # FIN, no RSV bits, the opcode
        self._payload: bytes | None = None
        self._framed = b""

    def frame(self, payload: bytes) -> bytes:
        """`payload` as one message; the same bytes again while the same payload object comes."""
        if payload is self._payload:
            return self._framed
        framed = self.frame_once(payload)
        self._payload, self._framed = payload, framed
        return framed

    def frame_once(self, payload: bytes) -> bytes:
        """`payload` as one message, not kept (a batch of one socket's frames)."""
        if self.extensions:
            return Frame(self.opcode, payload).serialize(mask=False, extensions=self.extensions)
        length = len(payload)
        if length < 126:
            return bytes((self._first_byte, length)) + payload
        if length < 65536:
            return struct.pack("!BBH", self._first_byte, 126, length) + payload
        return struct.pack("!BBQ", self._first_byte, 127, length) + payload

    @property
    def compressed(self) -> bool:
        return bool(self.extensions)


_FRAMINGS: dict[tuple[Opcode, int], Framing] = {}


def framing_for(binary: bool, extensions: list[Extension]) -> Framing:
    """The shared framing of a socket's messages, given the extensions its handshake negotiated."""
    opcode = Opcode.BINARY if binary else Opcode.TEXT
    window_bits = 0
    for extension in extensions:
        if isinstance(extension, PerMessageDeflate):
            # Negotiated by server.py: always without context takeover on our side.
            assert extension.local_no_context_takeover
            window_bits = extension.local_max_window_bits
    key = (opcode, window_bits)
    framing = _FRAMINGS.get(key)
    if framing is None:
        encoders: list[Extension] = []
        if window_bits:
            # Only the local (compressing) half is used; the remote settings are the decoder's business.
            encoders = [PerMessageDeflate(True, True, 15, window_bits, dict(COMPRESS_SETTINGS))]
        framing = _FRAMINGS[key] = Framing(opcode, encoders)
    return framing


def close_frame(code: int, reason: str) -> bytes:
    return Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=False)
