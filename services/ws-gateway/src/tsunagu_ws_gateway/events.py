"""Connection events to Kafka `tsunagu.gateway.events`, keyed by user, for presence and audit.

Publishing never delays a client: events are handed to background tasks, a bounded number at a
time; when Kafka is slower than connections churn, the excess is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter
from tsunagu_core import topics
from tsunagu_core.bus import Bus
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import GatewayEvent

log = logging.getLogger("tsunagu.gateway.events")

EVENTS_DROPPED = Counter("tsunagu_gateway_events_dropped_total", "Connection events not sent to the bus")

EVENT_TYPES = {
    GatewayEvent.CONNECTED: "gateway.connected",
    GatewayEvent.DISCONNECTED: "gateway.disconnected",
    GatewayEvent.SUBSCRIBED: "gateway.subscribed",
    GatewayEvent.UNSUBSCRIBED: "gateway.unsubscribed",
    GatewayEvent.NODE_HEARTBEAT: "gateway.node_heartbeat",
}


class EventEmitter:
    def __init__(self, bus: Bus, node: str, max_in_flight: int = 1000) -> None:
        self.bus = bus
        self.node = node
        self.max_in_flight = max_in_flight
        self._in_flight: set[asyncio.Task[None]] = set()

    def emit(self, event: GatewayEvent) -> None:
        if len(self._in_flight) >= self.max_in_flight:
            EVENTS_DROPPED.inc()
            return
        event.node = self.node
        task = asyncio.create_task(self._send(event))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, event: GatewayEvent) -> None:
        try:
            await publish_event(
                self.bus,
                topics.GATEWAY_EVENTS,
                EVENT_TYPES[event.kind],
                event,
                key=event.user_id or event.client_id,
                source=f"ws-gateway/{self.node}",
            )
        except Exception as exc:
            EVENTS_DROPPED.inc()
            log.warning("connection event not sent: %s", exc)

    async def flush(self, timeout: float = 5.0) -> None:
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
