"""This node's channels and clients, and the fan-out of what the broker delivers.

A publication is encoded into a frame once per protocol flavour (JSON, protobuf) that its local
subscribers speak, and the same bytes are queued to every local subscriber of that flavour. A
subscriber that is still subscribing gets the publication buffered instead, so its
subscribe reply (with recovered history) always comes before live publications, with no gap and
no duplicate at the seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter, Gauge, Histogram
from tsunagu_core.broker import Broker, ClientInfo, Publication, PublishOptions

from tsunagu_ws_gateway.config import ChannelOptions, GatewaySettings
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codec import Codec

if TYPE_CHECKING:
    from tsunagu_ws_gateway.session import ClientSession

log = logging.getLogger("tsunagu.gateway.hub")

CONTROL_CHANNEL = "__tsunagu:control"
NODE_HEARTBEAT_SECONDS = 5.0

CONNECTIONS = Gauge("tsunagu_gateway_connections", "Open client connections on this node")
SUBSCRIPTIONS = Gauge("tsunagu_gateway_subscriptions", "Client subscriptions on this node")
CHANNELS = Gauge("tsunagu_gateway_channels", "Channels with at least one subscriber on this node")
DELIVERIES = Counter("tsunagu_gateway_deliveries_total", "Publications queued to client connections")
# From the publish accepted by the broker (its time_ms, millisecond resolution) to the frame queued for
# this node's subscribers: fan-out across replicas plus this node's backlog, observed once per node.
DELIVERY_LAG = Histogram(
    "tsunagu_gateway_delivery_lag_seconds",
    "Publish accepted to publication queued to local subscribers",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DISCONNECTS = Counter("tsunagu_gateway_disconnects_total", "Connections closed by the server", ["code"])


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A join or leave that reached a subscriber while it was still subscribing (sent after its reply)."""

    join: bool
    info: ClientInfo


@dataclass(slots=True)
class Subscription:
    channel: str
    options: ChannelOptions
    recoverable: bool
    join_leave: bool = False
    buffering: bool = True
    buffer: list[Publication | PresenceEvent] = field(default_factory=list)
    expires_at: float | None = None
    chan_info: bytes = b""


@dataclass(slots=True)
class _Channel:
    subscribers: dict[ClientSession, Subscription] = field(default_factory=dict)
    # The hot path: per codec, the send function of every subscriber that is live, so a publication
    # costs one encoding per codec and one call per subscriber; those still subscribing wait in
    # `pending` and buffer instead.
    senders: dict[Codec, dict[ClientSession, Callable[[bytes], None]]] = field(default_factory=dict)
    pending: dict[ClientSession, Subscription] = field(default_factory=dict)
    live: asyncio.Future[None] | None = None


class Node:
    def __init__(self, settings: GatewaySettings, broker: Broker, name: str) -> None:
        self.settings = settings
        self.broker = broker
        self.name = name
        self.id = uuid.uuid4().hex
        self.channels: dict[str, _Channel] = {}
        self.clients: dict[str, ClientSession] = {}
        self.users: dict[str, set[ClientSession]] = {}
        # Sockets that have not sent connect yet: on the ticker for the connect timeout only.
        self.connecting: set[ClientSession] = set()
        self.nodes: dict[str, dict[str, Any]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._control_ready = False
        self._control_tasks: set[asyncio.Task[None]] = set()
        self.draining = False

    # lifecycle

    async def start(self) -> None:
        self.broker.set_handler(self)
        self._ticker = asyncio.create_task(self._tick(), name="gateway-ticker")

    async def ensure_control(self) -> None:
        if not self._control_ready:
            await self.broker.subscribe(CONTROL_CHANNEL)
            self._control_ready = True

    async def stop(self) -> None:
        self.draining = True
        for session in list(self.clients.values()):
            session.transport.close(codes.SHUTDOWN)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    # clients

    def add_client(self, session: ClientSession) -> None:
        self.clients[session.id] = session
        self.users.setdefault(session.user, set()).add(session)
        CONNECTIONS.set(len(self.clients))

    def remove_client(self, session: ClientSession) -> None:
        if self.clients.pop(session.id, None) is None:
            return
        sessions = self.users.get(session.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.users[session.user]
        CONNECTIONS.set(len(self.clients))

    # channels

    async def add_subscriber(self, channel: str, session: ClientSession, subscription: Subscription) -> None:
        """Register the subscriber in buffering mode and return once the channel is live on this node."""
        state = self.channels.get(channel)
        if state is None:
            state = _Channel(live=asyncio.get_running_loop().create_future())
            self.channels[channel] = state
            state.subscribers[session] = subscription
            state.pending[session] = subscription
            CHANNELS.set(len(self.channels))
            assert state.live is not None
            try:
                await self.broker.subscribe(channel)
            except Exception as exc:
                state.live.set_exception(exc)
                state.live.exception()  # retrieved here so a lone subscriber leaves no unhandled-error log
                state.subscribers.pop(session, None)
                state.pending.pop(session, None)
                if self.channels.get(channel) is state:
                    del self.channels[channel]
                    CHANNELS.set(len(self.channels))
                raise
            state.live.set_result(None)
        else:
            state.subscribers[session] = subscription
            state.pending[session] = subscription
            assert state.live is not None
            if not state.live.done():
                await asyncio.shield(state.live)
            elif state.live.exception() is not None:
                raise state.live.exception()  # type: ignore[misc]
        SUBSCRIPTIONS.inc()

    async def remove_subscriber(self, channel: str, session: ClientSession) -> None:
        state = self.channels.get(channel)
        if state is None or state.subscribers.pop(session, None) is None:
            return
        group = state.senders.get(session.codec)
        if group is not None:
            group.pop(session, None)
        state.pending.pop(session, None)
        SUBSCRIPTIONS.dec()
        if not state.subscribers:
            del self.channels[channel]
            CHANNELS.set(len(self.channels))
            try:
                await self.broker.unsubscribe(channel)
            except Exception as exc:
                log.warning("unsubscribing %s from the broker failed: %s", channel, exc)

    # what the broker delivers

    async def on_publication(self, channel: str, publication: Publication) -> None:
        if channel == CONTROL_CHANNEL:
            await self._on_control(publication)
            return
        state = self.channels.get(channel)
        if state is None:
            return
        delivered = 0
        for codec, senders in tuple(state.senders.items()):
            if senders:
                frame = codec.publication_push(channel, publication)
                for send in list(senders.values()):
                    send(frame)
                delivered += len(senders)
        if delivered:
            DELIVERIES.inc(delivered)
            if publication.time_ms:
                DELIVERY_LAG.observe(max(0.0, time.time() - publication.time_ms / 1000))
        for subscription in state.pending.values():
            subscription.buffer.append(publication)

    def go_live(self, channel: str, session: ClientSession) -> None:
        """The subscriber has sent its subscribe reply and its buffer: from now on it gets publications."""
        state = self.channels.get(channel)
        if state is not None and state.pending.pop(session, None) is not None:
            state.senders.setdefault(session.codec, {})[session] = session.transport.send

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        state = self.channels.get(channel)
        if state is None:
            return
        frames: dict[Codec, bytes] = {}
        for session, subscription in state.subscribers.items():
            if not subscription.join_leave:
                continue
            if subscription.buffering:
                # After its subscribe reply, as publications are: a subscriber's own join comes this way.
                subscription.buffer.append(PresenceEvent(join, info))
                continue
            codec = session.codec
            frame = frames.get(codec)
            if frame is None:
                frame = frames[codec] = codec.join_push(channel, info) if join else codec.leave_push(channel, info)
            session.transport.send(frame)

    async def on_resubscribed(self) -> None:
        """The fan-out link was down, so publications may be missing: recoverable subscribers resubscribe
        (and recover from history); the others are told their state is gone the same way."""
        for channel, state in list(self.channels.items()):
            if channel == CONTROL_CHANNEL:
                continue
            frames: dict[Codec, bytes] = {}
            for session in list(state.subscribers):
                session.forget_subscription(channel)
                codec = session.codec
                frame = frames.get(codec)
                if frame is None:
                    code = codes.UNSUBSCRIBE_INSUFFICIENT_STATE
                    frame = frames[codec] = codec.unsubscribe_push(channel, code, "insufficient state")
                session.transport.send(frame)
            await self.remove_subscriber_all(channel)

    async def remove_subscriber_all(self, channel: str) -> None:
        state = self.channels.pop(channel, None)
        if state is not None:
            SUBSCRIPTIONS.dec(len(state.subscribers))
            CHANNELS.set(len(self.channels))
            with contextlib.suppress(Exception):
                await self.broker.unsubscribe(channel)

    # cluster-wide commands from the server API, carried on the control channel

    async def broadcast_control(self, command: dict[str, Any]) -> None:
        await self.broker.publish(CONTROL_CHANNEL, orjson.dumps(command), PublishOptions())

    async def _on_control(self, publication: Publication) -> None:
        try:
            command = orjson.loads(publication.data)
        except orjson.JSONDecodeError:
            return
        kind = command.get("kind")
        if kind == "heartbeat":
            command["seen"] = time.time()
            self.nodes[command["node_id"]] = command
        elif kind == "disconnect":
            disconnect = codes.Disconnect(
                int(command.get("code", 3503)), str(command.get("reason", "force disconnect"))
            )
            for session in self._matching(command):
                session.transport.close(disconnect)
                DISCONNECTS.labels(str(disconnect.code)).inc()
        elif kind in ("unsubscribe", "subscribe"):
            # Not awaited here: this runs inside the broker's delivery loop, and a subscribe waits for the
            # broker to confirm its own subscription, which that same loop delivers (a Redis broker then
            # stalled every channel's fan-out for 5 s and failed the subscribe).
            channel = str(command["channel"])
            for session in self._matching(command):
                act = session.server_subscribe if kind == "subscribe" else session.server_unsubscribe
                self._run(act(channel), f"server {kind} of {session.id} to {channel}")

    def _run(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work, name=what)
        self._control_tasks.add(task)
        task.add_done_callback(self._control_done)

    def _control_done(self, task: asyncio.Task[None]) -> None:
        self._control_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed: %r", task.get_name(), task.exception())

    def _matching(self, command: dict[str, Any]) -> Iterable[ClientSession]:
        sessions = list(self.users.get(str(command.get("user", "")), ()))
        client = command.get("client")
        session_id = command.get("session")
        return [
            s for s in sessions if (not client or s.id == client) and (not session_id or s.session_id == session_id)
        ]

    # timers: pings, pong deadlines, connect timeouts, token expiry, node heartbeats

    async def _tick(self) -> None:
        next_heartbeat = 0.0
        # Presence entries expire after presence_ttl unless renewed; renew at a third of it.
        next_presence = time.monotonic() + self.settings.presence_ttl / 3
        # At once, so server API commands (subscribe, disconnect...) reach this node from its first
        # second; if the broker is not reachable yet, the heartbeat below retries every few seconds.
        with contextlib.suppress(Exception):
            await self.ensure_control()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in [*self.clients.values(), *self.connecting]:
                session.on_tick(now)
            if now >= next_heartbeat:
                next_heartbeat = now + NODE_HEARTBEAT_SECONDS
                with contextlib.suppress(Exception):
                    await self.ensure_control()
                    await self.broadcast_control(self.heartbeat())
                self._forget_silent_nodes()
            if now >= next_presence:
                next_presence = now + self.settings.presence_ttl / 3
                await self._renew_presence()

    async def _renew_presence(self) -> None:
        for channel, state in list(self.channels.items()):
            for session, subscription in list(state.subscribers.items()):
                if not subscription.options.presence:
                    continue
                try:
                    info = session.client_info(subscription)
                    await self.broker.add_presence(channel, session.id, info, ttl=self.settings.presence_ttl)
                except Exception as exc:
                    log.warning("presence of %s on %s not renewed: %s", session.id, channel, exc)

    def heartbeat(self) -> dict[str, Any]:
        return {
            "kind": "heartbeat",
            "node_id": self.id,
            "name": self.name,
            "num_clients": len(self.clients),
            "num_users": len(self.users),
            "num_channels": len(self.channels),
            "num_subs": sum(len(s.subscribers) for s in self.channels.values()),
        }

    def _forget_silent_nodes(self) -> None:
        horizon = time.time() - 3 * NODE_HEARTBEAT_SECONDS
        for node_id in [n for n, info in self.nodes.items() if info["seen"] < horizon]:
            del self.nodes[node_id]
