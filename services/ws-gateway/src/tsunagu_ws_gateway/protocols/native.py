"""`GET /connection/websocket`: the native protocol (Centrifugo's client protocol v2), JSON or protobuf
(subprotocol `centrifuge-protobuf`). A frame goes to the session as it is; its codec decodes it."""

from __future__ import annotations

from starlette.websockets import WebSocket

from tsunagu_ws_gateway.core.replies import FrameSink
from tsunagu_ws_gateway.core.session import Session
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.protocol.protobuf_frames import PROTOBUF
from tsunagu_ws_gateway.transports.websocket import serve_websocket

PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"


class NativeHandler:
    def __init__(self, session: Session, codec: Codec) -> None:
        self.session = session
        self.codec = codec
        self.max_frame_bytes = session.settings.max_frame_bytes

    async def on_open(self) -> None:
        return

    async def on_frame(self, frame: bytes | str) -> None:
        await self.session.handle_frame(frame, self.codec)

    def on_too_large(self, size: int) -> None:
        return

    async def on_close(self, disconnect: Disconnect) -> None:
        await self.session.end(disconnect)


async def native_endpoint(websocket: WebSocket) -> None:
    protobuf = PROTOBUF_SUBPROTOCOL in websocket.scope.get("subprotocols", [])
    codec: Codec = PROTOBUF if protobuf else JSON

    def handler(connection: Connection) -> NativeHandler:
        session = Session(websocket.app.state.gateway, connection, FrameSink(codec, connection.transport))
        return NativeHandler(session, codec)

    await serve_websocket(
        websocket,
        "native",
        handler,
        subprotocol=PROTOBUF_SUBPROTOCOL if protobuf else None,
        binary=codec.binary,
        joiner=codec.separator,
    )
