"""One client connection speaking the native protocol: commands in, replies and pushes out.

The session knows nothing about sockets: it writes frames to a `Transport` (which queues them
without blocking) and is fed frames by whoever reads the socket. Nor does it know the protocol
flavour (JSON or protobuf): its `Codec` decodes commands and encodes replies and pushes.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from prometheus_client import Counter
from tsunagu_core.broker import BrokerError, ClientInfo, StreamPosition
from tsunagu_core.nonces import MemoryNonceRegistry
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent, Revocation

from tsunagu_ws_gateway.channels import ChannelPolicy, Principal
from tsunagu_ws_gateway.config import ChannelOptions, GatewaySettings
from tsunagu_ws_gateway.events import EventEmitter
from tsunagu_ws_gateway.forwarding import Forwarder, Sender
from tsunagu_ws_gateway.hub import Node, PresenceEvent, Subscription
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import ProtocolError, ReplyError
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.revocations import RevocationList
from tsunagu_ws_gateway.rpc import RpcRouter
from tsunagu_ws_gateway.signatures import SignatureVerifier, SignedPublication
from tsunagu_ws_gateway.tokens import ConnectionGrant, TokenVerifier

log = logging.getLogger("tsunagu.gateway.session")

VERSION = "tsunagu 0.1.0"
# The gateway's own RPC method (no backend): a publish answered with its offset and epoch.
PUBLISH_RPC = "$publish"
# Subscribe flag a client sets to get error 112 instead of `recovered: false` (it reloads state itself).
REJECT_UNRECOVERED_FLAG = 2
# What the session asks a decoder for: all commands of a frame (the frame's size limits their number).
UNCOUNTED = 1 << 30
COMMANDS = Counter("tsunagu_gateway_commands_total", "Client commands handled", ["method"])
COMMAND_ERRORS = Counter("tsunagu_gateway_command_errors_total", "Client commands answered with an error", ["code"])

PRESENCE_AVAILABLE: dict[str, Any] = {"available": lambda o: o.presence, "what": "presence is off"}

METHODS = (
    "connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats",
    "history", "ping", "send", "rpc", "refresh", "sub_refresh",
)  # fmt: skip


class Transport(Protocol):
    def send(self, frame: bytes) -> None: ...

    def close(self, disconnect: codes.Disconnect) -> None: ...


class Gateway:
    """What every session on this node shares."""

    def __init__(
        self,
        settings: GatewaySettings,
        node: Node,
        verifier: TokenVerifier,
        policy: ChannelPolicy,
        events: EventEmitter,
        rpc: RpcRouter,
        revoked: RevocationList,
        signatures: SignatureVerifier | None = None,
        forwarders: Mapping[str, Forwarder] | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.broker = node.broker
        self.verifier = verifier
        self.policy = policy
        self.events = events
        self.rpc = rpc
        self.revoked = revoked
        self.signatures = signatures or SignatureVerifier(MemoryNonceRegistry(), settings.signature_window)
        self.forwarders = forwarders or {}

    def close_revoked(self, revocation: Revocation) -> None:
        """Close every connection on this node whose token the revocation covers."""
        for session in list(self.node.clients.values()):
            if session.grant is not None and self.revoked.revokes(session.grant):
                log.info("closing client %s of user %s: %s revoked", session.id, session.user, revocation.value)
                session.transport.close(codes.TOKEN_REVOKED)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.capacity = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ClientSession:
    def __init__(
        self,
        gateway: Gateway,
        transport: Transport,
        *,
        codec: Codec = JSON,
        transport_name: str = "websocket",
        certificate_grant: ConnectionGrant | None = None,
    ) -> None:
        self.gateway = gateway
        # Who the connection's client certificate says it is (mTLS): used when connect carries no token.
        self.certificate_grant = certificate_grant
        self.settings = gateway.settings
        self.node = gateway.node
        self.transport = transport
        self.codec = codec
        self.transport_name = transport_name
        self.id = str(uuid.uuid4())
        self.user = ""
        self.session_id = ""
        self.grant: ConnectionGrant | None = None
        self.principal = Principal(user="")
        self.conn_info = b""
        self.subscriptions: dict[str, Subscription] = {}
        self.connected = False
        self.closed = False
        self.opened_at = time.monotonic()
        self.next_ping = 0.0
        self.pong_deadline: float | None = None
        self.expires_at: float | None = None
        self.limiter = TokenBucket(self.settings.commands_per_second, 2 * self.settings.commands_per_second)
        self.refused_in_a_row = 0
        self.node.connecting.add(self)

    # feeding

    async def handle_frame(self, frame: bytes | str) -> None:
        """Every command of one frame, in order. A command over a limit (more than
        `max_commands_per_frame` in this frame, or over the connection's rate) is answered with error
        111 and the others are carried out, as Centrifugo does; a client that keeps sending into a
        closed rate limit for more than a burst's worth is disconnected (3013)."""
        limit = self.settings.max_commands_per_frame
        # The frame size bounds how many commands a frame holds; the decoder does not count them.
        for index, command in enumerate(self.codec.decode_commands(frame, UNCOUNTED)):
            if index >= limit:
                self._refuse(command, f"more than {limit} commands in one frame")
            elif not self.limiter.take():
                self.refused_in_a_row += 1
                if self.refused_in_a_row > self.limiter.capacity:
                    raise ProtocolError(codes.TOO_MANY_REQUESTS_DISCONNECT)
                self._refuse(command, f"more than {self.settings.commands_per_second:g} commands a second")
            else:
                self.refused_in_a_row = 0
                await self.handle_command(command)
            if self.closed:
                return

    def _refuse(self, command: dict[str, Any], detail: str) -> None:
        command_id = command.get("id", 0)
        COMMAND_ERRORS.labels(str(codes.TOO_MANY_REQUESTS.code)).inc()
        if command_id:  # a pong or a send has no reply to carry the error
            error = codes.ErrorCode(codes.TOO_MANY_REQUESTS.code, f"{codes.TOO_MANY_REQUESTS.message}: {detail}")
            self.transport.send(self.codec.error_reply(command_id, error, temporary=True))

    async def handle_command(self, command: dict[str, Any]) -> None:
        command_id: int = command.get("id", 0)
        method = next((m for m in METHODS if m in command), None)
        if method is None:
            if command_id == 0:
                self.on_pong()
                return
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "command has no known method")
        request = command[method]
        if not isinstance(request, dict):
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} request must be an object")
        if method != "connect" and not self.connected:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} before connect")
        if method == "send":
            COMMANDS.labels(method).inc()
            return
        if command_id == 0:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} needs an id")
        COMMANDS.labels(method).inc()
        handler: Callable[[int, dict[str, Any]], Awaitable[dict[str, Any] | None]] = getattr(self, f"_on_{method}")
        try:
            result = await handler(command_id, request)
        except ReplyError as exc:
            COMMAND_ERRORS.labels(str(exc.error.code)).inc()
            # The detail tells the client what exactly was wrong; the code is what SDKs react to.
            error = codes.ErrorCode(exc.error.code, f"{exc.error.message}: {exc.detail}") if exc.detail else exc.error
            self.transport.send(self.codec.error_reply(command_id, error))
            return
        except BrokerError as exc:
            log.warning("%s failed for client %s: %s", method, self.id, exc)
            COMMAND_ERRORS.labels(str(codes.INTERNAL.code)).inc()
            self.transport.send(self.codec.error_reply(command_id, codes.INTERNAL, temporary=True))
            return
        if result is not None:
            self.transport.send(self.codec.reply(command_id, method, result))

    # connect and refresh

    async def _on_connect(self, command_id: int, request: dict[str, Any]) -> dict[str, Any] | None:
        if self.connected:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "connect sent twice")
        token = request.get("token") or ""
        if not isinstance(token, str):
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "token must be a string")
        if token:
            grant = await self.gateway.verifier.verify_connection(token)
        elif self.certificate_grant is not None:
            grant = self.certificate_grant
        elif self.settings.allow_anonymous:
            grant = ConnectionGrant(user="")
        else:
            # Centrifugo's answer to a connect without a token when anonymous clients are not allowed.
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "a connection token is required")
        authenticated = bool(token) or self.certificate_grant is not None
        if authenticated and await self.gateway.revoked.refuses(grant):
            raise ProtocolError(codes.TOKEN_REVOKED)
        self.grant = grant
        self.user = grant.user
        self.session_id = grant.session_id
        self.conn_info = grant.info
        self.principal = Principal(
            user=grant.user, channel_patterns=grant.channel_patterns, authenticated=authenticated
        )
        self.expires_at = grant.expires_at
        self.connected = True
        self.node.connecting.discard(self)
        self.node.add_client(self)
        self.next_ping = time.monotonic() + self.settings.ping_interval
        result: dict[str, Any] = {
            "client": self.id,
            "version": VERSION,
            "ping": int(self.settings.ping_interval),
            "pong": True,
            "node": self.node.name,
        }
        if grant.session_id:
            result["session"] = grant.session_id
        result.update(self._expiry())
        requested_subs = request.get("subs") or {}
        server_subs: dict[str, Any] = {}
        flushes = []
        for channel in grant.server_subs:
            wanted = requested_subs.get(channel) if isinstance(requested_subs, dict) else None
            sub_result, flush = await self._subscribe(channel, wanted or {}, server_side=True)
            server_subs[channel] = sub_result
            flushes.append(flush)
        if server_subs:
            result["subs"] = server_subs
        self.transport.send(self.codec.reply(command_id, "connect", result))
        for flush in flushes:
            flush()
        self._event(GatewayEvent.CONNECTED)
        return None

    def _expiry(self) -> dict[str, Any]:
        if self.expires_at is None:
            return {}
        return {"expires": True, "ttl": max(0, int(self.expires_at - time.time()))}

    async def _on_refresh(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        token = request.get("token")
        if not isinstance(token, str) or not token:
            raise ReplyError(codes.BAD_REQUEST, "refresh needs a token")
        grant = await self.gateway.verifier.verify_connection(token)
        if await self.gateway.revoked.refuses(grant):
            raise ProtocolError(codes.TOKEN_REVOKED)
        if grant.user != self.user:
            raise ProtocolError(codes.INVALID_TOKEN, "refresh token is for another user")
        self.grant = grant
        self.expires_at = grant.expires_at
        self.principal = Principal(user=grant.user, channel_patterns=grant.channel_patterns, authenticated=True)
        return self._expiry()

    # subscriptions

    async def _on_subscribe(self, command_id: int, request: dict[str, Any]) -> dict[str, Any] | None:
        channel = request.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ReplyError(codes.BAD_REQUEST, "subscribe needs a channel")
        result, flush = await self._subscribe(channel, request, server_side=False)
        self.transport.send(self.codec.reply(command_id, "subscribe", result))
        flush()
        return None

    async def _subscribe(
        self, channel: str, request: dict[str, Any], *, server_side: bool
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Subscribe and compute the result; the returned flush sends what was buffered meanwhile,
        and must run right after the reply is queued."""
        gateway = self.gateway
        options = gateway.policy.options(channel)
        if channel in self.subscriptions:
            raise ReplyError(codes.ALREADY_SUBSCRIBED)
        if len(self.subscriptions) >= self.settings.max_channels_per_client:
            raise ReplyError(codes.LIMIT_EXCEEDED, "too many subscriptions on this connection")
        sub_grant = None
        token = request.get("token")
        if token and isinstance(token, str):
            sub_grant = await gateway.verifier.verify_subscription(token, self.user, channel)
        if not server_side:
            gateway.policy.check(
                options.allow_subscribe, channel, self.principal, granted_by_token=sub_grant is not None
            )
        recoverable = options.history_size > 0 and options.recovery
        subscription = Subscription(
            channel=channel,
            options=options,
            recoverable=recoverable,
            join_leave=options.join_leave and (server_side or bool(request.get("join_leave"))),
            expires_at=sub_grant.expires_at if sub_grant else None,
            chan_info=sub_grant.info if sub_grant else b"",
        )
        self.subscriptions[channel] = subscription
        try:
            await self.node.add_subscriber(channel, self, subscription)
            result, last_offset = await self._position(channel, request, subscription)
        except BaseException:
            self.subscriptions.pop(channel, None)
            await self.node.remove_subscriber(channel, self)
            raise
        if sub_grant is not None and sub_grant.expires_at is not None:
            result["expires"] = True
            result["ttl"] = max(0, int(sub_grant.expires_at - time.time()))

        def flush() -> None:
            subscription.buffering = False
            buffered, subscription.buffer = subscription.buffer, []
            for event in buffered:
                if isinstance(event, PresenceEvent):
                    push = self.codec.join_push if event.join else self.codec.leave_push
                    self.transport.send(push(channel, event.info))
                elif not recoverable or event.offset > last_offset:
                    # (the others are part of the recovered history or older than where the client starts)
                    self.transport.send(self.codec.publication_push(channel, event))
            self.node.go_live(channel, self)

        info = self.client_info(subscription)
        if options.presence:
            await gateway.broker.add_presence(channel, self.id, info, ttl=self.settings.presence_ttl)
        if options.join_leave:
            await gateway.broker.publish_presence(channel, True, info)
        self._event(GatewayEvent.SUBSCRIBED, channel)
        return result, flush

    async def _position(
        self, channel: str, request: dict[str, Any], subscription: Subscription
    ) -> tuple[dict[str, Any], int]:
        if not subscription.recoverable:
            return {}, 0
        broker = self.gateway.broker
        options = subscription.options
        meta_ttl = options.meta_ttl
        recover = bool(request.get("recover")) and isinstance(request.get("epoch"), str)
        if not recover:
            top = await broker.history(channel, limit=0, meta_ttl=meta_ttl)
            position = top.position
            fresh = {"recoverable": True, "positioned": True, "epoch": position.epoch, "offset": position.offset}
            return fresh, position.offset
        since = StreamPosition(_offset(request.get("offset")), str(request["epoch"]))
        history = await broker.history(channel, since=since, limit=options.history_size, meta_ttl=meta_ttl)
        position = history.position
        publications = history.publications if position.epoch == since.epoch else []
        if position.epoch != since.epoch:
            recovered = False
        elif publications:
            recovered = publications[0].offset == since.offset + 1 and publications[-1].offset == position.offset
        else:
            recovered = position.offset == since.offset
        flags = request.get("flag") or 0
        if not recovered and isinstance(flags, int) and flags & REJECT_UNRECOVERED_FLAG:
            raise ReplyError(codes.UNRECOVERABLE_POSITION)
        result: dict[str, Any] = {
            "recoverable": True,
            "positioned": True,
            "epoch": position.epoch,
            "was_recovering": True,
        }
        if recovered:
            # As Centrifugo: the client's own offset, and the publications that carry it to the top.
            result |= {"offset": since.offset, "recovered": True, "publications": publications}
        else:
            # Publications only where the stream is continuous: a client told `recovered: false` reloads its
            # state, and a partial history would look like all there is.
            result["offset"] = position.offset
        return result, position.offset

    def client_info(self, subscription: Subscription | None = None) -> ClientInfo:
        return ClientInfo(
            user=self.user,
            client=self.id,
            conn_info=self.conn_info,
            chan_info=subscription.chan_info if subscription else b"",
        )

    async def _on_unsubscribe(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        channel = request.get("channel")
        if not isinstance(channel, str):
            raise ReplyError(codes.BAD_REQUEST, "unsubscribe needs a channel")
        await self._leave(channel)
        return {}

    async def _leave(self, channel: str) -> None:
        subscription = self.subscriptions.pop(channel, None)
        if subscription is None:
            return
        await self.node.remove_subscriber(channel, self)
        info = self.client_info(subscription)
        broker = self.gateway.broker
        try:
            if subscription.options.presence:
                await broker.remove_presence(channel, self.id)
            if subscription.options.join_leave:
                await broker.publish_presence(channel, False, info)
        except BrokerError as exc:
            log.warning("leave of %s on %s not recorded: %s", self.id, channel, exc)
        self._event(GatewayEvent.UNSUBSCRIBED, channel)

    def forget_subscription(self, channel: str) -> None:
        self.subscriptions.pop(channel, None)

    async def server_unsubscribe(self, channel: str) -> None:
        if channel in self.subscriptions:
            await self._leave(channel)
            self.transport.send(self.codec.unsubscribe_push(channel, codes.UNSUBSCRIBE_SERVER, "server unsubscribe"))

    async def server_subscribe(self, channel: str) -> None:
        if channel in self.subscriptions:
            return
        try:
            result, flush = await self._subscribe(channel, {}, server_side=True)
        except (ReplyError, BrokerError) as exc:
            log.warning("server-side subscribe of %s to %s failed: %s", self.id, channel, exc)
            return
        self.transport.send(self.codec.subscribe_push(channel, result))
        flush()

    async def _on_sub_refresh(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        channel, token = request.get("channel"), request.get("token")
        if not isinstance(channel, str) or not isinstance(token, str):
            raise ReplyError(codes.BAD_REQUEST, "sub_refresh needs a channel and a token")
        subscription = self.subscriptions.get(channel)
        if subscription is None:
            raise ReplyError(codes.BAD_REQUEST, "not subscribed")
        grant = await self.gateway.verifier.verify_subscription(token, self.user, channel)
        subscription.expires_at = grant.expires_at
        if grant.expires_at is None:
            return {}
        return {"expires": True, "ttl": max(0, int(grant.expires_at - time.time()))}

    # publications, history, presence

    def _channel_access(
        self,
        channel: Any,
        access_of: str,
        available: Callable[[ChannelOptions], bool] | None = None,
        what: str = "",
    ) -> tuple[str, Any]:
        """The channel and its options if `who` may do `access_of` there; a feature the namespace does not
        have (`available` false) is 108 before any permission check, as Centrifugo answers."""
        if not isinstance(channel, str) or not channel:
            raise ReplyError(codes.BAD_REQUEST, "a channel is required")
        options = self.gateway.policy.options(channel)
        if available is not None and not available(options):
            raise ReplyError(codes.NOT_AVAILABLE, f"{what} in this namespace")
        subscribed = channel in self.subscriptions
        access = getattr(options, access_of)
        # A subscription granted by a subscription token also lets its holder read history and presence.
        by_token = subscribed and access_of in ("allow_history", "allow_presence") and access != "none"
        self.gateway.policy.check(access, channel, self.principal, granted_by_token=by_token)
        return channel, options

    async def _on_publish(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        if "data" not in request:
            raise ReplyError(codes.BAD_REQUEST, "publish needs data")
        data = self.codec.payload(request["data"])
        return await self._publish(request.get("channel"), data, request.get("idempotency_key"))

    async def _publish(self, channel_name: Any, data: bytes, key: Any) -> dict[str, Any]:
        channel, options = self._channel_access(channel_name, "allow_publish")
        if key is not None and (not isinstance(key, str) or len(key) > 128):
            raise ReplyError(codes.BAD_REQUEST, "idempotency_key must be a string of at most 128 characters")
        signed = None
        if options.signed:
            claims = self.grant.claims if self.grant is not None else {}
            signed = await self.gateway.signatures.verify(channel, self.user, claims, data)
        if options.forward:
            forwarder = self.gateway.forwarders.get(options.forward)
            if forwarder is None:
                raise ReplyError(codes.NOT_AVAILABLE, f"no {options.forward} forwarder on this gateway")
            sender = Sender(self.user, self.id, self.grant.session_id if self.grant else "", self.node.name)
            return await forwarder(sender, channel, data)
        subscription = self.subscriptions.get(channel)
        result = await self.gateway.broker.publish(
            channel,
            data,
            options.publish_options(
                idempotency_key=f"{self.user}/{key}" if key else None,
                idempotency_ttl=self.settings.idempotency_ttl,
                info=self.client_info(subscription),
            ),
        )
        if options.audit:
            await self._audit_publication(channel, data, result.offset, result.epoch, signed)
        # offset and epoch are our additions: stock clients ignore them, offline queues use them as acks.
        return {"offset": result.offset, "epoch": result.epoch} if result.offset else {}

    async def _audit_publication(
        self, channel: str, data: bytes, offset: int, epoch: str, signed: SignedPublication | None
    ) -> None:
        details: dict[str, Any] = {
            "channel": channel,
            "offset": offset,
            "epoch": epoch,
            "client": self.id,
            "session": self.grant.session_id if self.grant is not None else "",
            "data_sha256": hashlib.sha256(data).hexdigest(),
        }
        if signed is not None:
            details["signature"] = {"kid": signed.kid, "ts": signed.ts, "nonce": signed.nonce, "sig": signed.sig}
            details["payload"] = signed.payload
        event = AuditEvent(
            actor=self.user,
            action="publish",
            subject=channel,
            details=orjson.dumps(details, option=orjson.OPT_SORT_KEYS),
            outcome="ok",
        )
        try:
            await self.gateway.events.audit(event)
        except Exception as exc:
            # Published but not yet recorded: the client retries with its idempotency key, which
            # returns the same offset and records it then.
            log.error("audit record of %s offset %d not written: %s", channel, offset, exc)
            raise ReplyError(codes.INTERNAL, "published, but the audit record failed; retry") from None

    async def _on_history(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        channel, options = self._channel_access(
            request.get("channel"), "allow_history", available=lambda o: o.history_size > 0, what="no history"
        )
        limit = request.get("limit", 0)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise ReplyError(codes.BAD_REQUEST, "limit must be an integer")
        limit = options.history_size if limit < 0 else min(limit, options.history_size)
        since = request.get("since")
        position = None
        if isinstance(since, dict):
            position = StreamPosition(_offset(since.get("offset")), str(since.get("epoch") or ""))
        history = await self.gateway.broker.history(
            channel, since=position, limit=limit, reverse=bool(request.get("reverse"))
        )
        return {
            "publications": history.publications,
            "epoch": history.position.epoch,
            "offset": history.position.offset,
        }

    async def _on_presence(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        channel, _ = self._channel_access(request.get("channel"), "allow_presence", **PRESENCE_AVAILABLE)
        return {"presence": await self.gateway.broker.presence(channel)}

    async def _on_presence_stats(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        channel, _ = self._channel_access(request.get("channel"), "allow_presence", **PRESENCE_AVAILABLE)
        stats = await self.gateway.broker.presence_stats(channel)
        return {"num_clients": stats.num_clients, "num_users": stats.num_users}

    async def _on_ping(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def _on_rpc(self, command_id: int, request: dict[str, Any]) -> dict[str, Any]:
        method = request.get("method")
        if not isinstance(method, str) or not method:
            raise ReplyError(codes.METHOD_NOT_FOUND, "rpc needs a method")
        if method == PUBLISH_RPC:
            return {"data": await self._publish_by_rpc(self.codec.rpc_data(request.get("data")))}
        data = await self.gateway.rpc.call(
            method, self.codec.rpc_data(request.get("data")), user=self.user, client=self.id
        )
        return {"data": data}

    async def _publish_by_rpc(self, params: Any) -> dict[str, Any]:
        """`$publish`: a publish whose result stock SDKs hand back (their publish() drops it), so an
        offline queue built on them learns the offset that acknowledges each entry."""
        if not isinstance(params, dict) or "data" not in params:
            raise ReplyError(codes.BAD_REQUEST, "$publish needs {channel, data, idempotency_key?}")
        data = orjson.dumps(params["data"])
        result = await self._publish(params.get("channel"), data, params.get("idempotency_key"))
        return {"offset": result.get("offset", 0), "epoch": result.get("epoch", "")}

    # timers

    def on_pong(self) -> None:
        self.pong_deadline = None

    def on_tick(self, now: float) -> None:
        if not self.connected:
            if now - self.opened_at > self.settings.connect_timeout:
                self.transport.close(codes.STALE)
            return
        if self.pong_deadline is not None and now > self.pong_deadline:
            self.transport.close(codes.NO_PONG)
            return
        if self.expires_at is not None and time.time() > self.expires_at + self.settings.pong_timeout:
            self.transport.close(codes.CONNECTION_EXPIRED)
            return
        # A codec without a ping frame (the protocol adapters) keeps the connection alive its own way.
        if self.codec.ping_frame and now >= self.next_ping:
            self.transport.send(self.codec.ping_frame)
            self.next_ping = now + self.settings.ping_interval
            if self.pong_deadline is None:
                self.pong_deadline = now + self.settings.pong_timeout

    # the end

    async def close(self, disconnect: codes.Disconnect) -> None:
        """Forget everything about this connection; called once by the socket layer when it ends."""
        if self.closed:
            return
        self.closed = True
        self.node.connecting.discard(self)
        for channel in list(self.subscriptions):
            await self._leave(channel)
        if self.connected:
            self.node.remove_client(self)
            self._event(GatewayEvent.DISCONNECTED, code=disconnect.code, reason=disconnect.reason)

    def _event(self, kind: int, channel: str = "", code: int = 0, reason: str = "") -> None:
        self.gateway.events.emit(
            GatewayEvent(
                kind=kind,  # type: ignore[arg-type]
                client_id=self.id,
                user_id=self.user,
                session_id=self.session_id,
                channel=channel,
                conn_info=self.conn_info,
                code=code,
                reason=reason,
                transport=self.transport_name,
            )
        )


def _offset(value: Any) -> int:
    """A stream offset a client sent: an unsigned integer (JSON numbers; protobuf gives ints)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReplyError(codes.BAD_REQUEST, "offset must be an unsigned integer")
    return value
