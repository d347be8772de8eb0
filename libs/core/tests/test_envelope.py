from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from tsunagu_core import topics
from tsunagu_core.bus import BusMessage, MemoryBus
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of, publish_event, unwrap
from tsunagu_core.testing import eventually
from tsunagu_core.wire.events_pb2 import GatewayEvent


async def test_event_travels_in_an_envelope_with_its_trace() -> None:
    bus = MemoryBus()
    received: list[BusMessage] = []

    async def handle(message: BusMessage) -> None:
        received.append(message)

    consumer = await bus.consume([topics.GATEWAY_EVENTS], "presence", handle)
    tracer = TracerProvider().get_tracer("test")
    event = GatewayEvent(kind=GatewayEvent.CONNECTED, node="gw-1", client_id="c1", user_id="ann")
    with tracer.start_as_current_span("connect") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
        await publish_event(bus, topics.GATEWAY_EVENTS, "gateway.connected", event, key="ann", source="ws-gateway/gw-1")
    await eventually(lambda: bool(received))
    await consumer.stop()
    envelope = envelope_of(received[0])
    assert envelope.type == "gateway.connected" and envelope.source == "ws-gateway/gw-1"
    assert trace_id in envelope.traceparent and trace_id in received[0].headers["traceparent"]
    assert received[0].key == b"ann"
    assert payload_of(envelope, GatewayEvent) == event
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_garbage_is_a_clear_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="not an envelope"):
        unwrap(b"\xff\xff\xff")
    with pytest.raises(EnvelopeError, match="without a type"):
        unwrap(b"")
