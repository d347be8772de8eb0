"""`/collab/{doc}`: the y-websocket protocol for stock Yjs clients (y-websocket, pycrdt).

Per open document this node keeps one pycrdt Doc, fed only by the broker channel `collab:{doc}`
that the collab service publishes to after it persisted an update. A document opens by subscribing
that channel first (publications are buffered), then loading the state and the channel offset it
includes from collab (`GET /v1/docs/{doc}?format=update`), then applying the buffer: no gap. It is
evicted when its last client leaves.

A client's update goes to Kafka (`tsunagu.collab.updates`, keyed by doc) and reaches every client,
on every replica, once collab has stored it; the sender's other tabs included. Updates a client sends
while one is in flight are merged into one event. A client without write permission (the token may
subscribe `collab:{doc}` but not publish to it) keeps the connection and reads along: its updates are
dropped and it is told once with an auth/permission-denied message, which stock y-websocket clients
log ("Permission denied to access ..."); closing would only make them reconnect and resend.

Awareness rides on broker channel `collab:{doc}.awareness` (fan-out, no history); a client that
leaves has its awareness states removed (state null, clock + 1), and states not renewed for 30 s are
forgotten as y-protocols does. Every 10 s each client gets an empty awareness message, as
y-websocket clients close a connection that is silent for 30 s.

Close codes: 4400 malformed message, 4401 bad token, 4403 no read permission, 4413 message too
large, 4503 collab or Kafka not reachable. Stock clients reconnect after any of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import Counter, Gauge
from pycrdt import Doc, merge_updates
from starlette.websockets import WebSocket, WebSocketDisconnect
from tsunagu_core import topics
from tsunagu_core.broker import Broker, ClientInfo, Publication, PublishOptions, StreamPosition
from tsunagu_core.bus import Bus
from tsunagu_core.envelope import publish_event
from tsunagu_core.tls import client_context
from tsunagu_core.wire.events_pb2 import CollabUpdate

from tsunagu_ws_gateway.channels import Principal
from tsunagu_ws_gateway.protocol import yprotocol as yp
from tsunagu_ws_gateway.protocol.codes import PERMISSION_DENIED, ProtocolError, ReplyError
from tsunagu_ws_gateway.session import Gateway

log = logging.getLogger("tsunagu.gateway.collab")

PREFIX = "collab:"
AWARENESS_SUFFIX = ".awareness"
UPDATE_EVENT = "collab.update"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Bytes queued for one slow client before it is closed (4503; it reconnects and resyncs).
SEND_LIMIT_BYTES = 64 * 1024 * 1024
KEEPALIVE_SECONDS = 10.0
AWARENESS_TIMEOUT = 30.0
LOAD_ATTEMPTS = 5
PUBLISH_ATTEMPTS = 5
_VALID_DOC = re.compile(r"^[\w\-.@]{1,200}$")
_EMPTY_UPDATE = b"\x00\x00"

COLLAB_CONNECTIONS = Gauge("tsunagu_gateway_collab_connections", "Open /collab connections on this node")
COLLAB_DOCS = Gauge("tsunagu_gateway_collab_documents", "Documents open on this node")
COLLAB_REFUSED = Counter("tsunagu_gateway_collab_refused_updates_total", "Updates dropped from read-only clients")
COLLAB_PUBLISHED = Counter("tsunagu_gateway_collab_published_total", "Update events published to Kafka")


class Unavailable(Exception):
    pass


@dataclass(eq=False, slots=True)
class CollabConnection:
    websocket: WebSocket
    doc: str
    user: str
    may_write: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    pending: list[bytes] = field(default_factory=list)
    has_pending: asyncio.Event = field(default_factory=asyncio.Event)
    awareness: dict[int, int] = field(default_factory=dict)  # client id -> last clock
    denied: bool = False
    close_with: tuple[int, str] | None = None

    queued: int = 0

    def send(self, frame: bytes) -> None:
        if self.close_with is None:
            self.queued += len(frame)
            if self.queued > SEND_LIMIT_BYTES:
                self.close(yp.CLOSE_UNAVAILABLE, "client too slow; reconnect")
                return
            self.outbox.put_nowait(frame)

    def close(self, code: int, reason: str) -> None:
        if self.close_with is None:
            self.close_with = (code, reason[:120])
            self.outbox.put_nowait(None)


@dataclass(eq=False, slots=True)
class OpenDoc:
    name: str
    ydoc: Doc = field(default_factory=Doc)
    connections: set[CollabConnection] = field(default_factory=set)
    ready: asyncio.Future[None] | None = None
    loading: bool = True
    buffer: list[Publication] = field(default_factory=list)
    offset: int = 0
    epoch: str = ""
    awareness: dict[int, tuple[int, str, float]] = field(default_factory=dict)  # id -> clock, state, seen


def _channel(doc: str) -> str:
    return PREFIX + doc


def _awareness_channel(doc: str) -> str:
    return PREFIX + doc + AWARENESS_SUFFIX


def _empty_awareness() -> bytes:
    return yp.awareness_message(yp.encode_awareness([]))


class CollabHub:
    """The documents open on this node; sits in front of the node's broker handler for `collab:` channels."""

    def __init__(self, gateway: Gateway, bus: Bus, node_name: str, headers: dict[str, str] | None = None) -> None:
        self.gateway = gateway
        # collab's API is internal: the platform's service credential (tsunagu_core.service_auth).
        self.headers = headers or {}
        self.broker: Broker = gateway.broker
        self.bus = bus
        self.node_name = node_name
        self.docs: dict[str, OpenDoc] = {}
        self._inner: Any = None
        self._http: httpx.AsyncClient | None = None
        self._ticker: asyncio.Task[None] | None = None

    # lifecycle

    async def start(self) -> None:
        self._inner = self.broker.handler
        self.broker.set_handler(self)
        self._http = httpx.AsyncClient(
            base_url=self.gateway.settings.collab_url, timeout=10.0, verify=client_context(), headers=self.headers
        )
        self._ticker = asyncio.create_task(self._tick(), name="collab-keepalive")

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """A service hook: entered after the node started, so it wraps the node's broker handler."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for state in list(self.docs.values()):
            for conn in list(state.connections):
                conn.close(1001, "server shutting down")
        if self._http is not None:
            await self._http.aclose()

    async def _tick(self) -> None:
        frame = _empty_awareness()
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            now = time.monotonic()
            for state in list(self.docs.values()):
                for client, (_, _, seen) in list(state.awareness.items()):
                    if now - seen > AWARENESS_TIMEOUT:
                        state.awareness.pop(client, None)
                for conn in state.connections:
                    conn.send(frame)

    # the broker handler: collab channels here, the rest to the node

    async def on_publication(self, channel: str, publication: Publication) -> None:
        if not channel.startswith(PREFIX):
            if self._inner is not None:
                await self._inner.on_publication(channel, publication)
            return
        if channel.endswith(AWARENESS_SUFFIX):
            state = self.docs.get(channel[len(PREFIX) : -len(AWARENESS_SUFFIX)])
            if state is not None:
                self._on_awareness(state, publication)
            return
        state = self.docs.get(channel[len(PREFIX) :])
        if state is None:
            return
        if state.loading:
            state.buffer.append(publication)
            return
        if state.epoch and publication.epoch == state.epoch and publication.offset > state.offset + 1:
            await self._catch_up(state)
        self._apply(state, publication)

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        if self._inner is not None:
            await self._inner.on_presence(channel, join, info)

    async def on_resubscribed(self) -> None:
        if self._inner is not None:
            await self._inner.on_resubscribed()
        for state in list(self.docs.values()):
            if not state.loading:
                with contextlib.suppress(Exception):
                    await self._catch_up(state)

    async def _catch_up(self, state: OpenDoc) -> None:
        """Publications were missed (a gap in offsets or a lost link): read them from the channel's history."""
        result = await self.broker.history(_channel(state.name), since=StreamPosition(state.offset, state.epoch))
        for publication in result.publications:
            self._apply(state, publication)
        if result.position.epoch != state.epoch:
            log.warning("collab:%s history epoch changed; clients resync on their next sync step", state.name)
            state.epoch = result.position.epoch

    def _apply(self, state: OpenDoc, publication: Publication) -> None:
        if publication.offset:
            if publication.epoch == state.epoch and publication.offset <= state.offset:
                return  # already in the loaded state
            state.offset, state.epoch = publication.offset, publication.epoch
        try:
            event = CollabUpdate.FromString(publication.data)
            state.ydoc.apply_update(event.update)
        except Exception as exc:
            log.warning("ignoring a bad publication on collab:%s: %r", state.name, exc)
            return
        frame = yp.sync_update(event.update)
        for conn in state.connections:
            if conn.id != event.client_id:
                conn.send(frame)

    def _on_awareness(self, state: OpenDoc, publication: Publication) -> None:
        try:
            entries = yp.decode_awareness(publication.data)
        except yp.YProtocolError:
            return
        now = time.monotonic()
        for entry in entries:
            if entry.state == "null":
                state.awareness.pop(entry.client, None)
            else:
                state.awareness[entry.client] = (entry.clock, entry.state, now)
        frame = yp.awareness_message(publication.data)
        sender = publication.tags.get("conn", "")
        for conn in state.connections:
            if conn.id != sender:
                conn.send(frame)

    # documents

    async def join(self, conn: CollabConnection) -> OpenDoc:
        state = self.docs.get(conn.doc)
        if state is None:
            state = OpenDoc(conn.doc, ready=asyncio.get_running_loop().create_future())
            self.docs[conn.doc] = state
            COLLAB_DOCS.set(len(self.docs))
            state.connections.add(conn)
            assert state.ready is not None
            try:
                await self._load(state)
            except BaseException as exc:
                state.ready.set_exception(Unavailable(str(exc)))
                state.ready.exception()
                state.connections.clear()
                await self._evict(state)
                raise Unavailable(f"document not available: {exc}") from None
            state.ready.set_result(None)
        else:
            state.connections.add(conn)
            assert state.ready is not None
            try:
                await asyncio.shield(state.ready)
            except Exception:
                state.connections.discard(conn)
                raise
        COLLAB_CONNECTIONS.inc()
        return state

    async def _load(self, state: OpenDoc) -> None:
        await self.broker.subscribe(_channel(state.name))
        await self.broker.subscribe(_awareness_channel(state.name))
        assert self._http is not None
        delay = 0.2
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                response = await self._http.get(f"/v1/docs/{state.name}", params={"format": "update"})
                response.raise_for_status()
                break
            except (httpx.HTTPError, OSError) as exc:
                if attempt == LOAD_ATTEMPTS:
                    raise Unavailable(f"collab did not answer: {exc}") from None
                await asyncio.sleep(delay)
                delay *= 2
        body = response.json()
        state.ydoc.apply_update(base64.b64decode(body["update"]))
        state.offset, state.epoch = int(body["offset"]), str(body["epoch"])
        state.loading = False
        buffered, state.buffer = state.buffer, []
        for publication in buffered:
            self._apply(state, publication)

    async def leave(self, conn: CollabConnection, state: OpenDoc) -> None:
        if conn not in state.connections:
            return
        state.connections.discard(conn)
        COLLAB_CONNECTIONS.dec()
        if conn.awareness:
            gone = [yp.AwarenessEntry(client, clock + 1, "null") for client, clock in conn.awareness.items()]
            for entry in gone:
                state.awareness.pop(entry.client, None)
            with contextlib.suppress(Exception):
                await self.broker.publish(_awareness_channel(state.name), yp.encode_awareness(gone), PublishOptions())
        if not state.connections:
            await self._evict(state)

    async def _evict(self, state: OpenDoc) -> None:
        if self.docs.get(state.name) is state and not state.connections:
            del self.docs[state.name]
            COLLAB_DOCS.set(len(self.docs))
            for channel in (_channel(state.name), _awareness_channel(state.name)):
                with contextlib.suppress(Exception):
                    await self.broker.unsubscribe(channel)

    # what a client sends

    def handle(self, conn: CollabConnection, state: OpenDoc, frame: bytes) -> None:
        """One client message; raises YProtocolError when it is malformed."""
        message = yp.decode_message(frame)
        if isinstance(message, yp.SyncMessage):
            if message.step == yp.SYNC_STEP1:
                try:
                    diff = state.ydoc.get_update(message.payload)
                except Exception:
                    raise yp.YProtocolError("malformed state vector in SyncStep1") from None
                conn.send(yp.sync_step2(diff))
            else:
                self._client_update(conn, message.payload)
        elif isinstance(message, yp.AwarenessMessage):
            for entry in message.entries:
                conn.awareness[entry.client] = entry.clock
                if entry.state == "null":
                    conn.awareness.pop(entry.client, None)
            channel = _awareness_channel(state.name)
            task = asyncio.create_task(
                self.broker.publish(channel, message.update, PublishOptions(tags={"conn": conn.id}))
            )
            task.add_done_callback(_log_failure)
        elif isinstance(message, yp.QueryAwarenessMessage):
            conn.send(self.awareness_frame(state))

    def _client_update(self, conn: CollabConnection, update: bytes) -> None:
        if update == _EMPTY_UPDATE:
            return
        try:
            Doc().apply_update(update)
        except Exception:
            raise yp.YProtocolError("malformed Yjs update") from None
        if not conn.may_write:
            COLLAB_REFUSED.inc()
            log.info("dropping an update to collab:%s from read-only user %r", conn.doc, conn.user)
            if not conn.denied:
                conn.denied = True
                conn.send(yp.permission_denied(f"read-only: no write permission for collab:{conn.doc}"))
            return
        conn.pending.append(update)
        conn.has_pending.set()

    def awareness_frame(self, state: OpenDoc) -> bytes:
        entries = [yp.AwarenessEntry(c, clock, s) for c, (clock, s, _) in state.awareness.items()]
        return yp.awareness_message(yp.encode_awareness(entries))

    async def publish_updates(self, conn: CollabConnection) -> None:
        """Send the client's updates to Kafka, merging what gathers while one is in flight."""
        while True:
            await conn.has_pending.wait()
            conn.has_pending.clear()
            batch, conn.pending = conn.pending, []
            if not batch:
                continue
            update = batch[0] if len(batch) == 1 else merge_updates(*batch)
            event = CollabUpdate(doc=conn.doc, update=update, client_id=conn.id, user_id=conn.user, node=self.node_name)
            delay = 0.1
            for attempt in range(1, PUBLISH_ATTEMPTS + 1):
                try:
                    await publish_event(
                        self.bus,
                        topics.COLLAB_UPDATES,
                        UPDATE_EVENT,
                        event,
                        key=conn.doc,
                        source=f"ws-gateway/{self.node_name}",
                    )
                    COLLAB_PUBLISHED.inc()
                    break
                except Exception as exc:
                    if attempt == PUBLISH_ATTEMPTS:
                        log.warning("collab:%s: update not accepted by the bus: %r", conn.doc, exc)
                        conn.close(yp.CLOSE_UNAVAILABLE, "updates cannot be stored now; reconnect")
                        return
                    await asyncio.sleep(delay)
                    delay *= 2

    # permissions

    async def permissions(self, token: str, doc: str) -> tuple[str, bool, bool]:
        """(user, may read, may write) for `collab:{doc}`; raises ProtocolError/ReplyError on a bad token."""
        gateway = self.gateway
        if token:
            grant = await gateway.verifier.verify_connection(token)
            if gateway.revoked.revokes(grant):
                raise ReplyError(PERMISSION_DENIED, "the token was revoked")
            who = Principal(grant.user, grant.channel_patterns, authenticated=True)
        elif gateway.settings.allow_anonymous:
            who = Principal("")
        else:
            raise ReplyError(PERMISSION_DENIED, "a token is required (?token=)")
        options = gateway.policy.namespaces.get("collab")
        read_access = options.allow_subscribe if options is not None else "claim"
        write_access = options.allow_publish if options is not None else "claim"
        channel = _channel(doc)
        return who.user, _allowed(gateway, read_access, channel, who), _allowed(gateway, write_access, channel, who)


def _allowed(gateway: Gateway, access: Any, channel: str, who: Principal) -> bool:
    try:
        gateway.policy.check(access, channel, who)
    except ReplyError:
        return False
    return True


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("awareness fan-out failed: %r", task.exception())


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code=code, reason=reason[:120])


async def collab_endpoint(websocket: WebSocket) -> None:
    hub: CollabHub = websocket.app.state.collab
    doc = websocket.path_params.get("doc", "")
    await websocket.accept()
    if not _VALID_DOC.match(doc) or doc.endswith(AWARENESS_SUFFIX):
        await _close(websocket, yp.CLOSE_BAD_MESSAGE, "invalid document id")
        return
    try:
        user, may_read, may_write = await hub.permissions(websocket.query_params.get("token", ""), doc)
    except (ProtocolError, ReplyError) as exc:
        await _close(websocket, yp.CLOSE_UNAUTHORIZED, f"unauthorized: {exc}")
        return
    if not may_read:
        await _close(websocket, yp.CLOSE_FORBIDDEN, f"no read permission for collab:{doc}")
        return
    conn = CollabConnection(websocket, doc, user, may_write)
    try:
        state = await hub.join(conn)
    except Unavailable as exc:
        await _close(websocket, yp.CLOSE_UNAVAILABLE, str(exc))
        return
    conn.send(yp.sync_step1(state.ydoc.get_state()))
    if state.awareness:
        conn.send(hub.awareness_frame(state))
    writer = asyncio.create_task(_write(conn), name=f"collab-writer-{conn.id}")
    publisher = asyncio.create_task(hub.publish_updates(conn), name=f"collab-publisher-{conn.id}")
    reader = asyncio.create_task(_read(hub, conn, state), name=f"collab-reader-{conn.id}")
    try:
        await asyncio.wait((writer, reader, publisher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        reader.cancel()
        await hub.leave(conn, state)
        # What the client sent before it left still goes to Kafka (briefly waited for).
        if conn.pending and not publisher.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(5.0):
                    while conn.pending and not publisher.done():
                        await asyncio.sleep(0.01)
        publisher.cancel()
        if conn.close_with is None:
            conn.close(1000, "")
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(5.0):
                await writer
        writer.cancel()


async def _read(hub: CollabHub, conn: CollabConnection, state: OpenDoc) -> None:
    websocket = conn.websocket
    while True:
        try:
            message = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            conn.close(yp.CLOSE_BAD_MESSAGE, "y-protocols messages are binary")
            return
        if len(data) > MAX_MESSAGE_BYTES:
            conn.close(yp.CLOSE_TOO_LARGE, f"message larger than {MAX_MESSAGE_BYTES} bytes")
            return
        try:
            hub.handle(conn, state, data)
        except yp.YProtocolError as exc:
            log.info("closing collab:%s client %s: %s", conn.doc, conn.id, exc)
            conn.close(exc.code, str(exc))
            return


async def _write(conn: CollabConnection) -> None:
    websocket = conn.websocket
    try:
        while True:
            frame = await conn.outbox.get()
            if frame is None:
                break
            conn.queued -= len(frame)
            await websocket.send_bytes(frame)
    except Exception:
        return
    code, reason = conn.close_with or (1000, "")
    await _close(websocket, code, reason)
