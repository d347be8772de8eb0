"""HL7 v2 over MLLP: each message is checked, published to `hl7:` channels by type and patient or
location, recorded in the audit log with its original text, and answered with an ACK.

Per message, in order: parse and check (a malformed one gets AR with the reason, and an audit record
with outcome `rejected`); publish to its channels with the sender, control id and a digest of the
content as idempotency key (a resend is applied once); publish the AuditEvent `hl7.received` on the
bus and await Kafka's acceptance; only then AA. A failed publication or audit record gets AE (also
for a message that would be rejected: the audit log must hold every message received), and the
sender retries. A connection carries one message at a time (original mode); a bad message never ends
it. Bytes that are no MLLP block and contain no MSH to answer end that one connection, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hl7  # type: ignore[import-untyped]
import orjson
from hl7.mllp import start_hl7_server  # type: ignore[import-untyped]
from prometheus_client import Counter, Gauge, Histogram
from tsunagu_core import topics
from tsunagu_core.broker import Broker, PublishOptions
from tsunagu_core.bus import Bus
from tsunagu_core.envelope import publish_event
from tsunagu_core.proxies import Network, address_in, parse_networks
from tsunagu_core.tls import peer_certificate
from tsunagu_core.wire.events_pb2 import AuditEvent

from tsunagu_stream_ingest.mllp import Frame, FrameReader, build_ack

log = logging.getLogger("tsunagu.stream_ingest.hl7")

NAMESPACE = "hl7"
SUPPORTED_TYPES = ("ADT", "ORU")
# Patient and location ids in channel names: other characters become `_`.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Trigger events (HL7 table 0003) are three letters or digits; others are not metric labels.
_TRIGGER = re.compile(r"[A-Z0-9]{3}")
# An MSH at the start of the text or of a segment (not "MSH" inside a field).
_MSH = re.compile(r"(?:^|[\r\n\x0b])MSH")
LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"], "TSUNAGU_INGEST_MLLP_SENDERS")
MAX_ID = 64
MAX_CONTROL_ID = 199
# Seconds for each of a message's publication and its audit record, before it is answered AE.
PROCESS_TIMEOUT = 15.0
AUDIT_ACTION = "hl7.received"
SOURCE = "stream-ingest/hl7"

MESSAGES = Counter(
    "tsunagu_hl7_messages_total",
    "HL7 v2 messages received over MLLP, by message type (`unsupported`/`unknown` when not accepted) and ACK code",
    ["type", "ack"],
)
CONNECTIONS = Gauge("tsunagu_hl7_connections", "Open MLLP connections")
CLOSED = Counter(
    "tsunagu_hl7_connections_closed_total",
    "MLLP connections closed by the listener, by reason (idle, garbage, stopping, refused: not an allowed sender)",
    ["reason"],
)
ACK_SECONDS = Histogram(
    "tsunagu_hl7_ack_seconds",
    "From a message's last byte to its ACK written",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)

# HL7 table 0357 error codes used in ERR-3.
ERR_REQUIRED_FIELD = "101"
ERR_DATA_TYPE = "102"
ERR_SEGMENT_SEQUENCE = "100"
ERR_UNSUPPORTED_TYPE = "200"
ERR_UNSUPPORTED_VERSION = "203"
ERR_INTERNAL = "207"


class Rejected(ValueError):
    """A message answered AR: malformed, incomplete or of a type this feed does not take. `location`
    is where (ERR-2, e.g. `PID^1^3`)."""

    def __init__(self, reason: str, error_code: str, location: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_code = error_code
        self.location = location


@dataclass(frozen=True, slots=True)
class Header:
    """What the MSH says, as far as it could be read: enough to answer and to audit."""

    application: str = ""
    facility: str = ""
    type: str = ""
    control_id: str = ""
    version: str = ""

    @property
    def actor(self) -> str:
        if self.application and self.facility:
            return f"{self.application}@{self.facility}"
        return self.application or self.facility or "unknown"


@dataclass(frozen=True, slots=True)
class Hl7Message:
    header: Header
    message: hl7.Message
    text: str
    code: str
    patient: str
    location: str
    sent_at: str | None
    # SHA-256 of the segments with MSH-7 (the time of sending) left out: the same message resent.
    content_digest: str = ""

    @property
    def channels(self) -> list[str]:
        return channels_for(self.code, self.patient, self.location)

    @property
    def idempotency_key(self) -> str:
        """A resend (same sender, control id and content) is published once; a control id reused for
        other content (a device counting from 1 again after a restart) is a new message."""
        return f"hl7/{self.header.actor}/{self.header.control_id}/{self.content_digest[:16]}"

    def payload(self) -> bytes:
        segments = [[str(part) for part in segment] for segment in self.message]
        return orjson.dumps(
            {
                "type": self.header.type,
                "control_id": self.header.control_id,
                "version": self.header.version,
                "sender": {"application": self.header.application, "facility": self.header.facility},
                "patient": self.patient,
                "location": self.location or None,
                "sent_at": self.sent_at,
                "segments": segments,
                "raw": self.text,
            }
        )


def safe_id(value: str) -> str:
    """An id as it appears in a channel name: `[A-Za-z0-9_-]`, at most 64 characters."""
    return _ID_UNSAFE.sub("_", value)[:MAX_ID]


def channels_for(code: str, patient: str, location: str) -> list[str]:
    kind = code.lower()
    channels = [f"{NAMESPACE}:{kind}.patient.{safe_id(patient)}"]
    if location:
        channels.append(f"{NAMESPACE}:{kind}.location.{safe_id(location)}")
    return channels


def decode(data: bytes, *, cut: bool = False) -> str:
    """UTF-8 (MLLP clients' usual choice), else ISO 8859-1 (every byte is a character). `cut`: the
    bytes are the head of something longer, which may end inside a UTF-8 character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8")
        return data.decode("latin-1")


def _first(value: str, repetition: str, component: str) -> str:
    """The first component of the first repetition of a field's text."""
    return value.split(repetition, 1)[0].split(component, 1)[0].strip()


def _field(segment: Any, index: int) -> str:
    try:
        return str(segment(index))
    except (IndexError, KeyError, TypeError):
        return ""


def read_header(text: str) -> tuple[Header, hl7.Message | None]:
    """The MSH of a message or of a fragment that contains one; (empty Header, None) without one."""
    found = _MSH.search(text)
    if found is None:
        return Header(), None
    segment = re.split(r"[\r\n]", text[found.end() - 3 :], maxsplit=1)[0]
    try:
        message = hl7.parse(segment)
        msh = message.segment("MSH")
    except Exception:
        return Header(), None
    separators = message.separators
    repetition, component = separators[2], separators[3]
    message_type = _field(msh, 9).split(repetition, 1)[0]
    parts = message_type.split(component)
    return (
        Header(
            application=_first(_field(msh, 3), repetition, component),
            facility=_first(_field(msh, 4), repetition, component),
            # `code^trigger` whatever the message's component separator
            type="^".join(part.strip() for part in parts[:2]) if len(parts) > 1 else message_type.strip(),
            control_id=_field(msh, 10).strip(),
            version=_first(_field(msh, 12), repetition, component),
        ),
        message,
    )


def validate(text: str) -> Hl7Message:
    """A message fit to publish, or Rejected with the reason and the HL7 error code."""
    # CR LF or LF between segments, and blank lines, as files and some senders have them.
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    segments = [line for line in lines if line.strip()]
    normalized = "\r".join(segments)
    if not normalized.startswith("MSH"):
        raise Rejected("the message does not start with an MSH segment", ERR_SEGMENT_SEQUENCE, "MSH")
    if len(normalized) > 3:
        named = re.compile(rf"[A-Z][A-Z0-9]{{2}}(?:{re.escape(normalized[3])}|$)")
        for number, segment in enumerate(segments[1:], 2):
            if not named.match(segment):
                raise Rejected(f"segment {number} does not start with a segment id", ERR_SEGMENT_SEQUENCE)
    try:
        message = hl7.parse(normalized)
    except Exception as exc:
        raise Rejected(f"not parseable as HL7 v2: {_describe(exc)}", ERR_DATA_TYPE, "MSH") from None
    header, _ = read_header(normalized)
    code, _, trigger = header.type.partition("^")
    if not code or not trigger:
        raise Rejected(
            "MSH-9 message type needs a code and a trigger event (e.g. ADT^A01)", ERR_REQUIRED_FIELD, "MSH^1^9"
        )
    if not header.control_id:
        raise Rejected("MSH-10 message control id is missing", ERR_REQUIRED_FIELD, "MSH^1^10")
    if len(header.control_id) > MAX_CONTROL_ID:
        raise Rejected(f"MSH-10 message control id is longer than {MAX_CONTROL_ID}", ERR_DATA_TYPE, "MSH^1^10")
    if not header.version.startswith("2."):
        raise Rejected(
            f"MSH-12 version {header.version!r} is not an HL7 v2 version", ERR_UNSUPPORTED_VERSION, "MSH^1^12"
        )
    if code not in SUPPORTED_TYPES:
        raise Rejected(
            f"message type {header.type} is not accepted (accepted: {', '.join(SUPPORTED_TYPES)})",
            ERR_UNSUPPORTED_TYPE,
            "MSH^1^9",
        )
    separators = message.separators
    repetition, component = separators[2], separators[3]
    try:
        pid = message.segment("PID")
    except KeyError:
        raise Rejected(f"{header.type} needs a PID segment", ERR_SEGMENT_SEQUENCE, "PID") from None
    patient = _first(_field(pid, 3), repetition, component)
    if not patient:
        raise Rejected("PID-3 patient identifier is missing", ERR_REQUIRED_FIELD, "PID^1^3")
    location = ""
    with contextlib.suppress(KeyError):
        location = _first(_field(message.segment("PV1"), 3), repetition, component)
    return Hl7Message(
        header=header,
        message=message,
        text=text,
        code=code,
        patient=patient,
        location=location,
        sent_at=_sent_at(_field(message.segment("MSH"), 7)),
        content_digest=_content_digest(normalized, separators[1]),
    )


def _content_digest(normalized: str, field: str) -> str:
    msh, _, rest = normalized.partition("\r")
    parts = msh.split(field)
    if len(parts) > 6:
        parts[6] = ""  # MSH-7: MSH-1 is the separator itself, so MSH-n is part n-1
    return hashlib.sha256((field.join(parts) + "\r" + rest.rstrip("\r")).encode()).hexdigest()


def _sent_at(value: str) -> str | None:
    if not value:
        return None
    try:
        return str(hl7.parse_datetime(value.split("^", 1)[0]).isoformat())
    except (ValueError, TypeError, AttributeError):
        return None


class Hl7Feed:
    """Handles frames: validation, publication, audit record, ACK. The listener feeds it."""

    def __init__(
        self,
        bus: Bus,
        broker: Broker,
        *,
        history_size: int,
        history_ttl: float,
        max_bytes: int,
    ) -> None:
        self.bus = bus
        self.broker = broker
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_bytes = max_bytes

    async def handle(self, frame: Frame, peer: str = "", client_cert: str = "") -> bytes | None:
        """The ACK for a frame, or None when the connection should be closed (no MSH to answer).
        `client_cert` is the subject of the sender's TLS client certificate, when it showed one."""
        where = Origin(peer, client_cert)
        text = decode(frame.data, cut=frame.oversize)
        if not frame.framed or frame.oversize:
            header, source = read_header(text)
            if frame.oversize:
                reason = f"message of {frame.size} bytes is larger than the limit of {self.max_bytes}"
            else:
                reason = "bytes outside an MLLP block (no <VT> start byte)"
            if source is None:
                await self._audit_quietly(header, frame, text, "rejected", reason, where)
                MESSAGES.labels("unknown", "closed").inc()
                log.warning("closing MLLP connection %s: %s, and no MSH to answer", peer, reason)
                return None
            return await self._reject(header, source, frame, text, Rejected(reason, ERR_DATA_TYPE), where)
        try:
            message = validate(text)
        except Rejected as exc:
            header, source = read_header(text)
            return await self._reject(header, source, frame, text, exc, where)
        except Exception as exc:
            # A message the checks did not foresee is still answered: a sender whose message made the
            # listener drop the connection would send it again and again, and nothing after it.
            log.exception("HL7 message from %s could not be checked", peer)
            header, source = read_header(text)
            rejection = Rejected(f"not readable as HL7 v2: {_describe(exc)}", ERR_DATA_TYPE)
            return await self._reject(header, source, frame, text, rejection, where)
        header = message.header
        try:
            async with asyncio.timeout(PROCESS_TIMEOUT):
                duplicate = await self._publish(message)
        except Exception as exc:
            reason = f"not published, retry: {_describe(exc)}"
            await self._audit_quietly(header, frame, text, "error", reason, where, message=message)
            return self._error(message.message, header, reason)
        try:
            async with asyncio.timeout(PROCESS_TIMEOUT):
                await self._audit(header, frame, text, "ok", "", where, message=message, duplicate=duplicate)
        except Exception as exc:
            log.error("audit record of HL7 %s from %s not written: %s", header.control_id, header.actor, exc)
            return self._error(
                message.message, header, f"published, but the audit record failed, retry: {_describe(exc)}"
            )
        MESSAGES.labels(_type_label(header.type), "AA").inc()
        if duplicate:
            log.info("HL7 %s from %s is a resend: not published again", header.control_id, header.actor)
        return build_ack("AA", message.message)

    async def _reject(
        self, header: Header, source: hl7.Message | None, frame: Frame, text: str, rejection: Rejected, where: Origin
    ) -> bytes:
        """AR with the reason once the audit log has the message; AE (retry) when it could not be recorded."""
        try:
            async with asyncio.timeout(PROCESS_TIMEOUT):
                await self._audit(header, frame, text, "rejected", rejection.reason, where)
        except Exception as exc:
            log.error("audit record of a rejected HL7 message from %s not written: %s", header.actor, exc)
            reason = f"the audit record failed, retry: {_describe(exc)}; the message itself: {rejection.reason}"
            return self._error(source, header, reason)
        MESSAGES.labels(_type_label(header.type), "AR").inc()
        log.info("AR for %r from %s: %s", header.control_id, header.actor, rejection.reason)
        return build_ack(
            "AR",
            source,
            reason=rejection.reason,
            error_code=rejection.error_code,
            error_location=rejection.location,
            control_id=header.control_id,
            sender=(header.application, header.facility),
        )

    def _error(self, source: hl7.Message | None, header: Header, reason: str) -> bytes:
        MESSAGES.labels(_type_label(header.type), "AE").inc()
        log.warning("AE for %s from %s: %s", header.control_id, header.actor, reason)
        return build_ack(
            "AE",
            source,
            reason=reason,
            error_code=ERR_INTERNAL,
            control_id=header.control_id,
            sender=(header.application, header.facility),
        )

    async def _publish(self, message: Hl7Message) -> bool:
        """Publish to every channel of the message; True when the broker had it already (a resend)."""
        payload = message.payload()
        options = PublishOptions(
            history_size=self.history_size,
            history_ttl=self.history_ttl,
            meta_ttl=max(86400.0, self.history_ttl * 10),
            idempotency_key=message.idempotency_key,
            idempotency_ttl=max(self.history_ttl, 3600.0),
            tags={"hl7_type": message.header.type, "hl7_control_id": message.header.control_id},
        )
        results = [await self.broker.publish(channel, payload, options) for channel in message.channels]
        return all(result.duplicate for result in results)

    async def _audit(
        self,
        header: Header,
        frame: Frame,
        text: str,
        outcome: str,
        reason: str,
        where: Origin,
        *,
        message: Hl7Message | None = None,
        duplicate: bool = False,
    ) -> None:
        details: dict[str, Any] = {
            "type": header.type,
            "control_id": header.control_id,
            "size": frame.size,
            "peer": where.peer,
        }
        if where.client_cert:
            details["client_cert"] = where.client_cert
        if frame.oversize:
            details["truncated"] = True
            details["message_head"] = text
        else:
            details["message"] = text
            details["sha256"] = hashlib.sha256(frame.data).hexdigest()
        if reason:
            details["reason"] = reason
        if message is not None:
            details["patient"] = message.patient
            if message.location:
                details["location"] = message.location
            if outcome == "ok":
                details["channels"] = message.channels
        if duplicate:
            details["duplicate"] = True
        event = AuditEvent(
            actor=header.actor,
            action=AUDIT_ACTION,
            subject=header.control_id,
            details=json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
            outcome=outcome,
            client_ip=where.peer.rsplit(":", 1)[0] if where.peer else "",
        )
        await publish_event(self.bus, topics.AUDIT, f"audit.{AUDIT_ACTION}", event, key=header.actor, source=SOURCE)

    async def _audit_quietly(
        self,
        header: Header,
        frame: Frame,
        text: str,
        outcome: str,
        reason: str,
        where: Origin,
        *,
        message: Hl7Message | None = None,
    ) -> None:
        """Audit what is answered AE or not at all anyway: a failure is logged, the answer stays the same."""
        try:
            async with asyncio.timeout(PROCESS_TIMEOUT):
                await self._audit(header, frame, text, outcome, reason, where, message=message)
        except Exception as exc:
            log.error("audit record of a %s HL7 message from %s not written: %s", outcome, header.actor, exc)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message came from: the peer address, and the subject of its TLS client certificate."""

    peer: str = ""
    client_cert: str = ""


def _type_label(message_type: str) -> str:
    """`ADT^A01`, `ADT` (odd trigger event), `unsupported` or `unknown`: a bounded set of metric labels."""
    if not message_type:
        return "unknown"
    code, _, trigger = message_type.partition("^")
    if code not in SUPPORTED_TYPES:
        return "unsupported"
    return f"{code}^{trigger}" if _TRIGGER.fullmatch(trigger) else code


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class MllpListener:
    """The MLLP server (python-hl7's `start_hl7_server`), as a runtime dependency: `start` waits for
    `before_start` (the bus and broker) and binds, `ping` says whether it is listening, `close` stops it.
    With `ssl_context` it serves MLLP over TLS (a client certificate, when asked for and shown, is
    recorded with each message in the audit log)."""

    def __init__(
        self,
        feed: Hl7Feed,
        host: str,
        port: int,
        *,
        idle_timeout: float,
        senders: Sequence[Network] = LOOPBACK,
        before_start: Callable[[], Awaitable[None]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.feed = feed
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.senders = tuple(senders)
        self.before_start = before_start
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        # Connection tasks, True while one is handling a message (not waiting for the next).
        self._connections: dict[asyncio.Task[None], bool] = {}

    @property
    def bound_port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self.before_start is not None:
            await self.before_start()
        # start_hl7_server hands `ssl` on to loop.create_server
        self._server = await start_hl7_server(self._serve, self.host, self.port, ssl=self.ssl_context)
        log.info("HL7 MLLP listener on %s:%d%s", self.host, self.bound_port, " (TLS)" if self.ssl_context else "")

    async def ping(self) -> None:
        if self._server is None or not self._server.is_serving():
            raise RuntimeError("the MLLP port is not listening")

    async def close(self, grace: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Connections waiting for a message end now; one being answered gets `grace` seconds.
        for task, busy in list(self._connections.items()):
            if not busy:
                CLOSED.labels("stopping").inc()
                task.cancel()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: Any) -> None:
        """One connection; `writer` is python-hl7's HL7StreamWriter (`writeblock`)."""
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = False
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername or "")
        if not isinstance(peername, tuple) or not address_in(str(peername[0]), self.senders):
            CLOSED.labels("refused").inc()
            log.warning("MLLP connection from %s refused: not in TSUNAGU_INGEST_MLLP_SENDERS", peer)
            if task is not None:
                self._connections.pop(task, None)
            writer.transport.abort()
            return
        certificate = peer_certificate(writer.get_extra_info("ssl_object"))
        client_cert = certificate.subject if certificate is not None else ""
        CONNECTIONS.inc()
        frames = FrameReader(reader, self.feed.max_bytes)
        try:
            while self._server is not None:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        frame = await frames.read_frame()
                except TimeoutError:
                    CLOSED.labels("idle").inc()
                    log.info("closing idle MLLP connection %s after %.0fs", peer, self.idle_timeout)
                    return
                if frame is None:
                    if frames.pending:
                        log.info("MLLP connection %s ended in a block: %d bytes dropped", peer, frames.pending)
                    return
                started = time.perf_counter()
                if task is not None:
                    self._connections[task] = True
                ack = await self.feed.handle(frame, peer, client_cert)
                if ack is None:
                    CLOSED.labels("garbage").inc()
                    return
                writer.writeblock(ack)
                try:
                    # a sender that sends on without ever reading its ACKs must not hold the task forever
                    async with asyncio.timeout(self.idle_timeout):
                        await writer.drain()
                except TimeoutError:
                    CLOSED.labels("idle").inc()
                    log.info("closing MLLP connection %s: its ACKs were not read for %.0fs", peer, self.idle_timeout)
                    return
                ACK_SECONDS.observe(time.perf_counter() - started)
                if task is not None:
                    self._connections[task] = False
            CLOSED.labels("stopping").inc()
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection %s lost: %s", peer, exc)
        except Exception:
            log.exception("MLLP connection %s failed", peer)
        finally:
            CONNECTIONS.dec()
            writer.close()
            try:
                # close() waits to flush what is unsent: not for long to a peer that reads nothing
                async with asyncio.timeout(5):
                    await writer.wait_closed()
            except asyncio.CancelledError:
                writer.transport.abort()
                raise
            except Exception:
                writer.transport.abort()
            finally:
                if task is not None:
                    self._connections.pop(task, None)
