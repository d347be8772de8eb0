"""A connection as the core sees it: a `Transport` that takes frames and closes, the `Peer` at its other
end, and the `Connection` that ties them to this node.

A transport never blocks: `send` queues a frame and returns (past its bound the transport cuts the client
off as slow itself, 3008); `close` asks it to end with a code. Which socket carries the frames (a
WebSocket, Server-Sent Events or a streamed HTTP response; WebTransport would fit the same two calls) and how
they are batched into messages is the transport's business; reading is the socket loop's (loop.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from tsunagu_core.tls import PeerCertificate, scope_peer

from tsunagu_ws_gateway.core.limits import CommandRate
from tsunagu_ws_gateway.protocol.codes import Disconnect


class Transport(Protocol):
    # "websocket", "uni_websocket", "uni_sse", "uni_http_stream" (transports/http_stream.py), later
    # "webtransport"; "socketio" when a library owns the socket.
    name: str
    # Set once the transport is closing (by `close`, by itself when the client is slow, or by the peer).
    closing: Disconnect | None
    # The client ended the connection on purpose (a close frame 1000/1001), not lost it: it is not
    # coming back, which is what gateway events tell consumers such as the matchmaker.
    client_closed: bool

    def send(self, frame: bytes) -> None:
        """Queue one frame; never blocks."""
        ...

    def close(self, disconnect: Disconnect) -> None:
        """Send what is queued, then close with `disconnect` (at once for a slow client)."""
        ...


@dataclass(frozen=True, slots=True)
class Peer:
    """The other end of a connection, as its handshake showed it."""

    ip: str = ""
    origin: str | None = None  # the Origin header (browsers send it; other clients mostly do not)
    host: str = ""  # the Host header: what a same-origin page's Origin names
    secure: bool = False  # https / wss
    certificate: PeerCertificate | None = None  # a client certificate the TLS handshake verified
    # The handshake's headers by lower-case name (what proxy hooks may pass on to a backend).
    headers: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def of(cls, scope: Mapping[str, Any]) -> Peer:
        headers = {key: value for key, value in scope.get("headers", ())}
        client = scope.get("client")
        origin = headers.get(b"origin")
        return cls(
            ip=str(client[0]) if client else "",
            origin=origin.decode("latin-1") if origin is not None else None,
            host=headers.get(b"host", b"").decode("latin-1"),
            secure=scope.get("scheme") in ("https", "wss"),
            certificate=scope_peer(scope),
            headers={key.decode("latin-1").lower(): value.decode("latin-1") for key, value in headers.items()},
        )

    def same_origin(self) -> bool:
        """The Origin names the host the client asked for (scheme and default ports aside)."""
        if not self.origin or not self.host:
            return False
        parts = urlsplit(self.origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        default = 443 if parts.scheme == "https" else 80
        origin_host = f"{parts.hostname}:{parts.port or default}"
        host = urlsplit(f"//{self.host}")
        if not host.hostname:
            return False
        return origin_host == f"{host.hostname}:{host.port or default}"


_ids = itertools.count(1)


class Connection:
    """One client socket on this node, whatever its protocol: its transport, its peer, its command rate,
    and the sessions it carries (one; a FHIR socket carries one per binding)."""

    __slots__ = ("id", "opened_at", "peer", "protocol", "rate", "transport")

    def __init__(self, transport: Transport, peer: Peer, protocol: str, rate: CommandRate) -> None:
        self.id = next(_ids)
        self.transport = transport
        self.peer = peer
        self.protocol = protocol
        self.rate = rate
        self.opened_at = time.monotonic()

    def close(self, disconnect: Disconnect) -> None:
        self.transport.close(disconnect)

    def __repr__(self) -> str:
        return f"<connection {self.id} {self.protocol} from {self.peer.ip}>"
