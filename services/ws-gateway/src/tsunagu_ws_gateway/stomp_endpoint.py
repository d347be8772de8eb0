"""`GET /stomp`: STOMP 1.2 over WebSocket (subprotocol `v12.stomp`), on an ordinary client session
(adapter.py).

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
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from tsunagu_ws_gateway.adapter import Bridge, BridgeCodec, MessageOutbox, Reply, finish, refuse, start_writer
from tsunagu_ws_gateway.protocol import codes, stomp
from tsunagu_ws_gateway.protocol.codes import ProtocolError
from tsunagu_ws_gateway.protocol.stomp import Frame, StompError
from tsunagu_ws_gateway.session import VERSION, Gateway

SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
CODEC = BridgeCodec("stomp", stomp.publication_message)
# The shortest interval between heart-beats the gateway offers to send.
MIN_SEND_MS = 1000
PERMISSION_DENIED = codes.PERMISSION_DENIED_DISCONNECT


class Refused(Exception):
    """Answer with an ERROR frame and close."""

    def __init__(self, message: str, disconnect: codes.Disconnect = codes.BAD_REQUEST_DISCONNECT) -> None:
        super().__init__(message)
        self.disconnect = disconnect


class StompConnection:
    def __init__(self, gateway: Gateway, websocket: WebSocket) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.outbox = MessageOutbox(websocket, gateway.settings.send_buffer_bytes)
        self.bridge = Bridge(gateway, CODEC, deliver=self.deliver, close=self.outbox.close)
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

    async def handle_message(self, message: bytes | str) -> None:
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
            except Refused as exc:
                self.refuse(str(exc), exc.disconnect, receipt_id)
            except StompError as exc:
                self.refuse(str(exc), codes.BAD_REQUEST_DISCONNECT, receipt_id)
            except ProtocolError as exc:
                self.refuse(str(exc), exc.disconnect, receipt_id)
            if self.outbox.closing is not None:
                return

    async def handle_frame(self, frame: Frame) -> None:
        command = frame.command
        if command in ("CONNECT", "STOMP"):
            await self.connect(frame)
            return
        if not self.bridge.connected:
            raise Refused(f"{command} before CONNECT")
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
                raise Refused(f"{command} needs an id header")
        else:  # BEGIN, COMMIT, ABORT
            raise Refused("transactions are not supported")
        if receipt_id:
            self.send(stomp.receipt(receipt_id))

    async def native(self, method: str, request: dict[str, Any], on_reply: Any = None) -> dict[str, Any]:
        reply: Reply = await self.bridge.call(method, request, on_reply)
        error = reply.get("error")
        if error is not None:
            code = int(error.get("code", 100))
            disconnect = PERMISSION_DENIED if code == codes.PERMISSION_DENIED.code else codes.BAD_REQUEST_DISCONNECT
            raise Refused(f"{error.get('message', 'error')} (code {code})", disconnect)
        result: dict[str, Any] = reply.get(method, {})
        return result

    async def connect(self, frame: Frame) -> None:
        if self.bridge.connected:
            raise Refused("already connected")
        versions = frame.headers.get("accept-version", "1.0").split(",")
        if "1.2" not in versions:
            raise Refused("this server speaks STOMP 1.2 only (accept-version must include 1.2)")
        token = frame.headers.get("token") or frame.headers.get("passcode") or ""
        cx, cy = stomp.heart_beat(frame.headers.get("heart-beat", "0,0"))
        try:
            result = await self.native("connect", {"token": token})
        except ProtocolError as exc:
            raise Refused(str(exc), exc.disconnect) from None
        except Refused as exc:
            raise Refused(str(exc), codes.INVALID_TOKEN) from None
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
            raise Refused("SUBSCRIBE needs id and destination headers")
        if subscription in self.destinations:
            raise Refused(f"subscription id {subscription!r} is in use")
        channel = stomp.channel_of(destination)
        request: dict[str, Any] = {"channel": channel}
        epoch = frame.headers.get("x-since-epoch")
        if epoch is not None:
            offset = frame.headers.get("x-since-offset", "0")
            if not offset.isdigit():
                raise Refused("x-since-offset must be a non-negative integer")
            request.update(recover=True, epoch=epoch, offset=int(offset))
        line = stomp.destination_line(channel)
        if line in self.by_destination:
            raise Refused(f"already subscribed to {destination}")
        # Registered before the reply so the publications that follow it are delivered.
        self.by_destination[line] = subscription
        self.destinations[subscription] = (line, channel)

        def on_reply(reply: Reply) -> None:
            if "error" in reply:
                return
            if receipt_id:
                self.send(stomp.receipt(receipt_id))
            for pub in reply.get("subscribe", {}).get("publications", []):  # recovered history
                data = orjson.dumps(pub.get("data"))
                headers = [
                    ("subscription", subscription),
                    ("message-id", f"r{pub.get('offset', 0)}"),
                    ("destination", destination),
                    ("content-type", "application/json"),
                    ("offset", str(pub.get("offset", 0))),
                ]
                self.send(stomp.encode("MESSAGE", headers, data))

        try:
            await self.native("subscribe", request, on_reply)
        except BaseException:
            self.by_destination.pop(line, None)
            self.destinations.pop(subscription, None)
            raise

    async def unsubscribe(self, frame: Frame) -> None:
        subscription = frame.headers.get("id")
        if not subscription:
            raise Refused("UNSUBSCRIBE needs an id header")
        known = self.destinations.pop(subscription, None)
        if known is None:
            raise Refused(f"no subscription {subscription!r}")
        line, channel = known
        self.by_destination.pop(line, None)
        await self.native("unsubscribe", {"channel": channel})

    async def publish(self, frame: Frame) -> None:
        destination = frame.headers.get("destination")
        if not destination:
            raise Refused("SEND needs a destination header")
        channel = stomp.channel_of(destination)
        kind = frame.headers.get("content-type", "")
        data: Any = frame.body
        if kind.startswith("application/json"):
            try:
                orjson.loads(frame.body)
            except orjson.JSONDecodeError:
                raise Refused("the body is not the JSON its content-type says") from None
        elif kind.startswith("text/"):
            try:
                data = frame.body.decode()
            except UnicodeDecodeError:
                raise Refused("a text body must be UTF-8") from None
        await self.native("publish", {"channel": channel, "data": data})

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
    if await refuse(websocket, gateway):
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=next((p for p in SUBPROTOCOLS if p in offered), None))
    connection = StompConnection(gateway, websocket)
    outbox = connection.outbox
    start_writer(outbox)
    settings = gateway.settings
    try:
        while outbox.closing is None:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if len(data) > settings.max_frame_bytes:
                connection.refuse("frame too large", codes.MESSAGE_SIZE_LIMIT)
                break
            await connection.handle_message(data)
    except asyncio.CancelledError:
        if outbox.closing is not codes.SLOW:
            raise
    except WebSocketDisconnect:
        pass
    finally:
        if connection.beats is not None:
            connection.beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection.beats
        await finish(outbox, connection.bridge)
