"""Connection events to Kafka `tsunagu.gateway.events`, keyed by user, for presence and audit.

Publishing never delays a client: events are handed to background tasks, a bounded number at a
time; when Kafka is slower than connections churn, the excess is dropped and counted.

Events name the node as `<node name>@<instance>`, the instance being new at every process start,
so a gateway restarted under the same host name is not mistaken for the one that died. From its
first event on, the emitter also sends a NODE_HEARTBEAT (keyed by that node id) every
NODE_HEARTBEAT_SECONDS; presence drops a node's clients when these stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from prometheus_client import Counter
from tsunagu_core import topics
from tsunagu_core.bus import Bus
from tsunagu_core.envelope import publish_event
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent

log = logging.getLogger("tsunagu.gateway.events")

EVENTS_DROPPED = Counter("tsunagu_gateway_events_dropped_total", "Connection events not sent to the bus")
AUDIT_FAILURES = Counter("tsunagu_gateway_audit_failures_total", "Audit events the bus did not take")

NODE_HEARTBEAT_SECONDS = 5.0

EVENT_TYPES = {
    GatewayEvent.CONNECTED: "gateway.connected",
    GatewayEvent.DISCONNECTED: "gateway.disconnected",
    GatewayEvent.SUBSCRIBED: "gateway.subscribed",
    GatewayEvent.UNSUBSCRIBED: "gateway.unsubscribed",
    GatewayEvent.NODE_HEARTBEAT: "gateway.node_heartbeat",
}


class EventEmitter:
    def __init__(
        self, bus: Bus, node: str, max_in_flight: int = 1000, heartbeat_seconds: float = NODE_HEARTBEAT_SECONDS
    ) -> None:
        self.bus = bus
        self.node = f"{node}@{uuid.uuid4().hex[:12]}"
        self.max_in_flight = max_in_flight
        self.heartbeat_seconds = heartbeat_seconds
        self._in_flight: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopped = False

    def emit(self, event: GatewayEvent) -> None:
        if self._heartbeat is None and not self._stopped:
            self._heartbeat = asyncio.create_task(self._beat(), name="gateway-node-heartbeat")
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
                key=event.user_id or event.client_id or event.node,
                source=f"ws-gateway/{self.node}",
            )
        except Exception as exc:
            EVENTS_DROPPED.inc()
            log.warning("connection event not sent: %s", exc)

    async def audit(self, event: AuditEvent) -> None:
        """An audit record, awaited: the caller reports a failure instead of dropping it."""
        try:
            await publish_event(
                self.bus,
                topics.AUDIT,
                f"audit.{event.action}",
                event,
                key=event.actor,
                source=f"ws-gateway/{self.node}",
            )
        except Exception:
            AUDIT_FAILURES.inc()
            raise

    async def _beat(self) -> None:
        while True:
            self.emit(GatewayEvent(kind=GatewayEvent.NODE_HEARTBEAT))
            await asyncio.sleep(self.heartbeat_seconds)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait for the events in flight; called once at shutdown, it also ends the heartbeats."""
        self._stopped = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
