"""Webhooks: the platform's events, delivered to the application's HTTP endpoints.

The connect, disconnect, subscribe and unsubscribe events (`tsunagu.gateway.events`) and document
changes (`tsunagu.collab.updates`) that already go to Kafka are POSTed as JSON to each endpoint in
TSUNAGU_GATEWAY_WEBHOOKS that wants them. Each endpoint is a consumer group of its own, shared by the
gateway replicas: its position on the topics moves only once an event was delivered (a 2xx answer), so
delivery is at least once and survives restarts, and one endpoint that is down holds back none of the
others. A failed delivery is retried with exponential backoff; an event still undelivered `retry_for`
seconds after it happened goes to the topic's dead-letter topic (`<topic>.dlq`, the bus's) instead.

Signed as Standard Webhooks sign (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
HMAC-SHA256 of id.timestamp.body>`); with several secrets (a rotation), one signature per secret, so a
receiver that knows either verifies. The `webhook-id` is the event's envelope id, the same on every
redelivery: receivers deduplicate by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from prometheus_client import Counter, Histogram
from standardwebhooks import Webhook
from tsunagu_core import topics
from tsunagu_core.bus import BatchPolicy, Bus, BusMessage, Rejected, RetryPolicy, Subscription
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.wire.events_pb2 import CollabUpdate, GatewayEvent

from tsunagu_ws_gateway.config import WebhookEndpoint

log = logging.getLogger("tsunagu.gateway.webhooks")

DELIVERIES = Counter(
    "tsunagu_gateway_webhook_deliveries_total",
    "Webhook delivery attempts by endpoint and outcome (delivered, failed, dead_lettered)",
    ["endpoint", "outcome"],
)
DELIVERY_SECONDS = Histogram(
    "tsunagu_gateway_webhook_delivery_seconds",
    "Time an endpoint took to answer a webhook",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

_GATEWAY_KINDS = {
    GatewayEvent.CONNECTED: "connect",
    GatewayEvent.DISCONNECTED: "disconnect",
    GatewayEvent.SUBSCRIBED: "subscribe",
    GatewayEvent.UNSUBSCRIBED: "unsubscribe",
}
EVENT_TYPES = (*_GATEWAY_KINDS.values(), "document_changed")
# Deliveries happen in partition order, one at a time per partition: a batch is what one call may hold back.
_BATCH = BatchPolicy(max_messages=100, max_buffered=1000)


def webhook_of(message: BusMessage) -> tuple[str, str, dict[str, Any]] | None:
    """The id, type and JSON body of a bus record's event; None for what is no webhook (heartbeats, garbage).
    The id is the event's envelope id: the same on every redelivery."""
    try:
        envelope = envelope_of(message)
        if message.topic == topics.GATEWAY_EVENTS:
            event = payload_of(envelope, GatewayEvent)
        elif message.topic == topics.COLLAB_UPDATES:
            update = payload_of(envelope, CollabUpdate)
        else:
            return None
    except EnvelopeError:
        return None
    happened = envelope.time_unix_ms or message.timestamp_ms
    if message.topic == topics.COLLAB_UPDATES:
        body = {"doc": update.doc, "client": update.client_id, "user": update.user_id, "bytes": len(update.update)}
        return envelope.id, "document_changed", {"type": "document_changed", "time_ms": happened, "data": body}
    kind = _GATEWAY_KINDS.get(event.kind)
    if kind is None:
        return None
    data: dict[str, Any] = {"client": event.client_id, "user": event.user_id, "node": event.node}
    if event.channel:
        data["channel"] = event.channel
    if event.transport:
        data["transport"] = event.transport
    if event.kind == GatewayEvent.DISCONNECTED:
        data |= {"code": event.code, "reason": event.reason}
    if event.conn_info:
        data["conn_info"] = orjson.Fragment(event.conn_info)
    return envelope.id, kind, {"type": kind, "time_ms": happened, "data": data}


class WebhookRelay:
    """The deliveries of one endpoint."""

    def __init__(self, name: str, endpoint: WebhookEndpoint, client: httpx.AsyncClient) -> None:
        self.name = name
        self.endpoint = endpoint
        self.client = client
        self.signers = [Webhook(secret) for secret in endpoint.secrets]
        self.wanted = frozenset(endpoint.events)
        self._stopping = asyncio.Event()

    @property
    def topics(self) -> list[str]:
        wanted = []
        if self.wanted & set(_GATEWAY_KINDS.values()):
            wanted.append(topics.GATEWAY_EVENTS)
        if "document_changed" in self.wanted:
            wanted.append(topics.COLLAB_UPDATES)
        return wanted

    def headers(self, webhook_id: str, body: bytes, now: datetime) -> dict[str, str]:
        signatures = " ".join(signer.sign(webhook_id, now, body) for signer in self.signers)
        return {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signatures,
        }

    async def handle(self, messages: Sequence[BusMessage]) -> list[Rejected]:
        rejected = []
        for message in messages:
            webhook = webhook_of(message)
            if webhook is None or webhook[1] not in self.wanted:
                continue
            webhook_id, _, body = webhook
            reason = await self._deliver(webhook_id, orjson.dumps(body), body["time_ms"])
            if reason:
                rejected.append(Rejected(message, reason))
        return rejected

    async def _deliver(self, webhook_id: str, body: bytes, happened_ms: int) -> str:
        """Deliver until a 2xx; the reason it was given up on once `retry_for` has passed since the event."""
        happened = happened_ms / 1000 if happened_ms else time.time()
        backoff = self.endpoint.first_backoff
        while True:
            # Signed at each attempt: a receiver refuses timestamps too far from its clock.
            headers = self.headers(webhook_id, body, datetime.now(UTC))
            started = time.perf_counter()
            try:
                answer = await self.client.post(
                    self.endpoint.url, content=body, headers=headers, timeout=self.endpoint.timeout
                )
                problem = "" if answer.is_success else f"answered HTTP {answer.status_code}"
            except httpx.HTTPError as exc:
                problem = f"unreachable ({type(exc).__name__})"
            DELIVERY_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            if not problem:
                DELIVERIES.labels(self.name, "delivered").inc()
                return ""
            DELIVERIES.labels(self.name, "failed").inc()
            if time.time() - happened > self.endpoint.retry_for:
                DELIVERIES.labels(self.name, "dead_lettered").inc()
                log.error(
                    "webhook %s to %r given up after %g s: %s", webhook_id, self.name, self.endpoint.retry_for, problem
                )
                return f"webhook {self.name!r}: {problem} for {self.endpoint.retry_for:g} s"
            log.warning("webhook %s to %r: %s; again in %.1f s", webhook_id, self.name, problem, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._stopping.is_set():
                # Stopping: neither delivered nor given up on, so not committed; the next start delivers it.
                raise asyncio.CancelledError
            backoff = min(backoff * 2, self.endpoint.max_backoff)

    def stop(self) -> None:
        self._stopping.set()


class Relays:
    """One consumer per endpoint (group `ws-gateway-webhooks-<name>`, shared by the replicas)."""

    def __init__(self, bus: Bus, endpoints: Mapping[str, WebhookEndpoint]) -> None:
        self.bus = bus
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=16))
        self.relays = [WebhookRelay(name, endpoint, self.client) for name, endpoint in endpoints.items()]
        self._subscriptions: list[Subscription] = []

    async def start(self) -> None:
        # The relay retries itself: the bus's retries would redeliver the batch's earlier events.
        once = RetryPolicy(max_attempts=1)
        # A new endpoint gets the events from when it was added, not all the topics still retain; an endpoint
        # that was down resumes at its group's committed position.
        for relay in self.relays:
            group = f"ws-gateway-webhooks-{relay.name}"
            self._subscriptions.append(
                await self.bus.consume_batches(
                    relay.topics, group, relay.handle, batch=_BATCH, retry=once, from_latest=True
                )
            )

    async def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
        for subscription in self._subscriptions:
            await subscription.stop()
        self._subscriptions.clear()
        await self.client.aclose()
