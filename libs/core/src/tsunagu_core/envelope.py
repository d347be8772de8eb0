"""The internal event envelope (proto/tsunagu/v1/envelope.proto) and publishing events in it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from tsunagu_core.bus import Bus, BusMessage, Delivery
from tsunagu_core.telemetry import inject_trace_headers
from tsunagu_core.wire.envelope_pb2 import Envelope

MessageT = TypeVar("MessageT", bound=Message)


class EnvelopeError(ValueError):
    """Bytes on the bus that are not a Tsunagu envelope."""


def wrap(event_type: str, payload: Message, *, source: str, attributes: Mapping[str, str] | None = None) -> Envelope:
    trace_headers = inject_trace_headers()
    return Envelope(
        id=str(uuid.uuid4()),
        type=event_type,
        source=source,
        time_unix_ms=int(time.time() * 1000),
        traceparent=trace_headers.get("traceparent", ""),
        tracestate=trace_headers.get("tracestate", ""),
        payload=payload.SerializeToString(),
        attributes=dict(attributes or {}),
    )


def unwrap(raw: bytes) -> Envelope:
    try:
        envelope = Envelope.FromString(raw)
    except DecodeError as exc:
        raise EnvelopeError(f"not an envelope: {exc}") from None
    if not envelope.type:
        raise EnvelopeError("envelope without a type")
    return envelope


def payload_of(envelope: Envelope, message_type: type[MessageT]) -> MessageT:
    try:
        return message_type.FromString(envelope.payload)
    except DecodeError as exc:
        raise EnvelopeError(f"{envelope.type} payload is not a {message_type.__name__}: {exc}") from None


async def publish_event(
    bus: Bus,
    topic: str,
    event_type: str,
    payload: Message,
    *,
    key: str | bytes | None,
    source: str,
    attributes: Mapping[str, str] | None = None,
) -> Delivery:
    envelope = wrap(event_type, payload, source=source, attributes=attributes)
    headers = {"ce-type": event_type, "ce-id": envelope.id}
    return await bus.publish(topic, envelope.SerializeToString(), key=key, headers=headers)


def envelope_of(message: BusMessage) -> Envelope:
    return unwrap(message.value)
