"""A gateway core without a server, and sessions on it driven frame by frame (as python-websockets
tests its protocol: bytes in, bytes out, no sockets): memory broker and bus, the real session, hub,
admission and registry; the socket is a `Recorder` transport that keeps the frames it is given."""

from __future__ import annotations

import json
from typing import Any

from tsunagu_core.broker import MemoryBroker
from tsunagu_core.bus import MemoryBus
from tsunagu_ws_gateway.channels import ChannelPolicy
from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core.gateway import Gateway
from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.core.replies import FrameSink
from tsunagu_ws_gateway.core.session import Session
from tsunagu_ws_gateway.core.transport import Connection, Peer
from tsunagu_ws_gateway.events import EventEmitter
from tsunagu_ws_gateway.hub import Node
from tsunagu_ws_gateway.protocol.codec import Codec
from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.protocol.json_frames import JSON
from tsunagu_ws_gateway.revocations import RevocationList
from tsunagu_ws_gateway.rpc import RpcRouter
from tsunagu_ws_gateway.tokens import TokenVerifier

from .conftest import SECRET


class Recorder:
    """A transport that keeps what it is sent and how it was closed."""

    name = "recorder"

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closing: Disconnect | None = None
        self.client_closed = False

    def send(self, frame: bytes) -> None:
        if self.closing is None:
            self.frames.append(frame)

    def close(self, disconnect: Disconnect) -> None:
        if self.closing is None:
            self.closing = disconnect

    def take(self) -> list[dict[str, Any]]:
        """The JSON replies and pushes sent since the last take."""
        frames, self.frames = self.frames, []
        return [json.loads(frame) for frame in frames]


def bare_gateway(**overrides: Any) -> Gateway:
    settings = GatewaySettings(**{"token_hmac_secret": SECRET, **overrides})
    broker = MemoryBroker()
    node = Node(settings, broker, "bare")
    broker.set_handler(node)
    policy = ChannelPolicy(settings.namespaces)
    return Gateway(
        settings,
        node,
        TokenVerifier(settings),
        policy,
        EventEmitter(MemoryBus(), "bare"),
        RpcRouter(settings.rpc_routes, settings.rpc_timeout, policy),
        RevocationList(),
    )


def bare_session(gateway: Gateway, codec: Codec = JSON, peer: Peer | None = None) -> tuple[Session, Recorder]:
    recorder = Recorder()
    connection = Connection(recorder, peer or Peer(ip="192.0.2.1"), "native", CommandRate(1000))
    return Session(gateway, connection, FrameSink(codec, recorder)), recorder


def frame(*commands: dict[str, Any]) -> bytes:
    return b"\n".join(json.dumps(command).encode() for command in commands)
