"""`/collab` (no document in the path): many Yjs documents over one WebSocket, Hocuspocus v2 framing, so a
stock `@hocuspocus/provider` (one `HocuspocusProviderWebsocket`, a `HocuspocusProvider` per document)
works unchanged. Framing: protocol/hocuspocus.py.

Each document of the socket is a `Member` of the same documents as `/collab/{doc}` (protocols/collab.py):
one fan-out, one Kafka path through collab, one permission rule, so both kinds of client converge.

A document opens with its first message: an auth message carries the token (provider option `token`),
any other message uses the connection's credential (`?token=`, else the token that admitted it, else the
client certificate or anonymity). The first token admitted makes the socket's session (limits,
revocation, expiry, the server API's disconnect close the whole socket, as on `/collab/{doc}`); a
document opened with another token must be the same user's. The token's grants on `collab:{doc}` decide:
no read -> PermissionDenied for that document only (the provider gives that one up; the others go on);
read -> Authenticated `readonly`, read and write -> `read-write`. Messages that arrive while a document
opens wait, in order, and are handled once it is open.

Every update a client sends is answered with a sync status once it is settled: 1 when collab has stored
it (its event came back on `collab:{doc}`), 0 when it was dropped (read-only, size limit); the provider's
`hasUnsyncedChanges` means "not yet stored". A close message leaves the document; when the client has
left its last one the socket closes (1000), as Hocuspocus does. Stateless messages are accepted and
dropped (there are no stateless hooks here).

Errors: a document refused (permission, token, invalid name, more than
`collab_max_documents_per_connection` open) gets PermissionDenied with the reason; a malformed frame
closes the socket with 4400 and the reason (naming the document), a frame over
`collab_max_message_bytes` with 4413, collab or Kafka unreachable with 4503 (the provider reconnects and
resyncs every document).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket

from tsunagu_ws_gateway.channels import Principal
from tsunagu_ws_gateway.core.refusals import Refusal, Refused
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol import hocuspocus as hp
from tsunagu_ws_gateway.protocol import yprotocol as yp
from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession
from tsunagu_ws_gateway.protocols.collab import CollabHub, Member, Unavailable, valid_document
from tsunagu_ws_gateway.transports.websocket import serve_websocket

log = logging.getLogger("tsunagu.gateway.hocuspocus")

PROTOCOL = "hocuspocus"
RENDERER = AdapterRenderer(PROTOCOL, lambda channel, pub: b"")
# Messages a document may gather while it opens (a provider sends three or four).
MAX_QUEUED = 256


def _ignore(frame: bytes) -> None:
    return


class Document(Member):
    """One document of a Hocuspocus socket."""

    def __init__(self, socket: HocuspocusConnection, doc: str, by_auth: bool) -> None:
        super().__init__(socket.hub, socket.connection, doc)
        self.prefix = hp.prefix(doc)
        self.by_auth = by_auth
        # Messages that came while the document opens; None once it is open.
        self.queue: list[hp.Message] | None = []
        self.opening: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        self.transport.send(self.prefix + frame)

    def refused(self, reason: str) -> None:
        self.transport.send(hp.sync_status(self.doc, False))

    def stored(self, updates: int) -> None:
        frame = hp.sync_status(self.doc, True)
        for _ in range(updates):
            self.transport.send(frame)


class HocuspocusConnection:
    """One Hocuspocus socket: the socket loop's handler (core/loop.py) and the documents it has open."""

    def __init__(self, hub: CollabHub, connection: Connection, token: str) -> None:
        self.hub = hub
        self.gateway = hub.gateway
        self.connection = connection
        self.transport = connection.transport
        self.query_token = token
        self.max_frame_bytes = hub.settings.collab_max_message_bytes
        self.max_documents = hub.settings.collab_max_documents_per_connection
        self.docs: dict[str, Document] = {}
        # Documents refused on this socket: their messages are dropped until a new auth message asks again.
        self.refused: set[str] = set()
        self.adapter = AdapterSession(self.gateway, connection, RENDERER, deliver=_ignore, close=self.transport.close)
        self._admitting = asyncio.Lock()
        self._session_token: str | None = None
        self._principal: Principal | None = None
        self._user = ""

    def close(self, code: int, reason: str) -> None:
        self.transport.close(Disconnect(code, reason[:120]))

    # the socket loop's handler

    async def on_open(self) -> None:
        return  # documents open with their first message

    async def on_frame(self, frame: bytes | str) -> None:
        if isinstance(frame, str):
            self.close(yp.CLOSE_BAD_MESSAGE, "Hocuspocus messages are binary")
            return
        try:
            message = hp.decode(frame)
        except hp.HocuspocusError as exc:
            log.info("closing hocuspocus client %s: %s", self.adapter.session.id, exc)
            self.close(exc.code, str(exc))
            return
        name = message.document
        doc = self.docs.get(name)
        if doc is None:
            self._open(message)
        elif doc.queue is not None:
            if len(doc.queue) >= MAX_QUEUED:
                self.close(yp.CLOSE_TOO_MANY, f"document {name!r}: more than {MAX_QUEUED} messages while it opens")
                return
            doc.queue.append(message)
        else:
            await self._handle(doc, message)

    def on_too_large(self, size: int) -> None:
        self.close(yp.CLOSE_TOO_LARGE, f"message larger than {self.max_frame_bytes} bytes")

    async def on_close(self, disconnect: Disconnect) -> None:
        for doc in list(self.docs.values()):
            await self._leave(doc)
        await self.adapter.end(disconnect)

    # documents

    def _open(self, message: hp.Message) -> None:
        name = message.document
        by_auth = isinstance(message, hp.AuthMessage)
        if isinstance(message, hp.CloseMessage) or (name in self.refused and not by_auth):
            return
        if not valid_document(name):
            self._refuse(name, "invalid document name")
            return
        if len(self.docs) >= self.max_documents:
            self._refuse(name, f"more than {self.max_documents} documents on one connection")
            return
        self.refused.discard(name)
        doc = Document(self, name, by_auth)
        self.docs[name] = doc
        if isinstance(message, hp.AuthMessage):
            token = message.token
        else:
            token = self.query_token or self._session_token or ""
            assert doc.queue is not None
            doc.queue.append(message)
        doc.opening = asyncio.create_task(self._establish(doc, token), name=f"hocuspocus-open-{doc.id}")

    def _refuse(self, name: str, reason: str) -> None:
        log.info("hocuspocus client %s: document %r refused: %s", self.adapter.session.id, name, reason)
        self.refused.add(name)
        self.transport.send(hp.permission_denied(name, reason[:500]))

    async def _principal_of(self, token: str) -> tuple[Principal, str]:
        """Who `token` is: the first one admitted makes the socket's session; another must be its user's."""
        async with self._admitting:
            if self._principal is None:
                admitted = await self.gateway.admission.admit(self.connection.peer, token, PROTOCOL)
                self.adapter.admitted(admitted)
                self._session_token, self._principal, self._user = token, admitted.principal, admitted.grant.user
                return admitted.principal, admitted.grant.user
            if token == self._session_token:
                return self._principal, self._user
        granted = await self.gateway.admission.grant(self.connection.peer, token, PROTOCOL)
        if granted.grant.user != self._user:
            raise Refused(Refusal.INVALID_TOKEN, "the token is another user's than the connection's")
        return granted.principal, granted.grant.user

    async def _establish(self, doc: Document, token: str) -> None:
        try:
            await self._open_document(doc, token)
        except asyncio.CancelledError:
            raise
        except yp.YProtocolError as exc:
            log.info("closing hocuspocus client %s: %s", self.adapter.session.id, exc)
            self.close(exc.code, f"document {doc.doc!r}: {exc}")
        except Exception:
            log.exception("opening document %r of hocuspocus client %s failed", doc.doc, self.adapter.session.id)
            self.transport.close(codes.SERVER_ERROR)

    async def _open_document(self, doc: Document, token: str) -> None:
        name = doc.doc
        try:
            principal, user = await self._principal_of(token)
        except Refused as refused:
            self._forget(doc)
            self._refuse(name, f"unauthorized: {refused.detail}" if refused.detail else "unauthorized")
            return
        may_read, may_write = self.hub.access(principal, name)
        if not may_read:
            self._forget(doc)
            self._refuse(name, f"no read permission for collab:{name}")
            return
        doc.user, doc.may_write = user, may_write
        if doc.by_auth:
            self.transport.send(hp.authenticated(name, read_only=not may_write))
        try:
            state = await self.hub.join(doc)
        except Unavailable as exc:
            self._forget(doc)
            self.close(yp.CLOSE_UNAVAILABLE, str(exc))
            return
        doc.start(state)
        # Appended to while this awaits: handled in order, until none is left.
        assert doc.queue is not None
        while doc.queue:
            await self._handle(doc, doc.queue.pop(0))
            if self.transport.closing is not None or self.docs.get(name) is not doc:
                return
        doc.queue = None

    def _forget(self, doc: Document) -> None:
        if self.docs.get(doc.doc) is doc:
            del self.docs[doc.doc]

    async def _leave(self, doc: Document) -> None:
        self._forget(doc)
        opening = doc.opening
        if opening is not None and not opening.done() and opening is not asyncio.current_task():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await opening
        await doc.finish()

    async def _handle(self, doc: Document, message: hp.Message) -> None:
        """A message of an open document; a malformed or over-bound one closes the socket."""
        if isinstance(message, hp.DocumentMessage):
            assert doc.state is not None
            try:
                await self.hub.dispatch(doc, doc.state, message.message)
            except yp.YProtocolError as exc:
                log.info("closing hocuspocus client %s: document %r: %s", self.adapter.session.id, doc.doc, exc)
                self.close(exc.code, f"document {doc.doc!r}: {exc}")
        elif isinstance(message, hp.CloseMessage):
            await self._leave(doc)
            if not self.docs:
                self.close(1000, "provider_initiated")
        # An auth message for an open document (a provider recreated quickly), stateless messages and sync
        # statuses need nothing.


async def hocuspocus_endpoint(websocket: WebSocket) -> None:
    hub: CollabHub = websocket.app.state.collab
    token = websocket.query_params.get("token", "")
    await serve_websocket(
        websocket, PROTOCOL, lambda connection: HocuspocusConnection(hub, connection, token), binary=True
    )
