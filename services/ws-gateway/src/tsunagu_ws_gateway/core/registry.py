"""Every connection and session on this node, whatever its protocol.

Revocation, drain, the server API's disconnect, token expiry and the connection limits all walk this one
registry: a collab socket, a FHIR binding or a Socket.IO client is found exactly like a native one.
Connections (sockets) count towards the node's and their IP's limits from the handshake on; sessions
count towards their user's once admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import Counter as Metric
from prometheus_client import Gauge

from tsunagu_ws_gateway.config import GatewaySettings
from tsunagu_ws_gateway.core.refusals import Refusal, Refused
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol.codes import Disconnect
from tsunagu_ws_gateway.tokens import ConnectionGrant

log = logging.getLogger("tsunagu.gateway.registry")

CONNECTIONS = Gauge("tsunagu_gateway_connections", "Open client connections on this node")
SOCKETS = Gauge("tsunagu_gateway_sockets", "Open client sockets on this node, admitted or not")
DISCONNECTS = Metric("tsunagu_gateway_disconnects_total", "Connections closed by the server", ["code"])
REFUSALS = Metric("tsunagu_gateway_refusals_total", "Connections refused by admission", ["reason", "protocol"])
TICK_SECONDS = 1.0


class Member(Protocol):
    """A session as the registry needs it (core/session.py)."""

    id: str
    user: str
    session_id: str
    grant: ConnectionGrant | None
    connected: bool
    connection: Connection

    def on_tick(self, now: float) -> None: ...

    def disconnect(self, disconnect: Disconnect) -> None: ...


class Registry:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.connections: set[Connection] = set()
        self.by_ip: Counter[str] = Counter()
        self.sessions: set[Member] = set()  # live, admitted or not (connect timeouts tick here)
        self.clients: dict[str, Member] = {}  # admitted, by client id
        self.users: dict[str, set[Member]] = {}
        self.draining = False
        self._ticker: asyncio.Task[None] | None = None

    # sockets

    def open(self, connection: Connection) -> None:
        """Count a new socket in; Refused when the node or its IP is at its limit."""
        limit = self.settings.max_connections
        if limit and len(self.connections) >= limit:
            raise Refused(Refusal.NODE_LIMIT, f"this node holds its limit of {limit} connections")
        per_ip = self.settings.max_connections_per_ip
        ip = connection.peer.ip
        if per_ip and ip and self.by_ip[ip] >= per_ip:
            raise Refused(Refusal.IP_LIMIT, f"{per_ip} connections from one address at most")
        self.connections.add(connection)
        if ip:
            self.by_ip[ip] += 1
        SOCKETS.set(len(self.connections))

    def close(self, connection: Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        ip = connection.peer.ip
        if ip:
            self.by_ip[ip] -= 1
            if self.by_ip[ip] <= 0:
                del self.by_ip[ip]
        SOCKETS.set(len(self.connections))

    # sessions

    def add(self, session: Member) -> None:
        self.sessions.add(session)

    def admitted(self, session: Member) -> None:
        self.clients[session.id] = session
        self.users.setdefault(session.user, set()).add(session)
        CONNECTIONS.set(len(self.clients))

    def remove(self, session: Member) -> None:
        self.sessions.discard(session)
        if self.clients.pop(session.id, None) is None:
            return
        sessions = self.users.get(session.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.users[session.user]
        CONNECTIONS.set(len(self.clients))

    def user_sessions(self, user: str) -> int:
        return len(self.users.get(user, ()))

    def matching(self, user: str, client: str = "", session_id: str = "") -> list[Member]:
        """The admitted sessions of `user` (only client `client`, only session `session_id` when given)."""
        return [
            s
            for s in self.users.get(user, ())
            if (not client or s.id == client) and (not session_id or s.session_id == session_id)
        ]

    def where(self, predicate: Callable[[Member], bool]) -> list[Member]:
        return [s for s in self.clients.values() if predicate(s)]

    def census(self) -> tuple[int, int]:
        """(admitted sessions, distinct users) on this node."""
        return len(self.clients), len(self.users)

    # closing many

    def disconnect(self, sessions: Iterable[Member], disconnect: Disconnect) -> int:
        count = 0
        for session in list(sessions):
            session.disconnect(disconnect)
            count += 1
        if count:
            DISCONNECTS.labels(str(disconnect.code)).inc(count)
        return count

    def drain(self, disconnect: Disconnect) -> None:
        """Refuse new connections and close every open one (the node is stopping)."""
        self.draining = True
        for session in list(self.sessions):
            session.disconnect(disconnect)
        for connection in list(self.connections):
            connection.close(disconnect)

    # timers: connect timeouts, pings and pongs, token expiry

    async def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="gateway-session-ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            for session in list(self.sessions):
                try:
                    session.on_tick(now)
                except Exception:
                    log.exception("ticking session %s failed", session.id)
