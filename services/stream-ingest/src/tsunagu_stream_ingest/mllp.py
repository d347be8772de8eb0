"""MLLP framing (`<VT> message <FS><CR>`) read with a size limit, and HL7 v2 acknowledgements.

python-hl7's `HL7StreamReader.readblock` drops an oversize block without a trace and cannot tell a
block missing its start byte from garbage, so the blocks are cut here; the connection itself
(`hl7.mllp.start_hl7_server`), the block writer, the parser and `Message.create_ack` are the library's.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import uuid
from dataclasses import dataclass

import hl7  # type: ignore[import-untyped]
from hl7.mllp.streams import CARRIAGE_RETURN, END_BLOCK, START_BLOCK  # type: ignore[import-untyped]

log = logging.getLogger("tsunagu.stream_ingest.hl7")

END = END_BLOCK + CARRIAGE_RETURN
# Bytes kept of an oversize or unframed block: enough to read its MSH segment and answer it.
HEAD_KEPT = 16384
READ_CHUNK = 65536
# Between blocks, senders often leave a CR or LF: not garbage.
_BETWEEN_BLOCKS = b"\r\n \t"


@dataclass(frozen=True, slots=True)
class Frame:
    """One block up to `<FS><CR>`: `data` is the message without the framing bytes (only its first
    HEAD_KEPT bytes when `oversize`), `size` its full length, `framed` False when it did not start
    with `<VT>` (then `data` is everything read, for a look at an MSH in it)."""

    data: bytes
    size: int
    framed: bool = True
    oversize: bool = False


class FrameReader:
    """Cuts a byte stream into MLLP blocks of at most `max_bytes` (the message, framing excluded).

    A `<VT>` inside a block starts the block again: the bytes before it were a block its sender gave up
    on (or noise before the start byte) and are dropped, counted in `dropped`, never handed on as part of
    the next message (`<VT>` cannot occur in HL7 text)."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int) -> None:
        self.reader = reader
        self.max_bytes = max_bytes
        self.dropped = 0
        self._buffer = bytearray()
        # buffer[:_scanned] holds no END and, after its first byte, no START_BLOCK.
        self._scanned = 0
        # Set while the rest of an oversize block is skipped: its kept head and its length so far.
        self._head: bytes | None = None
        self._skipped = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished block read so far (what the end of the stream would cut off)."""
        return len(self._buffer) + self._skipped

    async def read_frame(self) -> Frame | None:
        """The next block, or None at the end of the stream (a block cut off by the end is dropped)."""
        while True:
            frame = self._cut()
            if frame is not None:
                return frame
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                return None
            self._buffer += chunk

    def _cut(self) -> Frame | None:
        while True:
            if self._head is None:
                # Leading CR/LF between blocks is tolerated.
                stripped = len(self._buffer) - len(self._buffer.lstrip(_BETWEEN_BLOCKS))
                if stripped:
                    del self._buffer[:stripped]
                    self._scanned = max(0, self._scanned - stripped)
            end = self._buffer.find(END, max(0, self._scanned - 1))
            limit = end if end >= 0 else len(self._buffer)
            # While skipping, buffer[0] is the kept tail byte of the skipped part, which was scanned.
            first = 0 if self._head is not None else 1
            restart = self._buffer.rfind(START_BLOCK, max(first, self._scanned), limit)
            if restart < 0:
                break
            dropped = restart + self._skipped
            self.dropped += dropped
            log.warning("dropped %d bytes before an MLLP start byte (a block cut off by a new one)", dropped)
            del self._buffer[:restart]
            self._head, self._skipped, self._scanned = None, 0, 0
        if end < 0:
            self._scanned = len(self._buffer)
            # VT, the message so far and perhaps the FS of an END still to come: more is oversize.
            if self._head is None and len(self._buffer) > self.max_bytes + 2:
                self._head = bytes(self._buffer[:HEAD_KEPT])
            if self._head is not None and len(self._buffer) > 1:
                # Keep the last byte: it may be the FS of an END split across reads.
                self._skipped += len(self._buffer) - 1
                del self._buffer[:-1]
                self._scanned = 1
            return None
        block = bytes(self._buffer[:end])
        del self._buffer[: end + len(END)]
        self._scanned = 0
        if self._head is not None:
            head, size = self._head, self._skipped + len(block)
            self._head, self._skipped = None, 0
            framed = head.startswith(START_BLOCK)
            return Frame(head[1:] if framed else head, size - 1 if framed else size, framed=framed, oversize=True)
        if block.startswith(START_BLOCK):
            message = block[1:]
            if len(message) > self.max_bytes:
                return Frame(message[:HEAD_KEPT], len(message), oversize=True)
            return Frame(message, len(message))
        if len(block) > self.max_bytes:
            return Frame(block[:HEAD_KEPT], len(block), framed=False, oversize=True)
        return Frame(block, len(block), framed=False)


def encode_frame(data: bytes) -> bytes:
    return START_BLOCK + data + END


def new_control_id() -> str:
    return uuid.uuid4().hex[:20]


def _fallback_ack(code: str, control_id: str, sender: tuple[str, str], version: str) -> hl7.Message:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    application, facility = sender
    text = f"MSH|^~\\&|TSUNAGU|TSUNAGU|{application}|{facility}|{now}||ACK|{new_control_id()}|P|{version}\rMSA|{code}|"
    ack = hl7.parse(text)
    ack.segment("MSA").assign_field(ack.escape(printable(control_id)), 2)
    return ack


def build_ack(
    code: str,
    source: hl7.Message | None,
    *,
    reason: str = "",
    error_code: str = "",
    error_location: str = "",
    control_id: str = "",
    sender: tuple[str, str] = ("", ""),
) -> bytes:
    """The original-mode ACK (MSH + MSA, and ERR with the HL7 table 0357 code when `error_code`) for
    `source` (python-hl7's `create_ack`); without a usable source (no MSH, or an MSH too short for the
    library) a generic one carrying `control_id` in MSA-2.

    The reason goes to MSA-3 (read by v2.1-2.4 senders), ERR-3.2 and ERR-8; `error_location` (e.g.
    `PID^1^3`, components joined by `^`) to ERR-2."""
    ack: hl7.Message | None = None
    if source is not None:
        try:
            ack = source.create_ack(code, message_id=new_control_id())
        except (IndexError, KeyError, TypeError, AttributeError, ValueError):
            ack = None
    if ack is None:
        safe_sender = (_plain(sender[0]), _plain(sender[1]))
        ack = _fallback_ack(code, control_id, safe_sender, "2.5")
    field, component = ack.separators[1], ack.separators[3]
    text = ack.escape(printable(reason)[:MAX_REASON]) if reason else ""
    if text:
        ack.segment("MSA").assign_field(text, 3)
    segments = [str(segment) for segment in ack]
    if error_code:
        location = component.join(ack.escape(part) for part in error_location.split("^")) if error_location else ""
        err = ["ERR", "", location, component.join((error_code, text, "HL70357")), "E", "", "", "", text]
        segments.append(field.join(err))
    return ("\r".join(segments) + "\r").encode()


# Of a reason in an ACK: enough to say what is wrong, short enough for any sender's log.
MAX_REASON = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def printable(value: str) -> str:
    """Control characters (python-hl7's escape mangles them) become one space each run."""
    return _CONTROL.sub(" ", value).strip()


def _plain(value: str) -> str:
    return "".join(ch for ch in printable(value) if ch not in "|^~\\&")[:40]


def ack_code_of(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK's bytes (framed or not): for tests and tools."""
    text = ack.strip(START_BLOCK + END + b"\r\n").decode()
    message = hl7.parse(text)
    msa = message.segment("MSA")
    return str(msa(1)), str(msa(2))
