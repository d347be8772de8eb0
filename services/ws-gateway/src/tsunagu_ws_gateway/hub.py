"""This node's channels and the fan-out of what the broker delivers (its clients are the registry's:
core/registry.py).

A publication is encoded into a frame once per renderer (JSON, protobuf, each protocol adapter's own)
that its local subscribers use, and the same bytes are queued to every local subscriber of that renderer. A
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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from prometheus_client import Counter, Gauge, Histogram
from tsunagu_core.broker import Broker, ClientInfo, Publication, PublishOptions

from tsunagu_ws_gateway.config import ChannelOptions, GatewaySettings
from tsunagu_ws_gateway.protocol import codes, fossil

log = logging.getLogger("tsunagu.gateway.hub")

CONTROL_CHANNEL = "__tsunagu:control"
NODE_HEARTBEAT_SECONDS = 5.0

SUBSCRIPTIONS = Gauge("tsunagu_gateway_subscriptions", "Client subscriptions on this node")
CHANNELS = Gauge("tsunagu_gateway_channels", "Channels with at least one subscriber on this node")
DELIVERIES = Counter("tsunagu_gateway_deliveries_total", "Publications queued to client connections")
DELTA_DELIVERIES = Counter(
    "tsunagu_gateway_delta_deliveries_total",
    "Publications queued to delta subscribers, as a delta or in full (first after subscribing, or no gain)",
    ["payload"],
)
DELTA_AS_DELTA = DELTA_DELIVERIES.labels("delta")
DELTA_IN_FULL = DELTA_DELIVERIES.labels("full")
# From the publish accepted by the broker (its time_ms, millisecond resolution) to the frame queued for
# this node's subscribers: fan-out across replicas plus this node's backlog, observed once per node.
DELIVERY_LAG = Histogram(
    "tsunagu_gateway_delivery_lag_seconds",
    "Publish accepted to publication queued to local subscribers",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


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
    # The subscriber knows the stream position (recoverable ones always do).
    positioned: bool = False
    # Only publications whose tags pass reach the subscriber (filters.py).
    tags_filter: Callable[[Mapping[str, str]], bool] | None = None
    # Fossil deltas against the previous publication (the client asked with `delta: "fossil"`).
    delta: bool = False


class Renderer(Protocol):
    """Renders a publication, a join or a leave once for every subscriber that shares it (core/replies.py)."""

    def publication_push(self, channel: str, pub: Publication) -> bytes: ...

    def join_push(self, channel: str, info: ClientInfo) -> bytes: ...

    def leave_push(self, channel: str, info: ClientInfo) -> bytes: ...


class SubscriberSink(Protocol):
    @property
    def renderer(self) -> Any: ...  # a Renderer

    def deliver(self, frame: bytes) -> None: ...


class Subscriber(Protocol):
    """A session as the hub sees it (core/session.py)."""

    @property
    def id(self) -> str: ...

    @property
    def sink(self) -> SubscriberSink: ...

    def client_info(self, subscription: Subscription | None = None) -> ClientInfo: ...

    def lost_subscription(self, channel: str, code: int, reason: str) -> None: ...


ControlHandler = Callable[[dict[str, Any]], Awaitable[None]]


class ChannelOwner(Protocol):
    async def on_publication(self, channel: str, publication: Publication) -> None: ...

    async def on_resubscribed(self) -> None: ...


@dataclass(slots=True)
class _DeltaGroup:
    """The delta subscribers of one renderer on a channel: all hold `base`, the payload of the last
    publication fanned out here, except the `fresh` ones, which hold nothing of the channel's yet."""

    senders: dict[Subscriber, Callable[[bytes], None]] = field(default_factory=dict)
    fresh: set[Subscriber] = field(default_factory=set)
    base: bytes | None = None


@dataclass(slots=True)
class _Channel:
    subscribers: dict[Subscriber, Subscription] = field(default_factory=dict)
    # The hot path: per renderer, the deliver function of every subscriber that is live, so a
    # publication costs one encoding per renderer and one call per subscriber; those still subscribing
    # wait in `pending` and buffer instead.
    senders: dict[Any, dict[Subscriber, Callable[[bytes], None]]] = field(default_factory=dict)
    pending: dict[Subscriber, Subscription] = field(default_factory=dict)
    live: asyncio.Future[None] | None = None
    # Live subscribers with a tags filter, kept off the hot path: a publication is checked against each
    # of them only when there are any.
    filtered: dict[Subscriber, tuple[Callable[[Mapping[str, str]], bool], Callable[[bytes], None]]] = field(
        default_factory=dict
    )
    # The highest offset this node has fanned out on the channel. A subscriber's history read can be ahead
    # of it (the publish is in Redis, its fan-out message not yet here): such a subscriber waits in
    # `catching_up` with the offset its subscribe reply reached, skipping publications up to it (it has
    # them), and joins `senders` once the fan-out passes it. Centrifugo skips them the same way.
    offset: int = 0
    catching_up: dict[Subscriber, tuple[int, Subscription]] = field(default_factory=dict)
    # Delta subscribers, off the hot path too: per renderer (a native codec), one delta per publication.
    deltas: dict[Any, _DeltaGroup] = field(default_factory=dict)


def _is_text(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class Node:
    def __init__(self, settings: GatewaySettings, broker: Broker, name: str) -> None:
        self.settings = settings
        self.broker = broker
        self.name = name
        self.id = uuid.uuid4().hex
        self.channels: dict[str, _Channel] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._control_ready = False
        # (clients, users) on this node, for heartbeats: the connection registry's (core/registry.py).
        self.census: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # Server API commands to this node's clients (disconnect, subscribe, unsubscribe): core/control.py.
        self.on_command: ControlHandler | None = None
        # Channel prefixes whose publications another part of the gateway consumes instead of fanning
        # them out to subscribers (collab's documents).
        self._owners: tuple[tuple[str, ChannelOwner], ...] = ()

    # lifecycle

    async def start(self) -> None:
        self.broker.set_handler(self)
        self._ticker = asyncio.create_task(self._tick(), name="gateway-ticker")

    def claim(self, prefix: str, owner: ChannelOwner) -> None:
        """Publications of channels starting with `prefix` go to `owner`, not to subscribers."""
        self._owners = (*self._owners, (prefix, owner))

    async def ensure_control(self) -> None:
        if not self._control_ready:
            await self.broker.subscribe(CONTROL_CHANNEL)
            self._control_ready = True

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    # channels

    async def add_subscriber(self, channel: str, session: Subscriber, subscription: Subscription) -> None:
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

    async def remove_subscriber(self, channel: str, session: Subscriber) -> None:
        state = self.channels.get(channel)
        if state is None or state.subscribers.pop(session, None) is None:
            return
        group = state.senders.get(session.sink.renderer)
        if group is not None:
            group.pop(session, None)
        state.pending.pop(session, None)
        state.filtered.pop(session, None)
        if (deltas := state.deltas.get(session.sink.renderer)) is not None:
            deltas.senders.pop(session, None)
            deltas.fresh.discard(session)
        state.catching_up.pop(session, None)
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
        for prefix, owner in self._owners:
            if channel.startswith(prefix):
                await owner.on_publication(channel, publication)
                return
        state = self.channels.get(channel)
        if state is None:
            return
        delivered = 0
        for renderer, senders in tuple(state.senders.items()):
            if senders:
                frame = renderer.publication_push(channel, publication)
                if not frame:  # nothing for this kind of client (an adapter's channel it does not relay)
                    continue
                for send in list(senders.values()):
                    send(frame)
                delivered += len(senders)
        if state.filtered:
            delivered += self._deliver_filtered(channel, state, publication)
        if state.deltas:
            delivered += self._deliver_deltas(channel, state, publication)
        if state.catching_up:
            delivered += self._catch_up(channel, state, publication)
        if publication.offset > state.offset:
            state.offset = publication.offset
        if delivered:
            DELIVERIES.inc(delivered)
            if publication.time_ms:
                DELIVERY_LAG.observe(max(0.0, time.time() - publication.time_ms / 1000))
        for subscription in state.pending.values():
            subscription.buffer.append(publication)

    def _deliver_filtered(self, channel: str, state: _Channel, publication: Publication) -> int:
        frames: dict[Any, bytes] = {}
        delivered = 0
        tags = publication.tags
        for session, (matches, send) in list(state.filtered.items()):
            if not matches(tags):
                continue
            renderer = session.sink.renderer
            frame = frames.get(renderer)
            if frame is None:
                frame = frames[renderer] = renderer.publication_push(channel, publication)
            if frame:
                send(frame)
                delivered += 1
        return delivered

    def _deliver_deltas(self, channel: str, state: _Channel, publication: Publication) -> int:
        """One delta per renderer against the payload its subscribers hold; those that hold none yet (just
        subscribed or recovered) get the publication in full, and then hold it like the others."""
        delivered = 0
        for renderer, group in state.deltas.items():
            if not group.senders:
                continue
            payload = renderer.delta_base(publication.data)
            delta_frame = b""
            if group.base is not None and len(group.fresh) < len(group.senders):
                delta = fossil.create(group.base, payload)
                # A JSON client gets the delta inside a JSON string: it must be text (a delta of UTF-8
                # text may cut a character in two, then the full payload goes instead).
                if len(delta) < len(payload) and (renderer.binary or _is_text(delta)):
                    delta_frame = renderer.delta_publication_push(channel, publication, delta, True)
            full_frame = b""
            as_delta = 0
            for session, send in list(group.senders.items()):
                if delta_frame and session not in group.fresh:
                    send(delta_frame)
                    as_delta += 1
                else:
                    if not full_frame:
                        full_frame = renderer.delta_publication_push(channel, publication, payload, False)
                    send(full_frame)
            group.fresh.clear()
            group.base = payload
            DELTA_AS_DELTA.inc(as_delta)
            DELTA_IN_FULL.inc(len(group.senders) - as_delta)
            delivered += len(group.senders)
        return delivered

    def _catch_up(self, channel: str, state: _Channel, publication: Publication) -> int:
        delivered = 0
        frames: dict[Any, bytes] = {}
        for session, (through, subscription) in list(state.catching_up.items()):
            if publication.offset <= through:
                if publication.offset == through:
                    self._live(state, session, subscription)
                continue
            matches = subscription.tags_filter
            if matches is None or matches(publication.tags):
                renderer = session.sink.renderer
                frame = frames.get(renderer)
                if frame is None:
                    if subscription.delta:
                        payload = renderer.delta_base(publication.data)
                        frame = renderer.delta_publication_push(channel, publication, payload, False)
                    else:
                        frame = renderer.publication_push(channel, publication)
                    frames[renderer] = frame
                if frame:
                    session.sink.deliver(frame)
                    delivered += 1
            self._live(state, session, subscription)
        return delivered

    def go_live(self, channel: str, session: Subscriber, through: int = 0) -> None:
        """The subscriber has sent its subscribe reply and its buffer: from now on it gets publications.
        `through`: the offset its reply reached (a positioned subscription), whose publications it has."""
        state = self.channels.get(channel)
        if state is not None and (subscription := state.pending.pop(session, None)) is not None:
            if through > state.offset:
                state.catching_up[session] = (through, subscription)
            else:
                self._live(state, session, subscription)

    @staticmethod
    def _live(state: _Channel, session: Subscriber, subscription: Subscription) -> None:
        state.catching_up.pop(session, None)
        sink = session.sink
        if subscription.tags_filter is not None:
            state.filtered[session] = (subscription.tags_filter, sink.deliver)
        elif subscription.delta:
            group = state.deltas.setdefault(sink.renderer, _DeltaGroup())
            group.senders[session] = sink.deliver
            group.fresh.add(session)
        else:
            state.senders.setdefault(sink.renderer, {})[session] = sink.deliver

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        state = self.channels.get(channel)
        if state is None:
            return
        frames: dict[Any, bytes] = {}
        for session, subscription in list(state.subscribers.items()):
            if not subscription.join_leave:
                continue
            if subscription.buffering:
                # After its subscribe reply, as publications are: a subscriber's own join comes this way.
                subscription.buffer.append(PresenceEvent(join, info))
                continue
            sink = session.sink
            renderer = sink.renderer
            frame = frames.get(renderer)
            if frame is None:
                frame = renderer.join_push(channel, info) if join else renderer.leave_push(channel, info)
                frames[renderer] = frame
            if frame:
                sink.deliver(frame)

    async def on_resubscribed(self) -> None:
        """The fan-out link was down, so publications may be missing: recoverable subscribers resubscribe
        (and recover from history); the others are told their state is gone the same way."""
        for _, owner in self._owners:
            try:
                await owner.on_resubscribed()
            except Exception:
                log.exception("%r did not catch up after the fan-out link came back", owner)
        for channel, state in list(self.channels.items()):
            if channel == CONTROL_CHANNEL:
                continue
            for session in list(state.subscribers):
                session.lost_subscription(channel, codes.UNSUBSCRIBE_INSUFFICIENT_STATE, "insufficient state")
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
        if not isinstance(command, dict):
            return
        if command.get("kind") == "heartbeat":
            command["seen"] = time.time()
            self.nodes[command["node_id"]] = command
        elif self.on_command is not None:
            try:
                await self.on_command(command)
            except Exception:
                log.exception("control command %r failed", command.get("kind"))

    # timers: node heartbeats, presence renewal

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
        clients, users = self.census()
        return {
            "kind": "heartbeat",
            "node_id": self.id,
            "name": self.name,
            "num_clients": clients,
            "num_users": users,
            "num_channels": len(self.channels),
            "num_subs": sum(len(s.subscribers) for s in self.channels.values()),
        }

    def _forget_silent_nodes(self) -> None:
        horizon = time.time() - 3 * NODE_HEARTBEAT_SECONDS
        for node_id in [n for n, info in self.nodes.items() if info["seen"] < horizon]:
            del self.nodes[node_id]
