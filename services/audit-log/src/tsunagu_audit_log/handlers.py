"""From bus records to events to append: `AuditEvent`s of `tsunagu.audit`, and the security-relevant
`GatewayEvent`s of `tsunagu.gateway.events` (a disconnect for a revoked token is a forced logout)."""

from __future__ import annotations

import json

from google.protobuf.message import DecodeError
from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.wire.envelope_pb2 import Envelope
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent

from tsunagu_audit_log.chain import NewEvent

# Disconnect codes of the gateway that are security events, and the action recorded for each.
SECURITY_DISCONNECTS = {3500: "session.forced_logout"}


class BadEvent(ValueError):
    """A record that cannot be recorded as it is; it is logged and counted, never retried."""


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _envelope(message: BusMessage) -> Envelope:
    try:
        envelope = envelope_of(message)
    except EnvelopeError as exc:
        raise BadEvent(str(exc)) from None
    if not envelope.id:
        raise BadEvent(f"{envelope.type} envelope without an id")
    return envelope


def _time_ms(envelope: Envelope, message: BusMessage) -> int:
    return envelope.time_unix_ms or message.timestamp_ms


def audit_event(message: BusMessage) -> NewEvent:
    envelope = _envelope(message)
    try:
        event = payload_of(envelope, AuditEvent)
    except (EnvelopeError, DecodeError) as exc:
        raise BadEvent(str(exc)) from None
    if not event.action:
        raise BadEvent(f"audit event {envelope.id} has no action")
    return NewEvent(
        event_id=envelope.id,
        time_ms=_time_ms(envelope, message),
        source=envelope.source,
        type=envelope.type,
        actor=event.actor,
        action=event.action,
        subject=event.subject,
        outcome=event.outcome,
        client_ip=event.client_ip,
        details=bytes(event.details),
    )


def gateway_event(message: BusMessage) -> NewEvent | None:
    """The security event in a gateway connection event, or None for the rest (heartbeats, subscribes...)."""
    if message.headers.get("ce-type", "gateway.disconnected") != "gateway.disconnected":
        return None
    envelope = _envelope(message)
    if envelope.type != "gateway.disconnected":
        return None
    try:
        event = payload_of(envelope, GatewayEvent)
    except (EnvelopeError, DecodeError) as exc:
        raise BadEvent(str(exc)) from None
    action = SECURITY_DISCONNECTS.get(event.code)
    if event.kind != GatewayEvent.DISCONNECTED or action is None:
        return None
    details = {
        "client_id": event.client_id,
        "session_id": event.session_id,
        "code": event.code,
        "reason": event.reason,
        "node": event.node,
        "transport": event.transport,
    }
    return NewEvent(
        event_id=envelope.id,
        time_ms=_time_ms(envelope, message),
        source=envelope.source,
        type=envelope.type,
        actor=envelope.source or f"ws-gateway/{event.node}",
        action=action,
        subject=event.user_id or event.client_id,
        outcome="disconnected",
        client_ip="",
        details=canonical_json(details),
    )
