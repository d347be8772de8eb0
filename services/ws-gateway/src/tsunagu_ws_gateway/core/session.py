"""One client session: commands in, replies and pushes out, with the native protocol's semantics
(connect, subscriptions with recovery, publish, history, presence, RPC) for every protocol.

The session knows nothing about sockets: it writes to a `Sink` (replies.py) and is fed either frames of
the native protocol (`handle_frame`, which its codec decodes) or typed commands (`execute`). It is
tested bare, frames in and frames out, without a server (tests/test_session.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson
from prometheus_client import Counter
from tsunagu_core.broker import BrokerError, ClientInfo, StreamPosition
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent

from tsunagu_ws_gateway.channels import Principal
from tsunagu_ws_gateway.config import ChannelOptions
from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import ConnectResult, PublishResult, Sink, SubscribeResult
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.forwarding import Sender
from tsunagu_ws_gateway.hooks import Caller, ConnectAttempt, SubscriptionPreset
from tsunagu_ws_gateway.hub import PresenceEvent, Subscription
from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import ProtocolError, ReplyError
from tsunagu_ws_gateway.signatures import SignedPublication
from tsunagu_ws_gateway.tokens import ConnectionGrant, SubscriptionGrant

log = logging.getLogger("tsunagu.gateway.session")

VERSION = "tsunagu 0.1.0"
# The gateway's own RPC method (no backend): a publish answered with its offset and epoch.
PUBLISH_RPC = "$publish"
# What the session asks a decoder for: all commands of a frame (the frame's size limits their number).
UNCOUNTED = 1 << 30
# Unsubscribe push of a subscription whose token expired without a sub_refresh: the SDK resubscribes
# with a fresh token (codes from 2500 resubscribe), as Centrifugo does.
UNSUBSCRIBE_EXPIRED = (2501, "subscription expired")
COMMANDS = Counter("tsunagu_gateway_commands_total", "Client commands handled", ["method"])
COMMAND_ERRORS = Counter("tsunagu_gateway_command_errors_total", "Client commands answered with an error", ["code"])
PRESENCE_AVAILABLE: dict[str, Any] = {"available": lambda o: o.presence, "what": "presence is off"}


def _meta_claim(claims: Mapping[str, Any]) -> bytes:
    """A connection token's `meta` claim (Centrifugo's), for the hooks' backends."""
    meta = claims.get("meta")
    return orjson.dumps(meta) if meta is not None else b""


class Session:
    def __init__(self, gateway: Gateway, connection: Connection, sink: Sink, *, transport_name: str = "") -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.node = gateway.node
        self.connection = connection
        self.sink = sink
        self.transport_name = transport_name or connection.transport.name
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
        # From the connect hook's backend (or the token's `meta` claim): sent with every later hook call.
        self.meta = b""
        # Set by the connect command: the headers it carried (for hooks that pass emulated headers on).
        self.emulated_headers: dict[str, str] = {}
        self._expiring: set[str] = set()
        self._refreshing = False
        self._tasks: set[asyncio.Task[None]] = set()
        gateway.registry.add(self)

    @property
    def renderer(self) -> Any:
        return self.sink.renderer

    # the native protocol's frames

    async def handle_frame(self, frame: bytes | str, codec: Codec) -> None:
        """Every command of one native frame, in order. A command over a limit (more than
        `max_commands_per_frame` in this frame, or over the connection's rate) is answered with error
        111 and the others are carried out, as Centrifugo does; a client that keeps sending into a
        closed rate limit for more than a burst's worth is disconnected (3013). A command the session
        refuses to connect closes the connection with the refusal's code, except an expired token (109)."""
        limit = self.settings.max_commands_per_frame
        rate = self.connection.rate
        # The frame size bounds how many commands a frame holds; the decoder does not count them.
        for index, request in enumerate(codec.decode_commands(frame, UNCOUNTED)):
            command_id = request.get("id", 0)
            if index >= limit:
                self._refuse(command_id, f"more than {limit} commands in one frame")
            elif not rate.admit():
                self._refuse(command_id, rate.detail)
            else:
                try:
                    await self._decoded(command_id, request, codec)
                except Refused as refused:
                    if refused.error is None:
                        raise ProtocolError(refused.disconnect, refused.detail) from None
                    # An expired token, a backend's error: answered, and (as Centrifugo) nothing more of
                    # this frame is carried out; the SDK decides what comes next.
                    self._error(command_id, refused.error)
                    return
            if self.closed:
                return

    async def _decoded(self, command_id: int, request: dict[str, Any], codec: Codec) -> None:
        method = next((m for m in cmd.METHODS if m in request), None)
        if method is None:
            if command_id == 0:
                self.on_pong()
                return
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "command has no known method")
        body = request[method]
        if not isinstance(body, dict):
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} request must be an object")
        if method != "connect" and not self.connected:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} before connect")
        if method == "send":
            COMMANDS.labels(method).inc()
            return
        if command_id == 0:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} needs an id")
        try:
            command = cmd.parse(method, body, codec.payload, codec.rpc_data)
        except ReplyError as exc:
            self._error(command_id, exc)
            return
        await self.execute(command_id, command)

    def _refuse(self, command_id: int, detail: str) -> None:
        COMMAND_ERRORS.labels(str(codes.TOO_MANY_REQUESTS.code)).inc()
        if command_id:  # a pong or a send has no reply to carry the error
            error = codes.ErrorCode(codes.TOO_MANY_REQUESTS.code, f"{codes.TOO_MANY_REQUESTS.message}: {detail}")
            self.sink.error(command_id, error, temporary=True)

    def _error(self, command_id: int, exc: ReplyError) -> None:
        COMMAND_ERRORS.labels(str(exc.error.code)).inc()
        # The detail tells the client what exactly was wrong; the code is what SDKs react to.
        error = codes.ErrorCode(exc.error.code, f"{exc.error.message}: {exc.detail}") if exc.detail else exc.error
        self.sink.error(command_id, error, temporary=exc.temporary)

    # typed commands

    async def execute(self, command_id: int, command: cmd.Command) -> None:
        """Carry out one command; its reply (or error) goes to the sink before anything it causes.

        A failure of the command is an error reply and the connection stays: ReplyError with its code, a
        broker failure 100 (temporary), anything unexpected 100. ProtocolError (the client broke the
        protocol) and Refused (connect: admission said no) reach the caller, whose protocol decides."""
        method = command.method
        if not self.connected and method != "connect":
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, f"{method} before connect")
        COMMANDS.labels(method).inc()
        try:
            result = await self._run(command_id, command)
        except (ProtocolError, Refused):
            raise
        except ReplyError as exc:
            self._error(command_id, exc)
            return
        except BrokerError as exc:
            log.warning("%s failed for client %s: %s", method, self.id, exc)
            COMMAND_ERRORS.labels(str(codes.INTERNAL.code)).inc()
            self.sink.error(command_id, codes.INTERNAL, temporary=True)
            return
        except Exception:
            log.exception("%s of client %s failed", method, self.id)
            COMMAND_ERRORS.labels(str(codes.INTERNAL.code)).inc()
            self.sink.error(command_id, codes.INTERNAL)
            return
        if result is not None:
            self.sink.reply(command_id, method, result)

    async def _run(self, command_id: int, command: cmd.Command) -> Any:
        match command:
            case cmd.Connect():
                await self._connect(command_id, command)
                return None
            case cmd.Subscribe():
                result, flush = await self._subscribe(command, server_side=False)
                self.sink.reply(command_id, "subscribe", result)
                flush()
                return None
            case cmd.Publish():
                return await self._publish(command.channel, command.data, command.idempotency_key)
            case cmd.Unsubscribe():
                await self._leave(command.channel)
                return {}
            case cmd.History():
                return await self._history(command)
            case cmd.Presence():
                self._channel_access(command.channel, "allow_presence", **PRESENCE_AVAILABLE)
                return {"presence": await self.gateway.broker.presence(command.channel)}
            case cmd.PresenceStats():
                self._channel_access(command.channel, "allow_presence", **PRESENCE_AVAILABLE)
                stats = await self.gateway.broker.presence_stats(command.channel)
                return {"num_clients": stats.num_clients, "num_users": stats.num_users}
            case cmd.Ping():
                return {}
            case cmd.Send():
                return None
            case cmd.Rpc():
                return await self._rpc(command)
            case cmd.Refresh():
                return await self._refresh(command)
            case cmd.SubRefresh():
                return await self._sub_refresh(command)
        raise ReplyError(codes.METHOD_NOT_FOUND)

    # connect and refresh

    async def _connect(self, command_id: int, command: cmd.Connect) -> None:
        if self.connected:
            raise ProtocolError(codes.BAD_REQUEST_DISCONNECT, "connect sent twice")
        self.emulated_headers = dict(command.headers)
        attempt = ConnectAttempt(command.data, command.name, command.version, tuple(command.subs))
        admitted = await self.gateway.admission.admit(
            self.connection.peer, command.token, self.connection.protocol, caller=self.caller(), attempt=attempt
        )
        grant = admitted.grant
        self.admit(grant, admitted.principal)
        self.meta = admitted.meta or _meta_claim(grant.claims)
        result: ConnectResult = {
            "client": self.id,
            "version": VERSION,
            "ping": int(self.settings.ping_interval),
            "pong": self.sink.pongs,
            "node": self.node.name,
        }
        if grant.session_id:
            result["session"] = grant.session_id
        if admitted.data:
            result["data"] = admitted.data
        # With a refresh hook the server extends the connection itself: the client is not told it expires.
        if not self.gateway.hooks.refresh_proxy:
            result.update(self._expiry())  # type: ignore[typeddict-item]
        server_subs: dict[str, SubscribeResult] = {}
        flushes = []
        for channel in grant.server_subs:
            wanted = command.subs.get(channel) or cmd.Subscribe(channel)
            sub_result, flush = await self._subscribe(wanted, server_side=True, preset=admitted.subs.get(channel))
            server_subs[channel] = sub_result
            flushes.append(flush)
        if server_subs:
            result["subs"] = server_subs
        self.sink.reply(command_id, "connect", result)
        for flush in flushes:
            flush()
        self._event(GatewayEvent.CONNECTED)

    def admit(self, grant: ConnectionGrant, principal: Principal) -> None:
        """The session is this grant's from now on (admission has let it in)."""
        self.grant = grant
        self.user = grant.user
        self.session_id = grant.session_id
        self.conn_info = grant.info
        self.principal = principal
        self.expires_at = grant.expires_at
        self.connected = True
        self.gateway.registry.admitted(self)
        self.next_ping = time.monotonic() + self.settings.ping_interval

    def _expiry(self) -> dict[str, Any]:
        if self.expires_at is None:
            return {}
        return {"expires": True, "ttl": max(0, int(self.expires_at - time.time()))}

    def caller(self) -> Caller:
        """This connection as the proxy hooks' backends are told of it."""
        return Caller(
            client=self.id,
            transport=self.transport_name,
            protocol=getattr(self.sink.renderer, "name", "json"),
            user=self.user,
            meta=self.meta,
            handshake_headers=self.connection.peer.headers,
            emulated_headers=self.emulated_headers,
        )

    async def _refresh_by_backend(self) -> None:
        """The refresh hook, when the connection's expiry came: the backend extends it or lets it end."""
        try:
            verdict = await self.gateway.hooks.refresh(self.caller())
        except ProtocolError as exc:
            self.disconnect(exc.disconnect)
            return
        except ReplyError as exc:
            log.warning("refresh of client %s refused or failed: %s", self.id, exc)
            self.disconnect(codes.SERVER_ERROR)
            return
        finally:
            self._refreshing = False
        if verdict.expired or verdict.expires_at is None or verdict.expires_at <= time.time():
            self.disconnect(codes.CONNECTION_EXPIRED)
            return
        self.expires_at = verdict.expires_at
        if verdict.info is not None:
            self.conn_info = verdict.info

    async def _refresh(self, command: cmd.Refresh) -> dict[str, Any]:
        admitted = await self.gateway.admission.grant(self.connection.peer, command.token, self.connection.protocol)
        grant = admitted.grant
        if grant.user != self.user:
            raise ProtocolError(codes.INVALID_TOKEN, "refresh token is for another user")
        self.grant = grant
        self.expires_at = grant.expires_at
        self.principal = admitted.principal
        return self._expiry()

    # subscriptions

    async def _subscribe(
        self, request: cmd.Subscribe, *, server_side: bool, preset: SubscriptionPreset | None = None
    ) -> tuple[SubscribeResult, Callable[[], None]]:
        """Subscribe and compute the result; the returned flush sends what was buffered meanwhile,
        and must run right after the reply is queued. `preset`: what a backend decided for a channel it
        subscribes the client to (the connect hook's answer)."""
        gateway = self.gateway
        channel = request.channel
        options = gateway.policy.options(channel)
        if channel in self.subscriptions:
            raise ReplyError(codes.ALREADY_SUBSCRIBED)
        if len(self.subscriptions) >= self.settings.max_channels_per_client:
            raise ReplyError(codes.LIMIT_EXCEEDED, "too many subscriptions on this connection")
        if request.tags_filter is not None and not options.allow_tags_filter:
            raise ReplyError(codes.BAD_REQUEST, "tags filters are not allowed in this namespace")
        if request.delta and request.tags_filter is not None:
            raise ReplyError(codes.BAD_REQUEST, "delta and a tags filter cannot be combined")
        sub_grant = None
        if request.token:
            sub_grant = await gateway.verifier.verify_subscription(request.token, self.user, channel)
        if not server_side and sub_grant is None:
            if options.subscribe_proxy and "#" not in channel:
                # The backend decides (user-limited channels excepted: their names say who may).
                preset = await gateway.hooks.subscribe(options.subscribe_proxy, self.caller(), channel, request.data)
            if preset is None:
                gateway.policy.check(options.allow_subscribe, channel, self.principal)
        subscription = self._subscription(request, options, server_side, sub_grant, preset)
        if preset is not None and preset.expires_at is not None and preset.expires_at <= time.time():
            # (a token's expiry has its clock-skew leeway; a backend's answer is read as it says)
            raise ReplyError(codes.EXPIRED, "the backend's expiry for this subscription is in the past")
        self.subscriptions[channel] = subscription
        try:
            await self.node.add_subscriber(channel, self, subscription)
            result, last_offset = await self._position(request, subscription)
        except BaseException:
            self.subscriptions.pop(channel, None)
            await self.node.remove_subscriber(channel, self)
            raise
        if preset is not None and preset.data:
            result["data"] = preset.data
        # With a sub_refresh hook the server extends the subscription itself: the client is not told it expires.
        if subscription.expires_at is not None and not subscription.options.sub_refresh_proxy:
            result["expires"] = True
            result["ttl"] = max(0, int(subscription.expires_at - time.time()))
        positioned, matches, delta = subscription.positioned, subscription.tags_filter, subscription.delta
        if delta:
            result["delta"] = True

        def flush() -> None:
            subscription.buffering = False
            buffered, subscription.buffer = subscription.buffer, []
            renderer, deliver = self.sink.renderer, self.sink.deliver
            for event in buffered:
                if isinstance(event, PresenceEvent):
                    frame = (renderer.join_push if event.join else renderer.leave_push)(channel, event.info)
                elif (not positioned or event.offset > last_offset) and (matches is None or matches(event.tags)):
                    # (the others are part of the recovered history or older than where the client starts)
                    if delta and isinstance(renderer, Codec):
                        frame = renderer.delta_publication_push(channel, event, renderer.delta_base(event.data), False)
                    else:
                        frame = renderer.publication_push(channel, event)
                else:
                    continue
                if frame:
                    deliver(frame)
            self.node.go_live(channel, self, last_offset if positioned else 0)

        info = self.client_info(subscription)
        if subscription.options.presence:
            await gateway.broker.add_presence(channel, self.id, info, ttl=self.settings.presence_ttl)
        if subscription.options.join_leave:
            await gateway.broker.publish_presence(channel, True, info)
        self._event(GatewayEvent.SUBSCRIBED, channel)
        return result, flush

    def _subscription(
        self,
        request: cmd.Subscribe,
        options: ChannelOptions,
        server_side: bool,
        sub_grant: SubscriptionGrant | None,
        preset: SubscriptionPreset | None,
    ) -> Subscription:
        """The subscription's features, as Centrifugo weighs them: the namespace's options, a backend's
        overrides, and what the client asked for where the namespace (or its history permission) lets it."""
        channel = request.channel
        kept = options.history_size > 0
        may_read_history = sub_grant is not None or self.gateway.policy.allows(
            options.allow_history, channel, self.principal
        )
        overrides: dict[str, Any] = {}
        if preset is not None:
            if preset.presence is not None:
                overrides["presence"] = preset.presence
            if preset.join_leave is not None:
                overrides["join_leave"] = preset.join_leave
        if overrides:
            options = options.model_copy(update=overrides)
        recovery = options.recovery if preset is None or preset.recovery is None else preset.recovery
        if request.recoverable and (options.allow_recovery or may_read_history):
            recovery = True
        positioning = options.force_positioning if preset is None or preset.positioning is None else preset.positioning
        if request.positioned and (options.allow_positioning or may_read_history):
            positioning = True
        recoverable = kept and recovery
        # Granted where the namespace allows the type, to a native client (its codec makes deltas), and
        # not beside a backend's tags filter (each subscriber would hold a different previous payload).
        delta = (
            bool(request.delta)
            and request.delta in options.allowed_delta_types
            and isinstance(self.sink.renderer, Codec)
            and not (preset is not None and preset.server_tags_filter)
        )
        filters = [f.matches for f in (request.tags_filter, preset.server_tags_filter if preset else None) if f]
        return Subscription(
            channel=channel,
            options=options,
            recoverable=recoverable,
            positioned=recoverable or (kept and positioning),
            join_leave=options.join_leave and (server_side or request.join_leave),
            expires_at=(preset.expires_at if preset is not None else None)
            or (sub_grant.expires_at if sub_grant else None),
            chan_info=(preset.info if preset is not None else b"") or (sub_grant.info if sub_grant else b""),
            delta=delta,
            tags_filter=filters[0]
            if len(filters) == 1
            else (lambda tags: all(f(tags) for f in filters))
            if filters
            else None,
        )

    async def _position(self, request: cmd.Subscribe, subscription: Subscription) -> tuple[SubscribeResult, int]:
        if not subscription.positioned:
            return {}, 0
        broker = self.gateway.broker
        channel = request.channel
        options = subscription.options
        meta_ttl = options.meta_ttl
        since = request.since if subscription.recoverable else None
        if since is None:
            top = await broker.history(channel, limit=0, meta_ttl=meta_ttl)
            position = top.position
            fresh: SubscribeResult = {"positioned": True, "epoch": position.epoch, "offset": position.offset}
            if subscription.recoverable:
                fresh["recoverable"] = True
            return fresh, position.offset
        if options.recovery_mode == "cache":
            return await self._recover_latest(channel, since, subscription)
        if not since.epoch:
            # "Any epoch": recover from the offset in the stream's current one.
            top = await broker.history(channel, limit=0, meta_ttl=meta_ttl)
            since = StreamPosition(since.offset, top.position.epoch)
        history = await broker.history(channel, since=since, limit=options.history_size, meta_ttl=meta_ttl)
        position = history.position
        publications = history.publications if position.epoch == since.epoch else []
        if position.epoch != since.epoch:
            recovered = False
        elif publications:
            recovered = publications[0].offset == since.offset + 1 and publications[-1].offset == position.offset
        else:
            recovered = position.offset == since.offset
        if not recovered and request.reject_unrecovered:
            raise ReplyError(codes.UNRECOVERABLE_POSITION)
        result: SubscribeResult = {
            "recoverable": True,
            "positioned": True,
            "epoch": position.epoch,
            "was_recovering": True,
        }
        if recovered:
            matches = subscription.tags_filter
            if matches is not None:
                publications = [p for p in publications if matches(p.tags)]
            # As Centrifugo: the client's own offset, and the publications that carry it to the top.
            result |= {"offset": since.offset, "recovered": True, "publications": publications}
        else:
            # Publications only where the stream is continuous: a client told `recovered: false` reloads its
            # state, and a partial history would look like all there is.
            result["offset"] = position.offset
        return result, position.offset

    async def _recover_latest(
        self, channel: str, since: StreamPosition, subscription: Subscription
    ) -> tuple[SubscribeResult, int]:
        """Cache recovery: the channel's latest publication (the latest that passes the subscriber's
        filter), unless the client already stands at the top; `recovered` when the latest publication is
        still kept, as Centrifugo's cache mode answers."""
        options = subscription.options
        matches = subscription.tags_filter
        limit = 1 if matches is None else options.history_size
        newest = await self.gateway.broker.history(channel, limit=limit, reverse=True, meta_ttl=options.meta_ttl)
        position = newest.position
        latest = newest.publications[0] if newest.publications else None
        chosen = latest if matches is None else next((p for p in newest.publications if matches(p.tags)), None)
        if chosen is None:
            latest = None
        same_state = since.offset > 0 and since.offset == position.offset and since.epoch == position.epoch
        if latest is None:
            recovered, publications = same_state, []
        else:
            recovered = latest.offset == position.offset
            publications = [chosen] if recovered and not same_state and chosen is not None else []
        result: SubscribeResult = {
            "recoverable": True,
            "positioned": True,
            "epoch": position.epoch,
            "offset": since.offset if recovered else position.offset,
            "was_recovering": True,
        }
        if recovered:
            result |= {"recovered": True, "publications": publications}
        return result, position.offset

    def client_info(self, subscription: Subscription | None = None) -> ClientInfo:
        return ClientInfo(
            user=self.user,
            client=self.id,
            conn_info=self.conn_info,
            chan_info=subscription.chan_info if subscription else b"",
        )

    async def _leave(self, channel: str, ended: codes.Disconnect | None = None) -> None:
        """`ended`: the connection's end is why (its UNSUBSCRIBED carries the code), else the client's call."""
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
        if ended is None:
            self._event(GatewayEvent.UNSUBSCRIBED, channel)
        else:
            self._event(GatewayEvent.UNSUBSCRIBED, channel, code=ended.code, reason=ended.reason, ending=True)

    def forget_subscription(self, channel: str) -> None:
        self.subscriptions.pop(channel, None)

    def lost_subscription(self, channel: str, code: int, reason: str) -> None:
        """The hub dropped the subscription (its state is gone): forget it and tell the client."""
        self.subscriptions.pop(channel, None)
        self.sink.unsubscribed(channel, code, reason)

    async def server_unsubscribe(self, channel: str, code: int = codes.UNSUBSCRIBE_SERVER, reason: str = "") -> None:
        if channel in self.subscriptions:
            await self._leave(channel)
            self.sink.unsubscribed(channel, code, reason or "server unsubscribe")

    async def server_subscribe(self, channel: str) -> None:
        if channel in self.subscriptions:
            return
        try:
            result, flush = await self._subscribe(cmd.Subscribe(channel), server_side=True)
        except (ReplyError, BrokerError) as exc:
            log.warning("server-side subscribe of %s to %s failed: %s", self.id, channel, exc)
            return
        self.sink.subscribed(channel, result)
        flush()

    async def _sub_refresh(self, command: cmd.SubRefresh) -> dict[str, Any]:
        subscription = self.subscriptions.get(command.channel)
        if subscription is None:
            raise ReplyError(codes.BAD_REQUEST, "not subscribed")
        grant = await self.gateway.verifier.verify_subscription(command.token, self.user, command.channel)
        subscription.expires_at = grant.expires_at
        if grant.expires_at is None:
            return {}
        return {"expires": True, "ttl": max(0, int(grant.expires_at - time.time()))}

    # publications, history, presence

    def _channel_access(
        self,
        channel: str,
        access_of: str,
        available: Callable[[ChannelOptions], bool] | None = None,
        what: str = "",
    ) -> Any:
        """The channel's options if this session may do `access_of` there; a feature the namespace does
        not have (`available` false) is 108 before any permission check, as Centrifugo answers."""
        if not channel:
            raise ReplyError(codes.BAD_REQUEST, "a channel is required")
        options = self.gateway.policy.options(channel)
        if available is not None and not available(options):
            raise ReplyError(codes.NOT_AVAILABLE, f"{what} in this namespace")
        subscribed = channel in self.subscriptions
        access = getattr(options, access_of)
        # A subscription granted by a subscription token also lets its holder read history and presence.
        by_token = subscribed and access_of in ("allow_history", "allow_presence") and access != "none"
        self.gateway.policy.check(access, channel, self.principal, granted_by_token=by_token)
        return options

    async def _publish(self, channel: str, data: bytes, key: str | None, key_ttl: float | None = None) -> PublishResult:
        if not channel:
            raise ReplyError(codes.BAD_REQUEST, "a channel is required")
        options = self.gateway.policy.options(channel)
        if not options.publish_proxy:
            self._channel_access(channel, "allow_publish")
        if not options.client_publish:
            raise ReplyError(codes.PERMISSION_DENIED, f"{channel} is written by the platform, not by clients")
        signed = None
        if options.signed:
            claims = self.grant.claims if self.grant is not None else {}
            signed = await self.gateway.signatures.verify(channel, self.user, claims, data)
        tags: dict[str, str] = {}
        keep_history = True
        if options.publish_proxy:
            # The backend decides instead of the permission, and may rewrite what is published.
            verdict = await self.gateway.hooks.publish(options.publish_proxy, self.caller(), channel, data)
            if verdict is None:
                self._channel_access(channel, "allow_publish")
            else:
                data, tags, keep_history = verdict.data, dict(verdict.tags), not verdict.skip_history
                key = verdict.idempotency_key or key
        if options.forward:
            forwarder = self.gateway.forwarders.get(options.forward)
            if forwarder is None:
                raise ReplyError(codes.NOT_AVAILABLE, f"no {options.forward} forwarder on this gateway")
            sender = Sender(self.user, self.id, self.grant.session_id if self.grant else "", self.node.name)
            forwarded: PublishResult = await forwarder(sender, channel, data)  # type: ignore[assignment]
            return forwarded
        subscription = self.subscriptions.get(channel)
        result = await self.gateway.broker.publish(
            channel,
            data,
            options.publish_options(
                idempotency_key=f"{self.user}/{key}" if key else None,
                idempotency_ttl=key_ttl or self.settings.idempotency_ttl,
                info=self.client_info(subscription),
                keep_history=keep_history,
                tags=tags,
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

    async def _history(self, command: cmd.History) -> dict[str, Any]:
        channel = command.channel
        options = self._channel_access(
            channel, "allow_history", available=lambda o: o.history_size > 0, what="no history"
        )
        limit = options.history_size if command.limit < 0 else min(command.limit, options.history_size)
        history = await self.gateway.broker.history(channel, since=command.since, limit=limit, reverse=command.reverse)
        return {
            "publications": history.publications,
            "epoch": history.position.epoch,
            "offset": history.position.offset,
        }

    async def _rpc(self, command: cmd.Rpc) -> dict[str, Any]:
        if command.name == PUBLISH_RPC:
            return {"data": await self._publish_by_rpc(command.data)}
        hooks = self.gateway.hooks
        if hooks.rpc_proxy and command.name not in self.gateway.rpc.routes:
            # A method without a route: the RPC hook's backend answers it (and decides who may call it).
            params = cmd.encode(orjson.dumps, command.data) if command.data is not None else b""
            return {"data": json_frames.json_value(await hooks.rpc(self.caller(), command.name, params))}
        data = await self.gateway.rpc.call(command.name, command.data, user=self.user, client=self.id, session=self)
        return {"data": data}

    async def _publish_by_rpc(self, params: Any) -> dict[str, Any]:
        """`$publish`: a publish whose result stock SDKs hand back (their publish() drops it), so an
        offline queue built on them learns the offset that acknowledges each entry."""
        if not isinstance(params, dict) or "data" not in params:
            raise ReplyError(codes.BAD_REQUEST, "$publish needs {channel, data, idempotency_key?}")
        channel, key = params.get("channel"), params.get("idempotency_key")
        if not isinstance(channel, str) or not channel:
            raise ReplyError(codes.BAD_REQUEST, "a channel is required")
        if key is not None and (not isinstance(key, str) or len(key) > cmd.MAX_IDEMPOTENCY_KEY):
            raise ReplyError(codes.BAD_REQUEST, "idempotency_key must be a string of at most 128 characters")
        data = cmd.encode(orjson.dumps, params["data"])
        # An outbox resends after a reply it lost, possibly hours later (a laptop shut right after sending):
        # its keys are remembered far longer than a live client's.
        result = await self._publish(channel, data, key, key_ttl=self.settings.outbox_idempotency_ttl)
        return {"offset": result.get("offset", 0), "epoch": result.get("epoch", "")}

    def may(self, access: str, channel: str) -> bool:
        """Whether this session may `access` ("allow_publish", ...) `channel` (RPC routes ask this)."""
        try:
            self._channel_access(channel, access)
        except ReplyError:
            return False
        return True

    # timers

    def on_pong(self) -> None:
        self.pong_deadline = None

    def on_tick(self, now: float) -> None:
        if not self.connected:
            if now - self.opened_at > self.settings.connect_timeout:
                self.disconnect(codes.STALE)
            return
        if self.pong_deadline is not None and now > self.pong_deadline:
            self.disconnect(codes.NO_PONG)
            return
        wall = time.time()
        grace = self.settings.pong_timeout
        if self.expires_at is not None:
            if self.gateway.hooks.refresh_proxy:
                # Server-side refresh: at expiry, the backend is asked (once at a time).
                if wall > self.expires_at and not self._refreshing:
                    self._refreshing = True
                    self._background(self._refresh_by_backend(), "refresh")
            elif wall > self.expires_at + grace:
                self.disconnect(codes.CONNECTION_EXPIRED)
                return
        for channel, subscription in self.subscriptions.items():
            if subscription.expires_at is None:
                continue
            by_backend = bool(subscription.options.sub_refresh_proxy)
            if wall > subscription.expires_at + (0 if by_backend else grace):
                self._expire(channel)
        # A sink without pings (the protocol adapters) keeps the connection alive its own way.
        if self.sink.pings and now >= self.next_ping:
            self.sink.ping()
            self.next_ping = now + self.settings.ping_interval
            if self.pong_deadline is None and self.sink.pongs:
                self.pong_deadline = now + self.settings.pong_timeout

    def _expire(self, channel: str) -> None:
        if channel in self._expiring:
            return
        self._expiring.add(channel)
        code, reason = UNSUBSCRIBE_EXPIRED

        async def unsubscribe() -> None:
            try:
                subscription = self.subscriptions.get(channel)
                if (
                    subscription is not None
                    and subscription.options.sub_refresh_proxy
                    and await self._sub_refresh_by_backend(channel, subscription)
                ):
                    return
                await self.server_unsubscribe(channel, code, reason)
            finally:
                self._expiring.discard(channel)

        self._background(unsubscribe(), f"expire-{channel}")

    async def _sub_refresh_by_backend(self, channel: str, subscription: Subscription) -> bool:
        """The sub_refresh hook at a subscription's expiry: True when the backend extended it."""
        name = subscription.options.sub_refresh_proxy
        try:
            verdict = await self.gateway.hooks.sub_refresh(name, self.caller(), channel)
        except ProtocolError as exc:
            self.disconnect(exc.disconnect)
            return True
        except ReplyError as exc:
            log.warning("sub_refresh of client %s on %s refused or failed: %s", self.id, channel, exc)
            self.disconnect(codes.SERVER_ERROR)
            return True
        if verdict.expired or verdict.expires_at is None or verdict.expires_at <= time.time():
            return False
        subscription.expires_at = verdict.expires_at
        if verdict.info is not None:
            subscription.chan_info = verdict.info
        return True

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the end

    def disconnect(self, disconnect: codes.Disconnect) -> None:
        """Ask the client's side to close (revocation, expiry, server API...); `end` follows."""
        self.sink.close(disconnect)

    async def end(self, disconnect: codes.Disconnect) -> None:
        """Forget everything about this session; called once when its connection ends."""
        if self.closed:
            return
        self.closed = True
        self.gateway.registry.remove(self)
        for channel in list(self.subscriptions):
            await self._leave(channel, disconnect)
        if self.connected:
            self._event(GatewayEvent.DISCONNECTED, code=disconnect.code, reason=disconnect.reason, ending=True)

    def _event(self, kind: int, channel: str = "", code: int = 0, reason: str = "", ending: bool = False) -> None:
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
                # auth's session list shows where a connection comes from.
                client_ip=self.connection.peer.ip if kind == GatewayEvent.CONNECTED else "",
                # left on purpose or lost: the matchmaker frees a seat at once or holds it for a reconnection
                client_closed=ending and self.connection.transport.client_closed,
            )
        )

    def __repr__(self) -> str:
        return f"<session {self.id} of {self.user!r} on {self.connection!r}>"
