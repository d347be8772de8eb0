"""The FHIR endpoints under `/fhir` (docs/fhir.md is the client-facing reference).

- `GET|POST /fhir/Subscription/{id}/$get-ws-binding-token`, and `/fhir/Subscription/$get-ws-binding-token`
  with `id` parameters: Bearer = a gateway connection JWT whose user may subscribe channel `fhir:{id}`
  (each of them); answers a Parameters (token, expiration, subscription..., websocket-url).
- `GET /fhir/ws`: the websocket. `bind-with-token: <token>` binds (a handshake bundle per subscription
  first, then event notifications and heartbeats), `unbind-with-token: <token>` unbinds. The
  subscriptions of a token are an ordinary client session (protocols/base.py, a `Link` here) connected with
  the JWT (or client certificate) the token was issued for, admitted by the gateway's one admission
  function, and subscribed to their `fhir:{id}` channels, so expiry and
  revocation of that JWT end the binding as they end any connection, and a bind recovers from the
  channel's history what was published while it was being set up.
- `POST /fhir/notify`: a FHIR server's rest-hook delivery (`X-API-Key` or the `fhir_notify_secret`
  bearer): a valid event-notification is published to `fhir:{id}`, once per event numbers.
- `GET|POST /fhir/Subscription/{id}/$events`: the event notifications still kept in `fhir:{id}`'s
  history, as one query-event bundle (`eventsSinceNumber`, `eventsUntilNumber`, `content`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import Counter, Gauge
from starlette.websockets import WebSocket
from tsunagu_core.broker import BrokerError, Publication, StreamPosition

from tsunagu_ws_gateway.channels import Principal
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import Reply
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import Disconnect, ProtocolError, ReplyError
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession, error_text
from tsunagu_ws_gateway.protocols.fhir import model
from tsunagu_ws_gateway.protocols.fhir.binding import BindingRecord, BindingTokens, expiry
from tsunagu_ws_gateway.protocols.fhir.commands import Command, CommandError, parse_command
from tsunagu_ws_gateway.protocols.fhir.model import FhirError, Notification, StatusSpec
from tsunagu_ws_gateway.tokens import ConnectionGrant
from tsunagu_ws_gateway.transports.http import BodyTooLarge, read_body
from tsunagu_ws_gateway.transports.websocket import serve_websocket

log = logging.getLogger("tsunagu.gateway.fhir")

NAMESPACE = "fhir"
NOTIFICATIONS = Counter(
    "tsunagu_gateway_fhir_notifications_total",
    "Rest-hook deliveries at /fhir/notify, by outcome (published, duplicate, refused, failed, or the type ignored)",
    ["outcome"],
)
SENT = Counter(
    "tsunagu_gateway_fhir_sent_total", "Bundles sent on /fhir/ws sockets, by SubscriptionStatus.type", ["type"]
)
BINDINGS = Gauge("tsunagu_gateway_fhir_bindings", "Subscriptions bound on this node's /fhir/ws sockets")
BINDING_TOKENS = Counter(
    "tsunagu_gateway_fhir_binding_tokens_total", "$get-ws-binding-token answers, by HTTP status", ["status"]
)
# A rest-hook delivery is at most this big, and never more than half a socket's send buffer (a
# bigger one would cut every subscriber off as slow, 3008, when it is relayed).
MAX_NOTIFICATION_BYTES = 4 * 1024 * 1024
MAX_OPERATION_BYTES = 64 * 1024
UNBOUND = codes.Disconnect(3000, "unbound")


def channel_of(subscription_id: str) -> str:
    if not model.FHIR_ID.match(subscription_id):
        raise FhirError(400, "invalid", f"{subscription_id[:70]!r} is not a FHIR id")
    return f"{NAMESPACE}:{subscription_id}"


def fhir_response(resource: Mapping[str, Any], version: str, status: int = 200) -> Response:
    return Response(orjson.dumps(resource), status_code=status, media_type=model.media_type(version))


def error_response(exc: FhirError, version: str = model.R5) -> Response:
    response = fhir_response(exc.outcome(), version, exc.status)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


# what the channel carries, rendered once per node and FHIR version


def relay_body(data: bytes, version: str) -> tuple[int, bytes] | None:
    """(last event number, the bundle for a client of `version`) of a kept publication, or None
    for what is no event notification. Kept bundles were validated when they were published."""
    notification = model.parse_notification(orjson.loads(data), check=False)
    if notification.type != model.EVENT_NOTIFICATION:
        return None
    bundle = model.translate(notification, version)
    if bundle is notification.bundle:
        return notification.last_event, data
    return notification.last_event, orjson.dumps(bundle)


def frame_of(channel: str, epoch: str, offset: int, data: bytes, version: str) -> bytes:
    """`<channel>\\n<epoch>\\n<offset>\\n<last event>\\n<bundle>` for a Link, or b"" (nothing to send)."""
    if not channel.startswith(NAMESPACE + ":"):
        return b""  # a server-side subscription the JWT's `subs` claim made: nothing for FHIR clients
    try:
        body = relay_body(data, version)
    except (FhirError, orjson.JSONDecodeError) as exc:
        log.warning("%s: publication %s is no notification to relay: %s", channel, offset, exc)
        return b""
    except Exception:  # the hub calls this on its hot path: never let it raise
        log.exception("%s: publication %s could not be rendered", channel, offset)
        return b""
    if body is None:
        return b""
    number, bundle = body
    return b"%s\n%s\n%d\n%d\n" % (channel.encode(), epoch.encode(), offset, number) + bundle


def render_for(version: str) -> Callable[[str, Publication], bytes]:
    def render(channel: str, publication: Publication) -> bytes:
        return frame_of(channel, publication.epoch, publication.offset, publication.data, version)

    return render


RENDERERS = {version: AdapterRenderer("fhir", render_for(version)) for version in model.VERSIONS}


async def _body(request: Request, limit: int) -> bytes:
    try:
        return await read_body(request, limit)
    except BodyTooLarge as exc:
        raise FhirError(413, "too-costly", str(exc)) from None


class FhirService:
    def __init__(self, gateway: Gateway, settings: GatewaySettings) -> None:
        self.gateway = gateway
        self.settings = settings
        self.tokens = BindingTokens(gateway.broker, settings.fhir_binding_token_ttl)
        self.max_notification_bytes = min(MAX_NOTIFICATION_BYTES, settings.send_buffer_bytes // 2)
        self._loaded: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        """fhir.resources imported (in a thread, once), so the first validation does not stall the loop."""
        if self._loaded is None:
            self._loaded = asyncio.create_task(asyncio.to_thread(model.load))
        await asyncio.shield(self._loaded)

    # who may

    async def grant_of(self, request: Request) -> tuple[ConnectionGrant, str, str]:
        """(grant, JWT, certificate fingerprint) of the Bearer JWT, or else of the client certificate,
        admitted by the gateway's one admission function; FhirError 401 when it says no."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        peer = Peer.of(request.scope)
        if not token and peer.certificate is None:
            raise FhirError(401, "login", "an Authorization: Bearer <connection token> header is required")
        try:
            admitted = await self.gateway.admission.grant(peer, token, "fhir")
        except Refused as refused:
            raise FhirError(401, "security", f"the bearer token is not accepted: {refused.detail}") from None
        certificate = peer.certificate.fingerprint if admitted.credential == "certificate" and peer.certificate else ""
        return admitted.grant, token, certificate

    def check_may_subscribe(self, grant: ConnectionGrant, subscription_id: str) -> None:
        """FhirError 400 for no FHIR id, 403 unless the grant's user may subscribe `fhir:{id}`."""
        channel = channel_of(subscription_id)
        policy = self.gateway.policy
        try:
            options = policy.options(channel)
            who = Principal(grant.user, grant.channel_patterns, authenticated=True)
            policy.check(options.allow_subscribe, channel, who)
        except ReplyError as exc:
            raise FhirError(403, "forbidden", f"user {grant.user!r} may not subscribe {channel}: {exc}") from None

    def version_of(self, request: Request, *headers: str, status: int = 406) -> str:
        asked = model.negotiate(
            request.query_params.get("_fhirVersion"), *(request.headers.get(h) for h in headers), status=status
        )
        return asked or model.R5

    async def operation_parameters(self, request: Request, version: str) -> list[tuple[str, Any]]:
        """An operation's parameters: the query's, then a POSTed Parameters body's."""
        found: list[tuple[str, Any]] = [(k, v) for k, v in request.query_params.multi_items() if k != "_fhirVersion"]
        if request.method == "POST":
            body = await _body(request, MAX_OPERATION_BYTES)
            if body.strip():
                try:
                    parameters = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise FhirError(400, "structure", f"the body is not JSON: {exc}") from None
                await self.ready()
                found += model.parameter_values(parameters, version)
        return found

    # $get-ws-binding-token

    async def binding_token(self, request: Request, subscription_id: str | None = None) -> Response:
        version = model.R5
        try:
            version = self.version_of(request, "accept", "content-type")
            grant, jwt, certificate = await self.grant_of(request)
            if subscription_id is not None:
                subscriptions = [subscription_id]  # at the instance level `id` parameters are ignored
            else:
                named = [str(v) for k, v in await self.operation_parameters(request, version) if k == "id"]
                subscriptions = list(dict.fromkeys(i for value in named for i in value.split(",") if i))
                if not subscriptions:
                    raise FhirError(400, "required", "name the subscriptions with `id` parameters")
                if len(subscriptions) > self.settings.max_channels_per_client:
                    raise FhirError(400, "too-costly", "too many subscriptions for one token")
            for subscription in subscriptions:
                self.check_may_subscribe(grant, subscription)
            await self.ready()
            expires_at = expiry(time.time(), self.settings.fhir_binding_token_ttl, grant.expires_at)
            record = BindingRecord(tuple(subscriptions), grant.user, jwt, version, expires_at, certificate)
            token = await self.tokens.issue(record)
            url = self.settings.fhir_websocket_url or str(
                request.url.replace(scheme="wss" if request.url.scheme == "https" else "ws", path="/fhir/ws", query="")
            )
            parameters = model.binding_parameters(version, token, expires_at, subscriptions, url)
            model.validate(parameters, version)
            BINDING_TOKENS.labels("200").inc()
            return fhir_response(parameters, version)
        except FhirError as exc:
            BINDING_TOKENS.labels(str(exc.status)).inc()
            return error_response(exc, version)
        except BrokerError as exc:
            BINDING_TOKENS.labels("503").inc()
            return error_response(FhirError(503, "transient", f"binding tokens cannot be stored now: {exc}"), version)

    async def type_binding_token(self, request: Request) -> Response:
        return await self.binding_token(request, None)

    # $events

    async def events(self, request: Request, subscription_id: str) -> Response:
        version = model.R5
        try:
            version = self.version_of(request, "accept", "content-type")
            grant, _, _ = await self.grant_of(request)
            self.check_may_subscribe(grant, subscription_id)
            parameters = dict(await self.operation_parameters(request, version))
            since = _number_parameter(parameters, "eventsSinceNumber")
            until = _number_parameter(parameters, "eventsUntilNumber")
            content = str(parameters.get("content") or "full-resource")
            if content not in model.CONTENTS:
                raise FhirError(400, "invalid", f"content must be one of {', '.join(model.CONTENTS)}")
            await self.ready()
            kept = await self.kept_notifications(channel_of(subscription_id))
            bundle = model.events_bundle(subscription_id, kept, version, since, until, content)
            try:
                model.validate(bundle, version)
            except FhirError:
                # Resources of the other FHIR version that are not valid in this one: left out, as
                # in what the websocket sends (model.translate).
                bundle = model.events_bundle(subscription_id, kept, version, since, until, "id-only")
                model.validate(bundle, version)
            return fhir_response(bundle, version)
        except FhirError as exc:
            return error_response(exc, version)
        except BrokerError as exc:
            return error_response(FhirError(503, "transient", f"the history cannot be read now: {exc}"), version)

    async def kept_notifications(self, channel: str) -> list[Notification]:
        options = self.gateway.policy.options(channel)
        history = await self.gateway.broker.history(channel, meta_ttl=options.meta_ttl)
        kept = []
        for publication in history.publications:
            with contextlib.suppress(FhirError, orjson.JSONDecodeError):
                kept.append(model.parse_notification(orjson.loads(publication.data), check=False))
        return kept

    # rest-hook deliveries

    def check_notifier(self, request: Request) -> None:
        api_key, secret = self.settings.api_key, self.settings.fhir_notify_secret
        if not api_key and not secret:
            raise FhirError(
                503, "not-supported", "notifications are off: set TSUNAGU_GATEWAY_API_KEY or ..._FHIR_NOTIFY_SECRET"
            )
        given_key = request.headers.get("x-api-key", "")
        if api_key and given_key and hmac.compare_digest(given_key.encode(), api_key.encode()):
            return
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if secret and scheme.lower() == "bearer" and hmac.compare_digest(bearer.strip().encode(), secret.encode()):
            return
        raise FhirError(401, "security", "missing or wrong X-API-Key (or notify bearer secret)")

    async def notify(self, request: Request) -> Response:
        version = model.R5
        try:
            self.check_notifier(request)
            query = request.query_params.get("_fhirVersion")
            asked = model.negotiate(query, request.headers.get("content-type"), status=415)
            version = asked or model.R5
            body = await _body(request, self.max_notification_bytes)
            try:
                bundle = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise FhirError(400, "structure", f"the body is not JSON: {exc}") from None
            await self.ready()
            notification = model.parse_notification(bundle, asked)
            version = notification.version
            if notification.type != model.EVENT_NOTIFICATION:
                # Handshakes and heartbeats are between the FHIR server and us; sockets get our own.
                NOTIFICATIONS.labels(notification.type).inc()
                message = f"{notification.type} for Subscription/{notification.subscription_id} accepted"
                return fhir_response(_informational(message), version)
            channel = channel_of(notification.subscription_id)
            try:
                options = self.gateway.policy.options(channel)
            except ReplyError as exc:
                raise FhirError(503, "not-supported", f"channel {channel} is not available: {exc}") from None
            numbers = notification.event_numbers
            key = f"events:{min(numbers)}-{max(numbers)}:{len(numbers)}"
            publish = options.publish_options(
                idempotency_key=key, idempotency_ttl=max(self.settings.idempotency_ttl, options.history_ttl)
            )
            data = orjson.dumps(model.canonical(notification))
            result = await self.gateway.broker.publish(channel, data, publish)
            NOTIFICATIONS.labels("duplicate" if result.duplicate else "published").inc()
            told = "already published (a redelivery)" if result.duplicate else "published"
            message = f"events {', '.join(map(str, numbers))} of Subscription/{notification.subscription_id} {told}"
            return fhir_response(_informational(message), version)
        except FhirError as exc:
            NOTIFICATIONS.labels("refused").inc()
            return error_response(exc, version)
        except BrokerError as exc:
            NOTIFICATIONS.labels("failed").inc()
            return error_response(FhirError(503, "transient", f"the notification cannot be stored now: {exc}"), version)

    # the websocket

    async def websocket(self, websocket: WebSocket) -> None:
        await serve_websocket(websocket, "fhir", lambda connection: FhirSocket(self, connection))


def _informational(message: str) -> dict[str, Any]:
    return model.operation_outcome(message, code="informational", severity="information")


def _number_parameter(parameters: Mapping[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is None or value == "":
        return None
    return model.parse_number(value, name)


class Bound:
    """One subscription bound on a socket: where its notifications stand, and the Link carrying them."""

    def __init__(self, subscription_id: str, link: Link) -> None:
        self.subscription_id = subscription_id
        self.channel = f"{NAMESPACE}:{subscription_id}"
        self.link = link
        # The channel position of the last notification sent (or, before any, the position at bind):
        # what the socket has seen, so a publication that reaches it twice (a bind recovering what it
        # raced with, a new token taking over) is sent once.
        self.epoch = ""
        self.offset = 0
        self.last_event = 0
        self.topic: str | None = None
        self.last_sent = time.monotonic()

    def fresh(self, epoch: str, offset: int) -> bool:
        if epoch == self.epoch and offset <= self.offset:
            return False
        self.epoch, self.offset = epoch, offset
        return True


class Link:
    """The session behind one binding token: connected with the token's JWT and subscribed to the
    `fhir:` channels of its subscriptions."""

    def __init__(self, socket: FhirSocket, record: BindingRecord, token: str) -> None:
        self.socket = socket
        self.token = token
        self.user = record.user
        self.version = record.version
        self.expires_at = record.expires_at
        self.channels: set[str] = set()
        self.ended: codes.Disconnect | None = None
        self.certificate = record.certificate
        self.bridge = AdapterSession(
            socket.service.gateway,
            socket.connection,
            RENDERERS[record.version],
            deliver=self.deliver,
            close=self.lost,
            on_unsubscribe=self.unsubscribed,
        )

    def deliver(self, frame: bytes) -> None:
        channel, epoch, offset, number, bundle = frame.split(b"\n", 4)
        self.relay(channel.decode(), epoch.decode(), int(offset), int(number), bundle)

    def relay(self, channel: str, epoch: str, offset: int, number: int, bundle: bytes) -> None:
        bound = self.socket.bound.get(channel)
        if bound is None or bound.link is not self or self.ended is not None:
            return  # unbound meanwhile, or another token's link carries it now
        if not bound.fresh(epoch, offset):
            return
        bound.last_event = max(bound.last_event, number)
        self.socket.send(bound, bundle, model.EVENT_NOTIFICATION)

    def recovered(self, channel: str, reply: Reply) -> None:
        """Relay the publications a subscribe with `recover` brought back (they follow the handshake)."""
        result = reply.result
        epoch = str(result.get("epoch", ""))
        for publication in result.get("publications") or ():
            frame = frame_of(channel, epoch, publication.offset, publication.data, self.version)
            if frame:
                self.deliver(frame)

    def lost(self, disconnect: codes.Disconnect) -> None:
        """The session ends (its JWT expired or was revoked, the node drains...): so do these bindings."""
        if self.ended is not None:
            return
        self.ended = disconnect
        if disconnect.code == codes.SHUTDOWN.code:
            self.socket.close("the gateway is shutting down: reconnect, bind again and fetch with $events", disconnect)
            return
        names = ", ".join(f"Subscription/{b.subscription_id}" for b in self.socket.bound_by(self))
        self.socket.warn(f"the binding of {names or 'a token'} ended: {disconnect.reason}", code="security")
        self.socket.wake()

    def unsubscribed(self, channel: str, code: int, reason: str) -> None:
        bound = self.socket.bound.get(channel)
        if bound is None or bound.link is not self:
            return
        if code >= codes.UNSUBSCRIBE_INSUFFICIENT_STATE:
            self.socket.close(
                f"notifications of Subscription/{bound.subscription_id} were interrupted ({reason}): "
                "reconnect, bind again and fetch what was missed with $events",
                codes.INSUFFICIENT_STATE,
            )
            return
        # Unsubscribed by the server API: this subscription is no longer bound here.
        self.channels.discard(channel)
        self.socket.forget(bound)
        self.socket.warn(f"Subscription/{bound.subscription_id} was unbound by the server ({reason})")
        self.socket.wake()


class FhirSocket:
    """One /fhir/ws socket: the socket loop's handler (core/loop.py) and the Links of its bindings."""

    def __init__(self, service: FhirService, connection: Connection) -> None:
        self.service = service
        self.settings = service.settings
        self.connection = connection
        self.outbox = connection.transport
        self.max_frame_bytes = service.settings.max_frame_bytes
        self.bound: dict[str, Bound] = {}  # by channel
        self.links: list[Link] = []
        self.idle_since = time.monotonic()
        self.ticker: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    # sending

    def send(self, bound: Bound, data: bytes, kind: str) -> None:
        bound.last_sent = time.monotonic()
        SENT.labels(kind).inc()
        self.outbox.send(data)

    def status(self, bound: Bound, kind: str) -> None:
        spec = StatusSpec(bound.subscription_id, kind, bound.last_event, topic=bound.topic)
        bundle = model.status_bundle(spec, bound.link.version)
        model.validate(bundle, bound.link.version)
        self.send(bound, orjson.dumps(bundle), kind)

    def warn(self, message: str, *, code: str = "processing", severity: str = "error") -> None:
        """Tell the client something went wrong, in an OperationOutcome; the socket stays open."""
        self.outbox.send(orjson.dumps(model.operation_outcome(message, code=code, severity=severity)))

    def close(self, message: str, disconnect: codes.Disconnect, code: str = "processing") -> None:
        """Tell the client why in an OperationOutcome, then close with `disconnect`."""
        if self.outbox.closing is None:
            self.warn(message, code=code)
            self.outbox.close(disconnect)

    def wake(self) -> None:
        self._wakeup.set()

    # bookkeeping

    def bound_by(self, link: Link) -> list[Bound]:
        return [bound for bound in self.bound.values() if bound.link is link]

    def forget(self, bound: Bound) -> None:
        if self.bound.get(bound.channel) is bound:
            del self.bound[bound.channel]
            BINDINGS.dec()
            if not self.bound:
                self.idle_since = time.monotonic()

    async def end(self, link: Link, disconnect: codes.Disconnect = UNBOUND) -> None:
        for bound in self.bound_by(link):
            self.forget(bound)
        if link in self.links:
            self.links.remove(link)
        await link.bridge.end(disconnect)

    # the socket loop's handler

    async def on_open(self) -> None:
        self.ticker = asyncio.create_task(self.tick(), name="fhir-ws-ticker")

    def on_too_large(self, size: int) -> None:
        self.close("the message is too large", codes.MESSAGE_SIZE_LIMIT, "too-costly")

    async def on_frame(self, data: str | bytes) -> None:
        if not self.connection.rate.admit():
            self.close("too many messages", codes.TOO_MANY_REQUESTS_DISCONNECT, "throttled")
            return
        await self.handle(data)

    async def on_close(self, disconnect: Disconnect) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
        for link in list(self.links):
            await self.end(link, disconnect)

    async def handle(self, data: str | bytes) -> None:
        try:
            command = parse_command(data)
        except CommandError as exc:
            self.close(str(exc), codes.BAD_REQUEST_DISCONNECT, "invalid")
            return
        try:
            await self.run(command)
        except FhirError as exc:
            # This token is no good (unknown, expired, its JWT refused): whatever else is bound stays.
            self.warn(exc.message, code=exc.code)
        except ReplyError as exc:  # no `fhir` namespace configured
            self.warn(f"cannot bind: {exc}", code="not-supported")
        except ProtocolError as exc:
            self.close(str(exc), exc.disconnect, "security")
        except BrokerError as exc:
            self.close(f"the gateway cannot bind now: {exc}", codes.SERVER_ERROR, "transient")

    async def run(self, command: Command) -> None:
        if command.action == "ping":
            self.outbox.send(b'{"type":"pong"}')
        elif command.action == "bind-with-token":
            await self.bind(command.token)
        else:
            await self.unbind(command.token)

    async def bind(self, token: str) -> None:
        """Bind the token's subscriptions: one handshake each, then their notifications. A subscription
        bound already (an earlier token) moves to this token's link without losing or repeating one."""
        service = self.service
        await service.ready()
        record = await service.tokens.resolve(token)
        peer = self.connection.peer
        if record.certificate and (peer.certificate is None or peer.certificate.fingerprint != record.certificate):
            raise FhirError(401, "security", "this binding token was issued to a client certificate this socket lacks")
        link = Link(self, record, token)
        try:
            try:
                reply = await link.bridge.connect(record.jwt)
            except Refused as refused:  # an invalid or revoked credential: this token is no good, the socket is
                detail = refused.detail
                if refused.status in (429, 503):  # a connection limit, a draining node: try again later
                    raise FhirError(refused.status, "throttled", f"cannot bind now: {detail}") from None
                raise FhirError(401, "security", f"the token behind this binding is not accepted: {detail}") from None
            if not reply.ok:
                raise FhirError(401, "security", f"the token behind this binding is not accepted: {_message(reply)}")
            for subscription_id in record.subscriptions:
                await self.bind_one(link, subscription_id)
        except BaseException:
            await self.end(link, self.outbox.closing or codes.CONNECTION_CLOSED)
            raise
        if not link.channels:
            await self.end(link)
            return
        self.links.append(link)
        # Links left carrying nothing (every subscription moved to this token) end.
        for other in [other for other in self.links if other is not link]:
            moved = [c for c in other.channels if (b := self.bound.get(c)) is None or b.link is not other]
            for channel in moved:
                other.channels.discard(channel)
                with contextlib.suppress(ProtocolError):
                    await other.bridge.call(cmd.Unsubscribe(channel))
            if not other.channels:
                await self.end(other)

    async def bind_one(self, link: Link, subscription_id: str) -> None:
        channel = f"{NAMESPACE}:{subscription_id}"
        bound = self.bound.get(channel)
        if bound is None:
            candidate = Bound(subscription_id, link)
            options = self.service.gateway.policy.options(channel)
            newest = await self.service.gateway.broker.history(
                channel, limit=1, reverse=True, meta_ttl=options.meta_ttl
            )
            candidate.epoch, candidate.offset = newest.position.epoch, newest.position.offset
            if newest.publications:
                with contextlib.suppress(FhirError, orjson.JSONDecodeError):
                    last = model.parse_notification(orjson.loads(newest.publications[0].data), check=False)
                    candidate.last_event, candidate.topic = last.last_event, last.topic
        else:
            candidate = bound
        since = StreamPosition(candidate.offset, candidate.epoch)

        def handshake(reply: Reply) -> None:
            if not reply.ok:
                return
            if self.bound.get(channel) is None:
                self.bound[channel] = candidate
                BINDINGS.inc()
            candidate.link = link
            link.channels.add(channel)
            self.status(candidate, model.HANDSHAKE)
            link.recovered(channel, reply)  # what was published since the position read above

        request = cmd.Subscribe(channel, since=since)
        reply = await link.bridge.call(request, handshake)
        if reply.error is not None and reply.error.code == codes.ALREADY_SUBSCRIBED.code:
            # The JWT's `subs` claim subscribed it at connect: subscribe again, from our position.
            await link.bridge.call(cmd.Unsubscribe(channel))
            reply = await link.bridge.call(request, handshake)
        if not reply.ok:
            self.warn(f"cannot bind Subscription/{subscription_id}: {_message(reply)}", code="forbidden")

    async def unbind(self, token: str) -> None:
        """End what a token bound; a token that bound nothing here unbinds its subscriptions if bound."""
        links = [link for link in self.links if hmac.compare_digest(link.token, token)]
        for link in links:
            await self.end(link)
        if links:
            return
        record = await self.service.tokens.resolve(token)
        found = [self.bound[f"{NAMESPACE}:{s}"] for s in record.subscriptions if f"{NAMESPACE}:{s}" in self.bound]
        if not found:
            raise FhirError(400, "not-found", "nothing is bound with this token")
        for bound in found:
            link = bound.link
            self.forget(bound)
            link.channels.discard(bound.channel)
            with contextlib.suppress(ProtocolError):
                await link.bridge.call(cmd.Unsubscribe(bound.channel))
            if not link.channels:
                await self.end(link)

    async def tick(self) -> None:
        """Heartbeats after `fhir_heartbeat_period` without a notification; bindings end with their
        token; a socket with nothing bound for `connect_timeout` is closed (3502)."""
        settings = self.settings
        period = settings.fhir_heartbeat_period
        step = min(1.0, period / 4, settings.connect_timeout / 4)
        while self.outbox.closing is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), step)
            self._wakeup.clear()
            now, clock = time.time(), time.monotonic()
            for link in list(self.links):
                if link.ended is not None:
                    await self.end(link, link.ended)
                    if not self.links:  # lost() told the client why
                        self.outbox.close(link.ended)
                        return
                elif now >= link.expires_at:
                    names = ", ".join(f"Subscription/{b.subscription_id}" for b in self.bound_by(link))
                    self.warn(
                        f"the binding token of {names} has expired: get a new one and bind again",
                        code="expired",
                        severity="warning",
                    )
                    await self.end(link)
                elif not link.channels:
                    await self.end(link)
            for bound in list(self.bound.values()):
                if clock - bound.last_sent >= period:
                    self.status(bound, model.HEARTBEAT)
            if not self.bound and clock - self.idle_since >= settings.connect_timeout:
                self.close(f"nothing was bound for {settings.connect_timeout:g} s", codes.STALE, "timeout")
                return


def _message(reply: Reply) -> str:
    return error_text(reply)


def build_fhir_router(gateway: Gateway, settings: GatewaySettings) -> APIRouter:
    service = FhirService(gateway, settings)
    router = APIRouter(prefix="/fhir", tags=["fhir"])
    endpoint: Callable[..., Awaitable[Response]]
    for path, endpoint, methods in (
        ("/Subscription/$get-ws-binding-token", service.type_binding_token, ["GET", "POST"]),
        ("/Subscription/{subscription_id}/$get-ws-binding-token", service.binding_token, ["GET", "POST"]),
        ("/Subscription/{subscription_id}/$events", service.events, ["GET", "POST"]),
        ("/notify", service.notify, ["POST"]),
    ):
        router.add_api_route(path, endpoint, methods=methods, response_class=Response)
    router.add_api_websocket_route("/ws", service.websocket)
    return router
