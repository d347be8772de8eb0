"""`GET /stomp`: STOMP 1.2 over WebSocket (subprotocol `v12.stomp`), on an ordinary client session
(protocols/base.py).

CONNECT/STOMP carries the JWT as `passcode` or a `token` header. SUBSCRIBE `/topic/<channel>` (ack
modes are accepted, every message counts as acknowledged), UNSUBSCRIBE, SEND `/topic/<channel>`
(a JSON body is published as it is, a `text/*` one as a JSON string, anything else as raw bytes),
receipts on every frame that asks, DISCONNECT with receipt, heart-beats both ways. A frame the
gateway refuses (bad frame, permission denied, limits) gets an ERROR frame and the connection
closes, as STOMP wants; the close code is the native protocol's (3501 bad request, 3507 permission
denied, 3500 invalid token, 1009 message too big).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.websockets import WebSocket
from tsunagu_core.broker import StreamPosition

from tsunagu_ws_gateway.core import commands as cmd
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.refusals import Refused
from tsunagu_ws_gateway.core.replies import Reply
from tsunagu_ws_gateway.core.session import VERSION
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol import codes, stomp
from tsunagu_ws_gateway.protocol.codes import Disconnect, ProtocolError
from tsunagu_ws_gateway.protocol.stomp import Frame, StompError
from tsunagu_ws_gateway.protocols.base import AdapterRenderer, AdapterSession
from tsunagu_ws_gateway.transports.websocket import serve_websocket

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
RENDERER = AdapterRenderer("stomp", stomp.publication_message)
# The shortest interval between heart-beats the gateway offers to send.
MIN_SEND_MS = 1000
PERMISSION_DENIED = codes.PERMISSION_DENIED_DISCONNECT


class Rejected(Exception):
    """Answer with an ERROR frame and close."""

    def __init__(self, message: str, disconnect: codes.Disconnect = codes.BAD_REQUEST_DISCONNECT) -> None:
        super().__init__(message)
        self.disconnect = disconnect


class StompConnection:
    def __init__(self, gateway: Gateway, connection: Connection) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.max_frame_bytes = gateway.settings.max_frame_bytes
        self.outbox = connection.transport
        self.bridge = AdapterSession(gateway, connection, RENDERER, deliver=self.deliver, close=self.outbox.close)
        # destination line (as publication_message writes it) -> subscription id, and back
        self.by_destination: dict[bytes, str] = {}
        self.destinations: dict[str, tuple[bytes, str]] = {}
        self.message_ids = 0
        self.send_every = 0.0  # seconds; 0: no heart-beats
        self.expect_every = 0.0
        self.last_sent = time.monotonic()
        self.last_received = time.monotonic()
        self.beats: asyncio.Task[None] | None = None

    # out

    def send(self, frame: bytes) -> None:
        self.last_sent = time.monotonic()
        self.outbox.send(frame)

    def deliver(self, message: bytes) -> None:
        subscription = self.by_destination.get(stomp.destination_of(message))
        if subscription is None:
            return
        self.message_ids += 1
        self.send(stomp.with_subscription(message, subscription, str(self.message_ids)))

    def refuse(self, message: str, disconnect: codes.Disconnect, receipt_id: str = "") -> None:
        self.send(stomp.error(message, receipt_id=receipt_id))
        self.outbox.close(disconnect)

    # in

    # the socket loop's handler

    async def on_open(self) -> None:
        return

    def on_too_large(self, size: int) -> None:
        self.send(stomp.error("frame too large"))

    async def on_close(self, disconnect: Disconnect) -> None:
        if self.beats is not None:
            self.beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.beats
        await self.bridge.end(disconnect)

    async def on_frame(self, message: bytes | str) -> None:
        self.last_received = time.monotonic()
        try:
            frames = stomp.parse(message, self.settings.max_commands_per_frame)
        except StompError as exc:
            self.refuse(f"malformed frame: {exc}", codes.BAD_REQUEST_DISCONNECT)
            return
        for frame in frames:
            if frame is None:
                continue
            receipt_id = frame.headers.get("receipt", "")
            try:
                await self.handle_frame(frame)
            except Rejected as exc:
                self.refuse(str(exc), exc.disconnect, receipt_id)
            except StompError as exc:
                self.refuse(str(exc), codes.BAD_REQUEST_DISCONNECT, receipt_id)
            except ProtocolError as exc:
                self.refuse(str(exc), exc.disconnect, receipt_id)
            except Refused as exc:
                self.refuse(exc.detail, exc.disconnect, receipt_id)
            if self.outbox.closing is not None:
                return

    async def handle_frame(self, frame: Frame) -> None:
        command = frame.command
        if command in ("CONNECT", "STOMP"):
            await self.connect(frame)
            return
        if not self.bridge.connected:
            raise Rejected(f"{command} before CONNECT")
        receipt_id = frame.headers.get("receipt", "")
        if command == "SUBSCRIBE":
            await self.subscribe(frame, receipt_id)
            return
        if command == "UNSUBSCRIBE":
            await self.unsubscribe(frame)
        elif command == "SEND":
            await self.publish(frame)
        elif command == "DISCONNECT":
            if receipt_id:
                self.send(stomp.receipt(receipt_id))
            self.outbox.close(codes.Disconnect(1000, "disconnect"))
            return
        elif command in ("ACK", "NACK"):
            if "id" not in frame.headers:
                raise Rejected(f"{command} needs an id header")
        else:  # BEGIN, COMMIT, ABORT
            raise Rejected("transactions are not supported")
        if receipt_id:
            self.send(stomp.receipt(receipt_id))

    async def native(self, command: cmd.Command, on_reply: Callable[[Reply], None] | None = None) -> Mapping[str, Any]:
        reply = await self.bridge.call(command, on_reply)
        error = reply.error
        if error is not None:
            code = error.code
            disconnect = PERMISSION_DENIED if code == codes.PERMISSION_DENIED.code else codes.BAD_REQUEST_DISCONNECT
            raise Rejected(f"{error.message} (code {code})", disconnect)
        return reply.result

    async def connect(self, frame: Frame) -> None:
        if self.bridge.connected:
            raise Rejected("already connected")
        versions = frame.headers.get("accept-version", "1.0").split(",")
        if "1.2" not in versions:
            raise Rejected("this server speaks STOMP 1.2 only (accept-version must include 1.2)")
        token = frame.headers.get("token") or frame.headers.get("passcode") or ""
        cx, cy = stomp.heart_beat(frame.headers.get("heart-beat", "0,0"))
        try:
            result = await self.native(cmd.Connect(token=token))
        except Refused as exc:
            raise Rejected(exc.detail, exc.disconnect) from None
        except Rejected as exc:
            raise Rejected(str(exc), codes.INVALID_TOKEN) from None
        want_ms = int(self.settings.ping_interval * 1000)
        self.send_every = stomp.negotiate(MIN_SEND_MS, cy) / 1000
        self.expect_every = stomp.negotiate(want_ms, cx) / 1000
        headers = [
            ("version", "1.2"),
            ("heart-beat", f"{MIN_SEND_MS},{want_ms}"),
            ("server", VERSION.replace(" ", "/")),
            ("session", str(result.get("client", ""))),
            ("user-name", self.bridge.session.user),
        ]
        self.send(stomp.encode("CONNECTED", headers))
        if self.send_every or self.expect_every:
            self.beats = asyncio.create_task(self.heart_beats(), name="stomp-heart-beats")

    async def subscribe(self, frame: Frame, receipt_id: str) -> None:
        subscription = frame.headers.get("id")
        destination = frame.headers.get("destination")
        if not subscription or not destination:
            raise Rejected("SUBSCRIBE needs id and destination headers")
        if subscription in self.destinations:
            raise Rejected(f"subscription id {subscription!r} is in use")
        channel = stomp.channel_of(destination)
        since = None
        epoch = frame.headers.get("x-since-epoch")
        if epoch is not None:
            offset = frame.headers.get("x-since-offset", "0")
            if not (offset.isascii() and offset.isdigit()) or len(offset) > 19:
                raise Rejected("x-since-offset must be a non-negative integer")
            since = StreamPosition(int(offset), epoch)
        line = stomp.destination_line(channel)
        if line in self.by_destination:
            raise Rejected(f"already subscribed to {destination}")
        # Registered before the reply so the publications that follow it are delivered.
        self.by_destination[line] = subscription
        self.destinations[subscription] = (line, channel)

        def on_reply(reply: Reply) -> None:
            if not reply.ok:
                return
            if receipt_id:
                self.send(stomp.receipt(receipt_id))
            for pub in reply.result.get("publications", []):  # recovered history
                message = stomp.publication_message(channel, pub)
                self.send(stomp.with_subscription(message, subscription, f"r{pub.offset}"))

        try:
            await self.native(cmd.Subscribe(channel, since=since), on_reply)
        except BaseException:
            self.by_destination.pop(line, None)
            self.destinations.pop(subscription, None)
            raise

    async def unsubscribe(self, frame: Frame) -> None:
        subscription = frame.headers.get("id")
        if not subscription:
            raise Rejected("UNSUBSCRIBE needs an id header")
        known = self.destinations.pop(subscription, None)
        if known is None:
            raise Rejected(f"no subscription {subscription!r}")
        line, channel = known
        self.by_destination.pop(line, None)
        await self.native(cmd.Unsubscribe(channel))

    async def publish(self, frame: Frame) -> None:
        destination = frame.headers.get("destination")
        if not destination:
            raise Rejected("SEND needs a destination header")
        channel = stomp.channel_of(destination)
        kind = frame.headers.get("content-type", "")
        data = frame.body
        if kind.startswith("application/json"):
            try:
                orjson.loads(frame.body)
            except orjson.JSONDecodeError:
                raise Rejected("the body is not the JSON its content-type says") from None
        elif kind.startswith("text/"):
            try:
                data = orjson.dumps(frame.body.decode())
            except UnicodeDecodeError:
                raise Rejected("a text body must be UTF-8") from None
        await self.native(cmd.Publish(channel, data))

    # heart-beats

    async def heart_beats(self) -> None:
        tick = min(t for t in (self.send_every, self.expect_every) if t) / 2
        grace = self.settings.pong_timeout
        while self.outbox.closing is None:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.expect_every and now - self.last_received > self.expect_every + grace:
                self.outbox.close(codes.NO_PONG)
                return
            if self.send_every and now - self.last_sent >= self.send_every * 0.9:
                self.send(b"\n")


async def stomp_endpoint(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    offered = websocket.scope.get("subprotocols", [])
    subprotocol = next((p for p in SUBPROTOCOLS if p in offered), None)
    await serve_websocket(
        websocket, "stomp", lambda connection: StompConnection(gateway, connection), subprotocol=subprotocol
    )
