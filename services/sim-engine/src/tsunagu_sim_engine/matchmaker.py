"""Matchmaking: join-or-create by kind and filters, seats held for a time, locked and private rooms.

The model is Colyseus's `joinOrCreate` / `reserveSeatFor`: a client asks for a kind and filters
(mode, region); the matchmaker seats it in a public, unlocked room of that kind whose filters match and
which has a free seat, or creates one. A seat is a reservation held in the room store (Redis on a real
stack, so every sim-engine replica sees the same counts, and one script decides the last seat). It
expires `seat_ttl` seconds after it was taken, unless a connection holds it: a seat taken over the
native protocol is bound to the caller's connection, and the SeatWatcher keeps it while that
connection lives, frees it when the client leaves on purpose and leaves it `seat_ttl` (the
reconnection window) when the connection is lost. Created rooms spread over replicas through the
existing leases.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tsunagu_core.bus import BusMessage
from tsunagu_core.envelope import EnvelopeError, envelope_of, payload_of
from tsunagu_core.wire.events_pb2 import GatewayEvent

from tsunagu_sim_engine.engine import SimEngine
from tsunagu_sim_engine.room import ROOM_NAME, RoomSpec
from tsunagu_sim_engine.store import RoomStore

log = logging.getLogger("tsunagu.sim_engine.seats")
SIM_PREFIX = "sim:"
# Racing creators: how long a room being formed is the one for its filters, and how many rounds to try.
FORMING_TTL = 10.0
FORMING_ATTEMPTS = 4

_FILTER = re.compile(r"^[A-Za-z0-9_.-]{0,32}$")
_SESSION = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_CLIENTS_LIMIT = 10_000


class MatchError(Exception):
    """A request the matchmaker refuses: `error` is the machine code, the message says why."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


@dataclass(frozen=True, slots=True)
class MatchRequest:
    kind: str
    session: str
    mode: str = ""
    region: str = ""
    max_clients: int = 16
    private: bool = False
    room: str | None = None  # join this room by name (a private room is only reachable this way)

    @classmethod
    def parse(cls, body: Any) -> MatchRequest:
        if not isinstance(body, dict):
            raise MatchError(400, "bad_request", "the body is a JSON object")
        kind, session = body.get("kind"), body.get("session")
        if not isinstance(session, str) or not _SESSION.match(session):
            raise MatchError(400, "bad_request", "session is 1 to 128 characters of A-Z a-z 0-9 _ . : -")
        if body.get("room") is None and not isinstance(kind, str):
            raise MatchError(400, "bad_request", "kind is a room kind name")
        filters = {}
        for key in ("mode", "region"):
            value = body.get(key, "")
            if not isinstance(value, str) or not _FILTER.match(value):
                raise MatchError(400, "bad_request", f"{key} is up to 32 characters of A-Z a-z 0-9 _ . -")
            filters[key] = value
        max_clients = body.get("max_clients", 16)
        if (
            isinstance(max_clients, bool)
            or not isinstance(max_clients, int)
            or not 1 <= max_clients <= MAX_CLIENTS_LIMIT
        ):
            raise MatchError(400, "bad_request", f"max_clients is an integer from 1 to {MAX_CLIENTS_LIMIT}")
        private = body.get("private", False)
        if not isinstance(private, bool):
            raise MatchError(400, "bad_request", "private is true or false")
        room = body.get("room")
        if room is not None and not isinstance(room, str):
            raise MatchError(400, "bad_request", "room is a room name")
        return cls(str(kind or ""), session, filters["mode"], filters["region"], max_clients, private, room)


class Matchmaker:
    def __init__(self, engine: SimEngine, store: RoomStore, seat_ttl: float, node_silence: float = 0.0) -> None:
        self.engine = engine
        self.store = store
        self.seat_ttl = seat_ttl
        # a seat held by a connection lives as long as a heartbeat of its gateway makes it live, so it
        # lasts until the first one comes (gateways beat every 5 s, maybe more than the seat ttl)
        self.held_ttl = seat_ttl + node_silence

    def _ttl(self, client: str | None) -> float:
        return self.held_ttl if client else self.seat_ttl

    async def listing(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Public rooms made by the matchmaker with their live seat counts."""
        out = []
        for name, raw in sorted((await self.store.specs()).items()):
            match = raw.get("match")
            if not isinstance(match, dict) or match.get("private") or (kind and raw.get("kind") != kind):
                continue
            out.append(await self._describe(name, raw))
        return out

    async def _describe(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        match = raw.get("match") or {}
        return {
            "room": name,
            "kind": raw.get("kind"),
            **{key: match.get(key) for key in ("mode", "region", "max_clients", "private", "locked")},
            "clients": await self.store.seats(name),
        }

    async def join(self, name: str, session: str, client: str | None = None) -> dict[str, Any]:
        """Take (or keep: same session, the reconnection path) a seat in the room `name`; `client`: the
        gateway connection asking, which then holds the seat (see SeatWatcher)."""
        raw = await self.store.spec(name)
        if raw is None:
            raise MatchError(404, "not_found", f"no room {name!r}")
        match = raw.get("match")
        if not isinstance(match, dict):
            raise MatchError(409, "not_matchmade", f"room {name!r} was not made by the matchmaker")
        # a locked room takes no one new, but a seat held in it comes back (the reconnection path)
        if match.get("locked") and not await self.store.has_seat(name, session):
            raise MatchError(423, "locked", f"room {name!r} is locked")
        if not await self.store.reserve_seat(name, session, self._ttl(client), int(match["max_clients"])):
            raise MatchError(409, "full", f"room {name!r} is full ({match['max_clients']} clients)")
        if client:
            await self.store.bind_seat(name, session, client)
        return {**await self._describe(name, raw), "session": session, "seat_ttl": self.seat_ttl}

    async def set_lock(
        self, name: str, locked: bool, by: str | None, admins: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Lock (no one new joins, nothing matches it; seats held stay) or unlock a matchmade room.
        `by`: the user asking, who must be its creator or one of `admins`; None: the server side (REST)."""
        raw = await self.store.spec(name)
        if raw is None:
            raise MatchError(404, "not_found", f"no room {name!r}")
        match = raw.get("match")
        if not isinstance(match, dict):
            raise MatchError(409, "not_matchmade", f"room {name!r} was not made by the matchmaker")
        if by is not None and by != match.get("creator") and by not in admins:
            raise MatchError(403, "forbidden", f"only the creator of {name!r} or an admin may lock it")
        if not await self.store.set_locked(name, locked):
            raise MatchError(404, "not_found", f"no room {name!r}")
        return await self._describe(name, {**raw, "match": {**match, "locked": locked}})

    async def join_or_create(self, request: MatchRequest, client: str | None = None) -> dict[str, Any]:
        """Seat `request.session` in a matching public room with a free seat, or in a new one.

        Replicas racing to create for the same filters agree on one new room: the first names it in the
        store (`claim_forming`), the others wait for it to be registered and join it. Its name is
        forgotten once it is full or locked (or never came: its creator died), and the race starts anew.
        """
        if request.room is not None:
            return await self.join(request.room, request.session, client)
        if request.private:  # nobody else is matched into it: no race to settle
            return await self._create(request, client)
        forming = f"{request.kind}|{request.mode}|{request.region}|{request.max_clients}"
        for _ in range(FORMING_ATTEMPTS):
            seated = await self._match(request, client)
            if seated is not None:
                return seated
            name = f"{request.kind}-{secrets.token_hex(4)}"
            winner = await self.store.claim_forming(forming, name, FORMING_TTL)
            if winner is None:
                return await self._create(request, client, name)
            if await self._registered(winner):
                try:
                    return await self.join(winner, request.session, client)
                except MatchError as exc:
                    if exc.error not in ("full", "locked", "not_found"):
                        raise
            await self.store.clear_forming(forming, winner)
        # still contended after several rounds: a room of our own (the next joins fill rooms in name order)
        return await self._create(request, client)

    async def _registered(self, name: str) -> bool:
        """Wait (briefly) for the room another replica is creating to appear in the registry."""
        for _ in range(40):
            if await self.store.spec(name) is not None:
                return True
            await asyncio.sleep(0.025)
        return False

    async def _match(self, request: MatchRequest, client: str | None) -> dict[str, Any] | None:
        for name, raw in sorted((await self.store.specs()).items()):
            match = raw.get("match")
            if not isinstance(match, dict) or raw.get("kind") != request.kind:
                continue
            if match.get("private") or match.get("locked"):
                continue
            if (match.get("mode"), match.get("region"), match.get("max_clients")) != (
                request.mode,
                request.region,
                request.max_clients,
            ):
                continue
            # a room filled between listing and reserving is skipped: the seat script decides
            if await self.store.reserve_seat(name, request.session, self._ttl(client), request.max_clients):
                if client:
                    await self.store.bind_seat(name, request.session, client)
                return {**await self._describe(name, raw), "session": request.session, "seat_ttl": self.seat_ttl}
        return None

    async def _create(self, request: MatchRequest, client: str | None, name: str | None = None) -> dict[str, Any]:
        name = name or f"{request.kind}-{secrets.token_hex(4)}"
        try:
            spec = RoomSpec.parse({"room": name, "kind": request.kind})
        except ValueError as exc:
            raise MatchError(400, "bad_request", str(exc)) from None
        match = {
            "mode": request.mode,
            "region": request.region,
            "max_clients": request.max_clients,
            "private": request.private,
            "locked": False,
            # whoever made the room may lock it (the user, without the seat's tab)
            "creator": request.session.split(":", 1)[0],
        }
        await self.engine.create(spec, match)
        return await self.join(name, request.session, client)


class SeatWatcher:
    """Ties seats to connections from the gateway's events on `tsunagu.gateway.events` (no gateway code).

    - CONNECTED / SUBSCRIBED: the client is on that gateway node.
    - NODE_HEARTBEAT (every 5 s per gateway): each live seat bound to a client of the node lives
      `seat_ttl + node_silence` more, so a connected client keeps its seat without asking again.
    - UNSUBSCRIBED from `sim:<room>` by the client itself (code 0): its seat there is freed at once.
    - DISCONNECTED: freed at once when the client closed on purpose (`client_closed`: close frame 1000 /
      1001) or was shut out for good (a 3500-3999 code: it does not reconnect); otherwise (connection
      lost, gateway draining with 3001) the seat is held `seat_ttl` more, the reconnection window.
    - A gateway killed outright sends nothing: its heartbeats stop, and the seats of its clients expire
      `seat_ttl + node_silence` after its last heartbeat.
    Every operation checks that the seat is still bound to that client, so a user who took the seat back
    over another connection is not freed by the old connection's late events.
    """

    def __init__(self, store: RoomStore, seat_ttl: float, node_silence: float) -> None:
        self.store = store
        self.seat_ttl = seat_ttl
        self.node_silence = node_silence

    async def handle_batch(self, messages: Sequence[BusMessage]) -> None:
        for message in messages:
            try:
                envelope = envelope_of(message)
                if not envelope.type.startswith("gateway."):
                    continue
                event = payload_of(envelope, GatewayEvent)
            except EnvelopeError as exc:
                log.warning("skipping %s[%d]@%d: %s", message.topic, message.partition, message.offset, exc)
                continue
            await self.apply(event, envelope.time_unix_ms)

    async def apply(self, event: GatewayEvent, at_ms: int = 0) -> None:
        if event.kind == GatewayEvent.NODE_HEARTBEAT:
            # a replayed old beat (after a restart) must not extend the seats of a node long dead
            if not at_ms or time.time() * 1000 - at_ms < self.node_silence * 1000:
                await self.store.refresh_node(event.node, self.seat_ttl + self.node_silence)
            return
        if not event.client_id:
            return
        if event.kind in (GatewayEvent.CONNECTED, GatewayEvent.SUBSCRIBED):
            await self.store.track_client(event.node, event.client_id)
        elif event.kind == GatewayEvent.UNSUBSCRIBED:
            room = event.channel.removeprefix(SIM_PREFIX)
            # code 0: the client's own unsubscribe; with a code the connection ended and DISCONNECTED decides
            if event.channel.startswith(SIM_PREFIX) and ROOM_NAME.match(room) and event.code == 0:
                await self.store.release_client(event.client_id, room, None)
        elif event.kind == GatewayEvent.DISCONNECTED:
            await self.store.untrack_client(event.node, event.client_id)
            for_good = event.client_closed or 3500 <= event.code < 4000
            await self.store.release_client(event.client_id, None, None if for_good else self.seat_ttl)
