"""`/collab/{doc}`: the y-websocket protocol for stock Yjs clients (y-websocket, pycrdt).

A client of a document is a `Member`: a `/collab/{doc}` socket is one, a Hocuspocus socket on `/collab`
(protocols/hocuspocus.py) one per document it has open; both share everything below.

A connection is admitted by the gateway's one admission function with the token of `?token=` (or its
client certificate), owns an ordinary session in the registry (so a revocation, an expired token, the
server API's disconnect and a drain close it like any other: 3500, 3005, 3503, 3001) and is read by the
one socket loop.

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
log ("Permission denied to access ..."); closing would only make them reconnect and resend. An update
that would take the document past `collab_max_document_bytes` is dropped and told the same way.

Awareness rides on broker channel `collab:{doc}.awareness` (fan-out, no history); a client that
leaves has its awareness states removed (state null, clock + 1), and states not renewed for 30 s are
forgotten as y-protocols does. A connection announces at most `MAX_AWARENESS_CLIENTS` awareness
client ids, each state at most `MAX_AWARENESS_STATE_BYTES`. Every 10 s each client gets an empty
awareness message, as y-websocket clients close a connection that is silent for 30 s.

Close codes of the protocol: 4400 malformed message, 4401 token refused (invalid, expired, revoked),
4403 no read permission, 4413 message too large, 4429 connection limit, 4503 collab or Kafka not
reachable. Stock clients reconnect after any of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from prometheus_client import Counter, Gauge
from pycrdt import Doc, merge_updates
from starlette.websockets import WebSocket
from tsunagu_core import topics
from tsunagu_core.broker import Broker, Publication, PublishOptions, StreamPosition
from tsunagu_core.bus import Bus
from tsunagu_core.envelope import publish_event
from tsunagu_core.tls import client_context
from tsunagu_core.wire.events_pb2 import CollabUpdate

from tsunagu_ws_gateway.channels import Principal
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refusal, Refused
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol import yprotocol as yp
from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession
from tsunagu_ws_gateway.transports.websocket import serve_websocket

log = logging.getLogger("tsunagu.gateway.collab")

PREFIX = "collab:"
AWARENESS_SUFFIX = ".awareness"
UPDATE_EVENT = "collab.update"
KEEPALIVE_SECONDS = 10.0
AWARENESS_TIMEOUT = 30.0
MAX_AWARENESS_CLIENTS = 4
MAX_AWARENESS_STATE_BYTES = 16 * 1024
LOAD_ATTEMPTS = 5
PUBLISH_ATTEMPTS = 5
MAX_MERGED_RUN = 64  # events of a client collab's merges we look for in one publication
_VALID_DOC = re.compile(r"[\w\-.@]{1,200}")
_EMPTY_UPDATE = b"\x00\x00"
# The session of a collab connection subscribes to nothing: documents are fanned out here, not by the hub.
RENDERER = AdapterRenderer("collab", lambda channel, pub: b"")
REFUSAL_CODES = {
    Refusal.INVALID_TOKEN: yp.CLOSE_UNAUTHORIZED,
    Refusal.NO_CREDENTIAL: yp.CLOSE_UNAUTHORIZED,
    Refusal.TOKEN_EXPIRED: yp.CLOSE_UNAUTHORIZED,
    Refusal.REVOKED: yp.CLOSE_UNAUTHORIZED,
    Refusal.ORIGIN: yp.CLOSE_FORBIDDEN,
    Refusal.USER_LIMIT: yp.CLOSE_TOO_MANY,
    Refusal.IP_LIMIT: yp.CLOSE_TOO_MANY,
    Refusal.NODE_LIMIT: yp.CLOSE_TOO_MANY,
    Refusal.CONNECT_RATE: yp.CLOSE_TOO_MANY,
}

COLLAB_CONNECTIONS = Gauge(
    "tsunagu_gateway_collab_connections",
    "Clients of documents on this node (/collab/{doc} sockets, documents of Hocuspocus sockets)",
)
COLLAB_DOCS = Gauge("tsunagu_gateway_collab_documents", "Documents open on this node")
COLLAB_REFUSED = Counter("tsunagu_gateway_collab_refused_updates_total", "Updates dropped from read-only clients")
COLLAB_PUBLISHED = Counter("tsunagu_gateway_collab_published_total", "Update events published to Kafka")


class Unavailable(Exception):
    pass


def collab_client(settings: GatewaySettings, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The one HTTP client of the gateway towards collab (documents' state), with the platform's service
    credential in `headers` (collab's API is internal)."""
    return httpx.AsyncClient(base_url=settings.collab_url, timeout=10.0, verify=client_context(), headers=headers)


@dataclass(eq=False, slots=True)
class OpenDoc:
    name: str
    ydoc: Doc = field(default_factory=Doc)
    connections: set[Member] = field(default_factory=set)
    ready: asyncio.Future[None] | None = None
    loading: bool = True
    buffer: list[Publication] = field(default_factory=list)
    offset: int = 0
    epoch: str = ""
    awareness: dict[int, tuple[int, str, float]] = field(default_factory=dict)  # id -> clock, state, seen
    # At most the encoded document's size (updates applied since it was last measured added up), and the
    # bytes of this node's clients' updates on their way through Kafka and collab.
    size: int = 0
    unconfirmed: int = 0


def valid_document(doc: str) -> bool:
    return bool(_VALID_DOC.fullmatch(doc)) and not doc.endswith(AWARENESS_SUFFIX)


def _channel(doc: str) -> str:
    return PREFIX + doc


def _awareness_channel(doc: str) -> str:
    return PREFIX + doc + AWARENESS_SUFFIX


def _empty_awareness() -> bytes:
    return yp.awareness_message(yp.encode_awareness([]))


def _ignore(frame: bytes) -> None:
    return


def _confirm(conn: Member, update: bytes) -> None:
    """collab published `update` of `conn`'s: tell it which of its events are stored. collab merges a run
    of one client's consecutive events into one update (`merge_updates`, deterministic), so the update is
    that of the oldest events in flight, or their merge."""
    parts: list[bytes] = []
    updates = 0
    for index, (count, part) in enumerate(conn.in_flight):
        if index == MAX_MERGED_RUN:
            break
        parts.append(part)
        updates += count
        if (part if index == 0 else merge_updates(*parts)) == update:
            for _ in range(index + 1):
                conn.in_flight.popleft()
            conn.stored(updates)
            return
    # Not one we recognise (a replay after collab restarted): the oldest is stored at least.
    count, _ = conn.in_flight.popleft()
    conn.stored(count)


class Member:
    """One client of one document: what the document's fan-out sends to and its publisher reads from.
    A /collab/{doc} socket is one; a Hocuspocus socket (protocols/hocuspocus.py) has one per document."""

    def __init__(self, hub: CollabHub, connection: Connection, doc: str) -> None:
        self.hub = hub
        self.connection = connection
        self.transport = connection.transport
        self.doc = doc
        self.id = uuid.uuid4().hex
        self.user = ""
        self.may_write = False
        self.denied = False
        self.state: OpenDoc | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.has_pending = asyncio.Event()
        # The events on their way through Kafka and collab, oldest first: how many client updates each
        # carries, and its update (to tell which ones a publication of collab's confirms).
        self.in_flight: deque[tuple[int, bytes]] = deque()
        self.awareness: dict[int, int] = {}  # client id -> last clock
        self.publisher: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        """A y-websocket message for this client."""
        self.transport.send(frame)

    def close(self, code: int, reason: str) -> None:
        self.transport.close(Disconnect(code, reason[:120]))

    def refused(self, reason: str) -> None:
        """An update of the client's was dropped (read-only, size limit): told once, as y-websocket logs it."""
        if not self.denied:
            self.denied = True
            self.send(yp.permission_denied(reason))

    def stored(self, updates: int) -> None:
        """`updates` of the client's updates are stored (y-websocket has no message for it)."""
        return

    def start(self, state: OpenDoc) -> None:
        """Joined: greet the client with our state vector and the document's awareness, start publishing."""
        self.state = state
        self.send(yp.sync_step1(state.ydoc.get_state()))
        if state.awareness:
            self.send(self.hub.awareness_frame(state))
        self.publisher = asyncio.create_task(self.hub.publish_updates(self), name=f"collab-publisher-{self.id}")

    async def finish(self) -> None:
        """Leave the document; what the client sent before it left still goes to Kafka (briefly waited for)."""
        state, publisher = self.state, self.publisher
        if state is not None:
            await self.hub.leave(self, state)
        if publisher is not None:
            if self.pending and not publisher.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(5.0):
                        while self.pending and not publisher.done():
                            await asyncio.sleep(0.01)
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await publisher


class CollabConnection(Member):
    """One /collab/{doc} socket: the socket loop's handler (core/loop.py) and its document's member."""

    def __init__(self, hub: CollabHub, connection: Connection, doc: str, token: str) -> None:
        super().__init__(hub, connection, doc)
        self.gateway = hub.gateway
        self.token = token
        self.max_frame_bytes = hub.settings.collab_max_message_bytes
        self.adapter = AdapterSession(self.gateway, connection, RENDERER, deliver=_ignore, close=self.transport.close)

    # the socket loop's handler

    async def on_open(self) -> None:
        doc = self.doc
        if not valid_document(doc):
            self.close(yp.CLOSE_BAD_MESSAGE, "invalid document id")
            return
        try:
            admitted = await self.gateway.admission.admit(self.connection.peer, self.token, "collab")
        except Refused as refused:
            code = REFUSAL_CODES.get(refused.refusal, yp.CLOSE_UNAVAILABLE)
            self.close(code, f"unauthorized: {refused.detail}" if code == yp.CLOSE_UNAUTHORIZED else refused.detail)
            return
        may_read, self.may_write = self.hub.access(admitted.principal, doc)
        if not may_read:
            self.close(yp.CLOSE_FORBIDDEN, f"no read permission for {_channel(doc)}")
            return
        self.user = admitted.grant.user
        self.adapter.admitted(admitted)
        try:
            state = await self.hub.join(self)
        except Unavailable as exc:
            self.close(yp.CLOSE_UNAVAILABLE, str(exc))
            return
        self.start(state)

    async def on_frame(self, frame: bytes | str) -> None:
        if isinstance(frame, str):
            self.close(yp.CLOSE_BAD_MESSAGE, "y-protocols messages are binary")
            return
        assert self.state is not None
        try:
            await self.hub.handle(self, self.state, frame)
        except yp.YProtocolError as exc:
            log.info("closing collab:%s client %s: %s", self.doc, self.id, exc)
            self.close(exc.code, str(exc))

    def on_too_large(self, size: int) -> None:
        self.close(yp.CLOSE_TOO_LARGE, f"message larger than {self.max_frame_bytes} bytes")

    async def on_close(self, disconnect: Disconnect) -> None:
        await self.finish()
        await self.adapter.end(disconnect)


class CollabHub:
    """The documents open on this node; the node hands it the publications of `collab:` channels."""

    def __init__(self, gateway: Gateway, bus: Bus, node_name: str, headers: dict[str, str] | None = None) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        # collab's API is internal: the platform's service credential (tsunagu_core.service_auth).
        self.headers = headers or {}
        self.broker: Broker = gateway.broker
        self.bus = bus
        self.node_name = node_name
        self.docs: dict[str, OpenDoc] = {}
        self._http: httpx.AsyncClient | None = None
        self._ticker: asyncio.Task[None] | None = None
        gateway.node.claim(PREFIX, self)

    # lifecycle

    async def start(self) -> None:
        self._http = collab_client(self.settings, self.headers)
        self._ticker = asyncio.create_task(self._tick(), name="collab-keepalive")

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
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
                for conn in list(state.connections):
                    conn.send(frame)

    # what the broker delivers on collab channels (hub.py hands them here)

    async def on_publication(self, channel: str, publication: Publication) -> None:
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

    async def on_resubscribed(self) -> None:
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
        state.size += len(event.update)
        if event.node == self.node_name:
            state.unconfirmed = max(0, state.unconfirmed - len(event.update))
        frame = yp.sync_update(event.update)
        for conn in list(state.connections):
            if conn.id != event.client_id:
                conn.send(frame)
            elif conn.in_flight:
                _confirm(conn, event.update)

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
        for conn in list(state.connections):
            if conn.id != sender:
                conn.send(frame)

    # documents

    async def join(self, conn: Member) -> OpenDoc:
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
            except BaseException:  # cancelled too (a Hocuspocus socket that closes while a document opens)
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
        update = base64.b64decode(body["update"])
        state.ydoc.apply_update(update)
        state.size = len(update)
        state.offset, state.epoch = int(body["offset"]), str(body["epoch"])
        state.loading = False
        buffered, state.buffer = state.buffer, []
        for publication in buffered:
            self._apply(state, publication)

    async def leave(self, conn: Member, state: OpenDoc) -> None:
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

    def access(self, principal: Principal, doc: str) -> tuple[bool, bool]:
        """May `principal` read and write `doc`: the token's grants on channel collab:{doc}, as the
        namespace's options say (read = may subscribe, write = may publish)."""
        policy = self.gateway.policy
        options = policy.namespaces.get("collab")
        channel = _channel(doc)
        read = options.allow_subscribe if options is not None else "claim"
        write = options.allow_publish if options is not None else "claim"
        return policy.allows(read, channel, principal), policy.allows(write, channel, principal)

    async def handle(self, conn: Member, state: OpenDoc, frame: bytes) -> None:
        """One client message; raises YProtocolError when it is malformed or over a bound."""
        await self.dispatch(conn, state, yp.decode_message(frame))

    async def dispatch(self, conn: Member, state: OpenDoc, message: yp.Message) -> None:
        if isinstance(message, yp.SyncMessage):
            if message.step == yp.SYNC_STEP1:
                try:
                    diff = state.ydoc.get_update(message.payload)
                except Exception:
                    raise yp.YProtocolError("malformed state vector in SyncStep1") from None
                conn.send(yp.sync_step2(diff))
            else:
                self._client_update(conn, state, message.payload)
        elif isinstance(message, yp.AwarenessMessage):
            await self._client_awareness(conn, state, message)
        elif isinstance(message, yp.QueryAwarenessMessage):
            conn.send(self.awareness_frame(state))

    async def _client_awareness(self, conn: Member, state: OpenDoc, message: yp.AwarenessMessage) -> None:
        if not conn.connection.rate.admit():
            return  # awareness is a stream of the latest state: a dropped one is superseded by the next
        for entry in message.entries:
            if len(entry.state) > MAX_AWARENESS_STATE_BYTES:
                raise yp.YProtocolError(
                    f"an awareness state is larger than {MAX_AWARENESS_STATE_BYTES} bytes", yp.CLOSE_TOO_LARGE
                )
            if entry.state == "null":
                conn.awareness.pop(entry.client, None)
                continue
            if entry.client not in conn.awareness and len(conn.awareness) >= MAX_AWARENESS_CLIENTS:
                raise yp.YProtocolError(f"more than {MAX_AWARENESS_CLIENTS} awareness clients on one connection")
            conn.awareness[entry.client] = entry.clock
        # Awaited: a client that floods awareness waits for the broker instead of piling up tasks.
        try:
            await self.broker.publish(
                _awareness_channel(state.name), message.update, PublishOptions(tags={"conn": conn.id})
            )
        except Exception as exc:
            log.warning("awareness fan-out of collab:%s failed: %r", state.name, exc)

    def _client_update(self, conn: Member, state: OpenDoc, update: bytes) -> None:
        if update == _EMPTY_UPDATE:
            conn.stored(1)
            return
        try:
            Doc().apply_update(update)
        except Exception:
            raise yp.YProtocolError("malformed Yjs update") from None
        if not conn.may_write:
            COLLAB_REFUSED.inc()
            log.info("dropping an update to collab:%s from read-only user %r", conn.doc, conn.user)
            conn.refused(f"read-only: no write permission for collab:{conn.doc}")
            return
        limit = self.settings.collab_max_document_bytes
        if state.size + state.unconfirmed + len(update) > limit:
            state.size = len(state.ydoc.get_update())  # measured again: the estimate only ever grows
            if state.size + state.unconfirmed + len(update) > limit:
                COLLAB_REFUSED.inc()
                conn.refused(f"collab:{conn.doc} is at its size limit of {limit} bytes")
                return
        state.unconfirmed += len(update)
        if conn.pending_bytes + len(update) > self.settings.send_buffer_bytes:
            # Kafka does not keep up with this client: it reconnects and resyncs (its updates are in its
            # next sync step), instead of growing our buffer.
            raise yp.YProtocolError("updates cannot be stored fast enough; reconnect", yp.CLOSE_UNAVAILABLE)
        conn.pending.append(update)
        conn.pending_bytes += len(update)
        conn.has_pending.set()

    def awareness_frame(self, state: OpenDoc) -> bytes:
        entries = [yp.AwarenessEntry(c, clock, s) for c, (clock, s, _) in state.awareness.items()]
        return yp.awareness_message(yp.encode_awareness(entries))

    async def publish_updates(self, conn: Member) -> None:
        """Send the client's updates to Kafka, merging what gathers while one is in flight."""
        while True:
            await conn.has_pending.wait()
            conn.has_pending.clear()
            batch, conn.pending = conn.pending, []
            conn.pending_bytes = 0
            if not batch:
                continue
            update = batch[0] if len(batch) == 1 else merge_updates(*batch)
            conn.in_flight.append((len(batch), update))
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
                        if conn.state is not None:  # it will not come back: no longer counts towards the cap
                            conn.state.unconfirmed = max(0, conn.state.unconfirmed - sum(map(len, batch)))
                        conn.close(yp.CLOSE_UNAVAILABLE, "updates cannot be stored now; reconnect")
                        return
                    await asyncio.sleep(delay)
                    delay *= 2


async def collab_endpoint(websocket: WebSocket) -> None:
    hub: CollabHub = websocket.app.state.collab
    doc = websocket.path_params.get("doc", "")
    token = websocket.query_params.get("token", "")
    await serve_websocket(
        websocket, "collab", lambda connection: CollabConnection(hub, connection, doc, token), binary=True
    )
