"""`GET /socket.io/`: Socket.IO v5 over Engine.IO v4 (WebSocket and long-polling), on python-socketio's
AsyncServer, with rooms that are platform channels (docs/socketio.md).

Each Socket.IO socket owns an ordinary client session (protocols/base.py), admitted by the gateway's one
admission function with the CONNECT packet's `auth.token` (or the client certificate), so revocations,
origin, connection limits, channel permissions and fan-out are the native protocol's: room
"lobby" is channel "<socketio_namespace>:lobby", the Node holds one broker subscription per channel
for every local socket, and every replica delivers what any replica publishes.

A publication is `{"event": name, "args": [...]}` (bytes as `{"$binary": base64}`, `"volatile": true`
for volatile emits); it is rendered once per node into the start of a Socket.IO EVENT packet, and each
socket appends its recovery offset as the last argument, as Socket.IO 4.6+ connection state recovery
wants. That offset names every room of the socket with its stream position, so a client that
reconnects to any replica (or after a restart) with `{pid, offset}` in its CONNECT auth gets its rooms
back and the events it missed from channel history, and sees `socket.recovered === true`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from typing import Any

import engineio
import orjson
import socketio
from socketio import packet as sio_packet
from tsunagu_core.broker import Publication, StreamPosition

from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import Reply
from tsunagu_ws_gateway.core.transport import Peer
from tsunagu_ws_gateway.protocol import codes, json_frames
from tsunagu_ws_gateway.protocol.codes import ProtocolError, ReplyError
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession, error_text
from tsunagu_ws_gateway.transports.library import Gate, LibrarySocket, library_connection

log = logging.getLogger("tsunagu.gateway.socketio")

NAMESPACE = "/"
BINARY_KEY = "$binary"
_SEP = b"\x00"


def _to_json(value: Any) -> Any:
    """Socket.IO arguments as JSON: bytes become {"$binary": base64}."""
    if isinstance(value, bytes | bytearray):
        return {BINARY_KEY: base64.b64encode(value).decode()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(BINARY_KEY), str):
            return base64.b64decode(value[BINARY_KEY])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def event_of(data: Any) -> tuple[str, list[Any], bool]:
    """(event, args, volatile) of a publication's data; data published by others is a "message"."""
    if isinstance(data, dict) and isinstance(data.get("event"), str) and isinstance(data.get("args"), list):
        return data["event"], data["args"], bool(data.get("volatile"))
    return "message", [data], False


def render(channel: str, pub: Publication) -> bytes:
    """Once per node and publication: `channel NUL epoch NUL offset NUL flags NUL packet-start`, where
    packet-start is a Socket.IO EVENT packet without its closing bracket (the offset goes there)."""
    try:
        event, args, volatile = event_of(orjson.loads(pub.data))
    except orjson.JSONDecodeError:
        event, args, volatile = "message", [{BINARY_KEY: base64.b64encode(pub.data).decode()}], False
    body = orjson.dumps([event, *args])
    binary = b'"$binary"' in body
    flags = (b"v" if volatile else b"") + (b"b" if binary else b"")
    return _SEP.join((channel.encode(), pub.epoch.encode(), str(pub.offset).encode(), flags, b"2" + body[:-1]))


RENDERER = AdapterRenderer("socketio", render)


def _packet_size(item: Any) -> int:
    data = getattr(item, "data", None)
    return len(data) if isinstance(data, str | bytes) else 64


class BoundedQueue(asyncio.Queue[Any]):
    """An Engine.IO socket's send queue that knows how many bytes it holds, so a client that stops
    polling (or reading) is cut off as slow instead of growing it without end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes = 0

    def _put(self, item: Any) -> None:
        self.bytes += _packet_size(item)
        super()._put(item)

    def _get(self) -> Any:
        item = super()._get()
        self.bytes -= _packet_size(item)
        return item


def encode_offset(positions: dict[str, tuple[str, int]]) -> str:
    """Every room of a socket with its position: `offset|epoch|channel` joined by spaces (neither
    character is allowed in channel names)."""
    return " ".join(f"{offset}|{epoch}|{channel}" for channel, (epoch, offset) in positions.items())


def decode_offset(text: str) -> dict[str, tuple[str, int]]:
    positions: dict[str, tuple[str, int]] = {}
    for part in text.split():
        offset, epoch, channel = part.split("|", 2)
        positions[channel] = (epoch, int(offset))
    return positions


class SocketState:
    """One Socket.IO socket: its session (through the bridge), rooms' positions, and its sender."""

    def __init__(self, bridge: SocketIOBridge, sid: str, eio_sid: str, environ: dict[str, Any]) -> None:
        self.owner = bridge
        self.sid = sid
        self.eio_sid = eio_sid
        self.pid = uuid.uuid4().hex
        self.positions: dict[str, tuple[str, int]] = {}
        self.ready = False
        self.held: list[Any] = []
        scope = environ.get("asgi.scope") or {}
        self.connection = library_connection(bridge.gateway, scope, "socketio", "socketio")
        socket = self.connection.transport
        if isinstance(socket, LibrarySocket):
            socket.on_close = self.close
        self.link = AdapterSession(bridge.gateway, self.connection, RENDERER, deliver=self.deliver, close=self.close)
        self.closing: codes.Disconnect | None = None
        self.client_closed = False  # the library does not tell a close frame from a lost link
        self._last_frame: bytes | None = None
        self._parsed: tuple[str, str, int, bytes, bytes] = ("", "", 0, b"", b"")

    @property
    def session(self) -> Any:
        return self.link.session

    # out

    def deliver(self, frame: bytes) -> None:
        if frame is not self._last_frame:  # the same bytes go to every local subscriber: parse once
            raw_channel, raw_epoch, raw_offset, raw_flags, raw_start = frame.split(_SEP, 4)
            self._last_frame = frame
            self._parsed = (raw_channel.decode(), raw_epoch.decode(), int(raw_offset), raw_flags, raw_start)
        channel, epoch, offset, flags, start = self._parsed
        if b"v" in flags and self.owner.backlog(self.eio_sid) >= self.owner.volatile_backlog:
            return  # volatile: dropped for a client that does not keep up
        if offset:
            self.positions[channel] = (epoch, offset)
        suffix = orjson.dumps(encode_offset(self.positions)) if self.positions else b""
        if b"b" in flags:
            data = _from_json(orjson.loads(start[1:] + b"]"))
            if suffix:
                data.append(orjson.loads(suffix))
            self.send(sio_packet.Packet(sio_packet.EVENT, data=data))
        else:
            self.send(start + (b"," + suffix if suffix else b"") + b"]")

    def deliver_recovered(self, channel: str, epoch: str, pub: Publication) -> None:
        event, args, _ = event_of(json_frames.json_value(pub.data))
        offset = pub.offset
        if offset:
            self.positions[channel] = (epoch, offset)
        data = _from_json([event, *args, encode_offset(self.positions)])
        self.send(sio_packet.Packet(sio_packet.EVENT, data=data))

    def send(self, item: bytes | sio_packet.Packet) -> None:
        if not self.ready:
            self.held.append(item)
            return
        self.owner.send_raw(self.eio_sid, item, self.sid)

    def flush(self) -> None:
        self.ready = True
        held, self.held = self.held, []
        for item in held:
            self.owner.send_raw(self.eio_sid, item, self.sid)

    def close(self, disconnect: codes.Disconnect) -> None:
        if self.closing is None:
            self.closing = disconnect
            self.connection.transport.close(disconnect)
            self.held.clear()
            self.owner.close_later(self.sid, disconnect)


def channel_error(reply: Reply) -> str | None:
    return error_text(reply) or None


class ChannelManager(socketio.AsyncManager):
    """python-socketio's client manager with rooms that are platform channels: emitting to a room
    publishes to its channel through the broker (every replica delivers it); entering a room from the
    server API subscribes the socket's session to the channel."""

    def __init__(self) -> None:
        super().__init__()
        self.bridge: SocketIOBridge | None = None

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: str | None = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: str | None = None,
        **kwargs: Any,
    ) -> None:
        target = to if to is not None else room
        bridge = self.bridge
        if bridge is None or target is None or target in bridge.sockets or self.is_connected(target, namespace):
            await super().emit(event, data, namespace, room=target, skip_sid=skip_sid, callback=callback, **kwargs)
            return
        args = list(data) if isinstance(data, tuple) else [data]
        await bridge.publish(target, event, args)

    async def enter_room(self, sid: str, namespace: str, room: str, eio_sid: str | None = None) -> None:
        bridge = self.bridge
        state = bridge.sockets.get(sid) if bridge is not None else None
        if state is not None and bridge is not None and room != sid:
            await state.session.server_subscribe(bridge.channel(room))
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)

    async def leave_room(self, sid: str, namespace: str, room: str) -> None:
        bridge = self.bridge
        state = bridge.sockets.get(sid) if bridge is not None else None
        if state is not None and bridge is not None and room != sid:
            await state.session.server_unsubscribe(bridge.channel(room))
        await super().leave_room(sid, namespace, room)


class EngineServer(engineio.AsyncServer):
    """Engine.IO with send queues that count their bytes (BoundedQueue)."""

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        return BoundedQueue(*args, **kwargs)


class Server(socketio.AsyncServer):
    """Adds the recovery session id (`pid`) to the CONNECT packet, then sends what the socket got
    while connecting (recovered history first)."""

    bridge: SocketIOBridge

    def _engineio_server_class(self) -> Any:
        return EngineServer

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        if pkt.packet_type == sio_packet.CONNECT and isinstance(pkt.data, dict) and "sid" in pkt.data:
            state = self.bridge.sockets.get(pkt.data["sid"])
            if state is not None:
                pkt.data["pid"] = state.pid
                await super()._send_packet(eio_sid, pkt)
                state.flush()
                return
        await super()._send_packet(eio_sid, pkt)


class SocketIOBridge:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        settings = gateway.settings
        self.prefix = settings.socketio_namespace
        self.volatile_backlog = settings.socketio_volatile_backlog
        self.sockets: dict[str, SocketState] = {}
        self.manager = ChannelManager()
        self.manager.bridge = self
        self.server = Server(
            async_mode="asgi",
            client_manager=self.manager,
            # The gateway's one origin policy (core/admission.py), for every Engine.IO request.
            cors_allowed_origins=self._origin_allowed,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.pong_timeout,
            max_http_buffer_size=settings.max_frame_bytes,
        )
        self.server.bridge = self
        self.server.on("connect", self.on_connect)
        self.server.on("disconnect", self.on_disconnect)
        self.server.on("join", self.on_join)
        self.server.on("leave", self.on_leave)
        self.server.on("emit", self.on_emit)
        self._tasks: set[asyncio.Task[Any]] = set()

    def _origin_allowed(self, origin: str | None, environ: dict[str, Any]) -> bool:
        return self.gateway.admission.origin_allowed(Peer.of(environ.get("asgi.scope") or {}))

    def asgi_app(self) -> Any:
        # Mounted at /socket.io: every request that reaches it is Engine.IO's. A request without `sid`
        # opens an Engine.IO session: admission screens it (origin, draining) before Engine.IO sees it.
        app = socketio.ASGIApp(self.server, socketio_path=None)
        return Gate(app, self.gateway, "socketio", opens=_opens_a_session, count=False)

    def channel(self, room: str) -> str:
        return f"{self.prefix}:{room}" if self.prefix else room

    def room_of(self, channel: str) -> str:
        return channel[len(self.prefix) + 1 :] if self.prefix else channel

    # sending

    def _socket(self, eio_sid: str) -> Any:
        socket = self.server.eio.sockets.get(eio_sid)
        return None if socket is None or socket.closed else socket

    def backlog(self, eio_sid: str) -> int:
        socket = self._socket(eio_sid)
        return 0 if socket is None else int(socket.queue.qsize())

    def send_raw(self, eio_sid: str, item: bytes | sio_packet.Packet, sid: str = "") -> None:
        socket = self._socket(eio_sid)
        if socket is None:
            return
        encoded = [item.decode()] if isinstance(item, bytes) else item.encode()
        if not isinstance(encoded, list):
            encoded = [encoded]
        queue = socket.queue
        for part in encoded:
            queue.put_nowait(engineio.packet.Packet(engineio.packet.MESSAGE, data=part))
        if isinstance(queue, BoundedQueue) and queue.bytes > self.gateway.settings.send_buffer_bytes and sid:
            state = self.sockets.get(sid)
            if state is not None:
                state.close(codes.SLOW)

    def close_later(self, sid: str, disconnect: codes.Disconnect) -> None:
        log.info("closing socket.io client %s: %s", sid, disconnect.reason)
        eio_sid = self.manager.eio_sid_from_sid(sid, NAMESPACE)

        slow = disconnect is codes.SLOW

        async def close() -> None:
            # The Socket.IO DISCONNECT, then the Engine.IO session under it: a client that ignores the
            # first (a revoked one, say) does not keep a socket open, and one that does not poll is not
            # waited for (Engine.IO's own disconnect waits until its queue is read).
            if not slow:
                await self.server.disconnect(sid)
            engine = self.server.eio
            socket = engine.sockets.get(eio_sid) if eio_sid is not None else None
            if socket is None:
                return
            if slow:
                while not socket.queue.empty():
                    socket.queue.get_nowait()
                    socket.queue.task_done()
            with contextlib.suppress(Exception):
                await socket.close(wait=False, abort=slow, reason=engine.reason.SERVER_DISCONNECT)
            engine.sockets.pop(eio_sid, None)
            with contextlib.suppress(Exception):
                socket.queue.put_nowait(None)  # ends a writer waiting for packets

        task = asyncio.get_running_loop().create_task(close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # publishing

    async def publish(
        self, room: str, event: str, args: list[Any], *, key: str | None = None, volatile: bool = False
    ) -> dict[str, Any]:
        """Server-side emit to a room: straight to the broker, as the server API publishes."""
        channel = self.channel(room)
        options = self.gateway.policy.options(channel)
        body: dict[str, Any] = {"event": event, "args": _to_json(args)}
        if volatile:
            body["volatile"] = True
        result = await self.gateway.broker.publish(
            channel,
            orjson.dumps(body),
            options.publish_options(idempotency_key=key, idempotency_ttl=self.gateway.settings.idempotency_ttl),
        )
        return {"offset": result.offset, "epoch": result.epoch}

    # handlers

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        auth = auth if isinstance(auth, dict) else {}
        token = auth.get("token") or ""
        if not isinstance(token, str):
            raise socketio.exceptions.ConnectionRefusedError("auth.token must be a string")
        eio_sid = self.manager.eio_sid_from_sid(sid, NAMESPACE)
        state = SocketState(self, sid, eio_sid, environ)
        registry = self.gateway.registry
        try:
            registry.open(state.connection)
            try:
                reply = await state.link.connect(token)
            except BaseException:
                registry.close(state.connection)
                raise
        except Refused as refused:
            await state.link.end(refused.disconnect)
            raise socketio.exceptions.ConnectionRefusedError(
                refused.detail, {"code": refused.disconnect.code, "reason": refused.disconnect.reason}
            ) from None
        except ProtocolError as exc:
            await state.link.end(exc.disconnect)
            raise socketio.exceptions.ConnectionRefusedError(f"{exc} ({exc.disconnect.code})") from None
        error = channel_error(reply)
        if error is not None:
            await state.link.end(codes.INVALID_TOKEN)
            registry.close(state.connection)
            raise socketio.exceptions.ConnectionRefusedError(error)
        self.sockets[sid] = state
        pid, offset = auth.get("pid"), auth.get("offset")
        if isinstance(pid, str) and isinstance(offset, str) and offset and await self.recover(state, offset):
            state.pid = pid

    async def recover(self, state: SocketState, offset: str) -> bool:
        """Rejoin the rooms named in the client's offset and send what it missed; all or nothing."""
        try:
            positions = decode_offset(offset)
        except (ValueError, TypeError):
            return False
        recovered = True
        for channel, (epoch, since) in positions.items():
            if not channel.startswith(f"{self.prefix}:" if self.prefix else ""):
                recovered = False
                break

            def on_reply(reply: Reply, channel: str = channel) -> None:
                if not reply.ok:
                    return
                result = reply.result
                state.positions[channel] = (str(result.get("epoch", "")), int(result.get("offset", 0)))
                if result.get("recovered"):
                    for pub in result.get("publications", []):
                        state.deliver_recovered(channel, str(result.get("epoch", "")), pub)

            command = cmd.Subscribe(channel, since=StreamPosition(since, epoch))
            try:
                reply = await state.link.call(command, on_reply)
            except ProtocolError:
                return False
            if not reply.ok or not reply.result.get("recovered"):
                recovered = False
                break
            self.manager.basic_enter_room(state.sid, NAMESPACE, self.room_of(channel))
        if not recovered:  # start afresh: no rooms, nothing held, a new pid
            for channel in list(state.session.subscriptions):
                with contextlib.suppress(ProtocolError):
                    await state.link.call(cmd.Unsubscribe(channel))
                self.manager.basic_leave_room(state.sid, NAMESPACE, self.room_of(channel))
            state.positions.clear()
            state.held.clear()
        return recovered

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        state = self.sockets.pop(sid, None)
        if state is not None:
            await state.link.end(state.closing or codes.CONNECTION_CLOSED)
            self.gateway.registry.close(state.connection)

    def _room_request(self, sid: str, room: Any, verb: str) -> tuple[SocketState, str] | dict[str, Any]:
        """The socket's state and the room's channel, or the error to answer with."""
        state = self.sockets.get(sid)
        if state is None:
            return {"error": "not connected"}
        if not isinstance(room, str) or not room:
            return {"error": f"{verb} needs a room name"}
        return state, self.channel(room)

    async def on_join(self, sid: str, room: Any = None) -> dict[str, Any]:
        found = self._room_request(sid, room, "join")
        if isinstance(found, dict):
            return found
        state, channel = found

        def on_reply(reply: Reply) -> None:
            result = reply.result
            if reply.ok and result.get("epoch"):
                state.positions[channel] = (str(result["epoch"]), int(result.get("offset", 0)))

        try:
            reply = await state.link.call(cmd.Subscribe(channel), on_reply)
        except ProtocolError as exc:
            state.close(exc.disconnect)
            return {"error": str(exc)}
        error = channel_error(reply)
        if error is not None:
            return {"error": error}
        self.manager.basic_enter_room(sid, NAMESPACE, room)
        return {"ok": True, "room": room}

    async def on_leave(self, sid: str, room: Any = None) -> dict[str, Any]:
        found = self._room_request(sid, room, "leave")
        if isinstance(found, dict):
            return found
        state, channel = found
        try:
            reply = await state.link.call(cmd.Unsubscribe(channel))
        except ProtocolError as exc:
            state.close(exc.disconnect)
            return {"error": str(exc)}
        error = channel_error(reply)
        if error is not None:
            return {"error": error}
        state.positions.pop(channel, None)
        self.manager.basic_leave_room(sid, NAMESPACE, room)
        return {"ok": True, "room": room}

    async def on_emit(self, sid: str, request: Any = None) -> dict[str, Any]:
        """`emit {room, event, args?, key?, volatile?}`: publish to the room's channel; the ack gets
        `{offset, epoch}` (no offset in a channel without history) or `{error}`."""
        state = self.sockets.get(sid)
        if state is None:
            return {"error": "not connected"}
        if not isinstance(request, dict):
            return {"error": "emit needs an object {room, event, args}"}
        room, event, args = request.get("room"), request.get("event"), request.get("args", [])
        key, volatile = request.get("key"), bool(request.get("volatile"))
        if not isinstance(room, str) or not room or not isinstance(event, str) or not event:
            return {"error": "emit needs a room and an event name"}
        if not isinstance(args, list):
            args = [args]
        if key is not None and not isinstance(key, str):
            return {"error": "key must be a string"}
        if key is not None and len(key) > cmd.MAX_IDEMPOTENCY_KEY:
            return {"error": f"key must be at most {cmd.MAX_IDEMPOTENCY_KEY} characters"}
        data: dict[str, Any] = {"event": event, "args": _to_json(args)}
        if volatile:
            data["volatile"] = True
        try:
            payload = cmd.encode(json_frames.encode_data, data)
        except ReplyError as exc:
            return {"error": str(exc)}
        try:
            reply = await state.link.call(cmd.Publish(self.channel(room), payload, key or None))
        except ProtocolError as exc:
            state.close(exc.disconnect)
            return {"error": str(exc)}
        except ReplyError as exc:
            return {"error": str(exc)}
        error = channel_error(reply)
        if error is not None:
            return {"error": error}
        return dict(reply.result)


def _opens_a_session(scope: Any) -> bool:
    return b"sid=" not in scope.get("query_string", b"")


def build_socketio_app(gateway: Gateway) -> Any:
    return SocketIOBridge(gateway).asgi_app()
