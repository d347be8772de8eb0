"""sim-engine application factory: the rooms HTTP API, the input consumer and the ownership scanner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from tsunagu_core import topics
from tsunagu_core.broker import BrokerError
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app, internal_api

from tsunagu_sim_engine.config import SimSettings
from tsunagu_sim_engine.engine import CommandSender, SimEngine
from tsunagu_sim_engine.kinds import kind_names, load_kinds
from tsunagu_sim_engine.matchmaker import MatchError, Matchmaker, MatchRequest, SeatWatcher
from tsunagu_sim_engine.room import ROOM_NAME, RoomSpec
from tsunagu_sim_engine.store import MemoryRoomStore, RedisRoomStore, RoomStore, StoreError

SERVICE = "sim-engine"
STORE = "sim-engine-store"
NEEDS = ("bus", "broker", STORE)


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def create_store(core: CoreSettings, settings: SimSettings) -> RoomStore:
    """Redis when the broker is Redis (replicas share rooms and snapshots), memory for `tsunagu run`."""
    if core.broker == "redis":
        return RedisRoomStore(core.redis_url, settings.key_prefix)
    return MemoryRoomStore()


def _room_name(room: str) -> str:
    if not ROOM_NAME.match(room):
        raise ApiError(400, "bad_request", "room is 1 to 64 characters of A-Z a-z 0-9 _ -")
    return room


log = logging.getLogger("tsunagu.sim_engine")


def create_app(runtime: Runtime, settings: SimSettings, store: RoomStore | None = None) -> FastAPI:
    load_kinds(settings.kinds)
    try:
        configured_rooms = [RoomSpec.parse(body) for body in settings.rooms]
    except ValueError as exc:
        raise ConfigError(f"TSUNAGU_SIM_ROOMS: {exc}") from None
    store = store if store is not None else create_store(runtime.settings, settings)
    runtime.add_dependency(STORE, store)
    engine = SimEngine(
        runtime.broker,
        store,
        node=f"{runtime.settings.node_name}:{settings.port}:{id(store):x}",
        snapshot_every=settings.snapshot_every,
        lease_ttl=settings.lease_ttl,
        max_rooms=settings.max_rooms,
        input_max_age=settings.input_max_age,
        send_commands=CommandSender(runtime.bus, runtime.broker, settings.command_timeout),
        source_poll=settings.source_poll,
    )

    matchmaker = Matchmaker(engine, store, settings.seat_ttl, settings.node_silence)
    admins = frozenset(settings.room_admins)
    watcher = SeatWatcher(store, settings.seat_ttl, settings.node_silence)
    seat_events = consumer_hook(
        runtime,
        needs=["bus", STORE],
        topics=[topics.GATEWAY_EVENTS],
        group=settings.seats_consumer_group,
        batch_handler=watcher.handle_batch,
        name="sim-seats-consumer",
        from_latest=True,
    )

    consumers = consumer_hook(
        runtime,
        needs=["bus", "broker", STORE],
        topics=[topics.SIM_INPUTS],
        group=settings.consumer_group,
        batch_handler=engine.handle_batch,
        name="sim-consumer",
    )

    async def scan() -> None:
        await runtime.wait_ready(["broker", STORE])
        for spec in configured_rooms:
            if await engine.create(spec):
                log.info("created configured room %s (%s)", spec.room, spec.kind)
        await engine.run_scanner(settings.scan_interval)

    @asynccontextmanager
    async def simulate() -> AsyncIterator[None]:
        scanner = asyncio.create_task(scan(), name="sim-scanner")
        try:
            async with consumers(), seat_events():
                yield
        finally:
            scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scanner
            await engine.close(handover=True)

    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS, hooks=[simulate], **internal_api(runtime))
    app.state.settings = settings
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(MatchError)
    async def match_error(request: Request, exc: MatchError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(StoreError)
    @app.exception_handler(BrokerError)
    @app.exception_handler(RedisError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "unavailable", "message": str(exc)}, status_code=503)

    async def spec_of(room: str) -> dict[str, Any]:
        raw = await store.spec(_room_name(room))
        if raw is None:
            raise ApiError(404, "not_found", f"no room {room!r}")
        return raw

    @app.post("/v1/rooms", status_code=201, tags=["rooms"])
    async def create_room(request: Request) -> dict[str, Any]:
        """Create a room: `{room, kind, params, tick_hz 1-60, keyframe_every, encoding, aoi, max_inputs_per_second}`."""
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "the body is not JSON") from None
        try:
            spec = RoomSpec.parse(body)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        if not await engine.create(spec):
            raise ApiError(409, "exists", f"room {spec.room!r} exists already")
        return await engine.describe(spec.room, spec.as_dict())

    @app.get("/v1/rooms", tags=["rooms"])
    async def list_rooms() -> dict[str, Any]:
        specs = await store.specs()
        rooms = [await engine.describe(name, raw) for name, raw in sorted(specs.items())]
        return {"rooms": rooms, "kinds": kind_names()}

    @app.get("/v1/rooms/{room}", tags=["rooms"])
    async def get_room(room: str) -> dict[str, Any]:
        return await engine.describe(room, await spec_of(room))

    @app.get("/v1/rooms/{room}/state", tags=["rooms"])
    async def room_state(room: str) -> dict[str, Any]:
        """The room's quantized state now (live on its owner; from the last snapshot elsewhere)."""
        return await engine.state(room, await spec_of(room))

    @app.delete("/v1/rooms/{room}", tags=["rooms"])
    async def delete_room(room: str) -> dict[str, Any]:
        await spec_of(room)
        await engine.delete(room)
        return {"room": room, "deleted": True}

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "the body is not JSON") from None

    @app.post("/v1/matchmake/join-or-create", tags=["matchmaking"])
    async def join_or_create(request: Request) -> dict[str, Any]:
        """Seat `session` in a public room of `kind` with the same `{mode, region, max_clients}`, or make one.

        `{"room": name, "session": s}` joins a room by name (a private one, or the seat you had: the same
        session within `seat_ttl` gets its seat back). A full room answers 409 `full`.
        """
        return await matchmaker.join_or_create(MatchRequest.parse(await json_body(request)))

    @app.post("/v1/matchmake/seats/{room}", tags=["matchmaking"])
    async def refresh_seat(room: str, request: Request) -> dict[str, Any]:
        """Keep `{session}`'s seat alive (a connected client's heartbeat); 409 when the seat is gone and full."""
        body = await json_body(request)
        session = body.get("session") if isinstance(body, dict) else None
        if not isinstance(session, str):
            raise ApiError(400, "bad_request", "session is a string")
        return await matchmaker.join(room, session)

    @app.post("/v1/matchmake/rooms/{room}/lock", tags=["matchmaking"])
    async def lock_room(room: str) -> dict[str, Any]:
        """Lock a matchmade room: nobody new joins it (423 `locked`), join-or-create skips it; seats stay."""
        return await matchmaker.set_lock(_room_name(room), True, None)

    @app.post("/v1/matchmake/rooms/{room}/unlock", tags=["matchmaking"])
    async def unlock_room(room: str) -> dict[str, Any]:
        return await matchmaker.set_lock(_room_name(room), False, None)

    @app.get("/v1/matchmake/rooms", tags=["matchmaking"])
    async def matchmade_rooms(kind: str | None = None) -> dict[str, Any]:
        """Public matchmade rooms with their live client counts."""
        return {"rooms": await matchmaker.listing(kind)}

    @app.post("/v1/rpc/{method}", tags=["matchmaking"])
    async def rpc(method: str, request: Request) -> dict[str, Any]:
        """Client RPCs the gateway routes here (`TSUNAGU_GATEWAY_RPC_ROUTES`, body `{method, user, client, data}`).

        `rooms.join_or_create` (data as the REST body, without `session`), `rooms.join` `{room}` (also
        the reconnection: the same user within the seat window gets the same seat), `rooms.list` `{kind?}`,
        `rooms.lock` / `rooms.unlock` `{room}` (its creator or a `TSUNAGU_SIM_ROOM_ADMINS` user).
        A seat belongs to the authenticated user (plus `data.tab` for several per user), so a seat cannot be
        taken over by another user and survives a new connection on any gateway. Refusals are 4xx with
        `{"error", "message"}`, which the gateway turns into an RPC error reply (code: the HTTP status,
        message `<error>: <message>`), so the SDK's `rpc()` rejects with it.
        """
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("data", {}), dict):
            raise ApiError(400, "bad_request", "expected {method, user, client, data: {...}}")
        user, data = body.get("user"), dict(body.get("data") or {})
        if not isinstance(user, str) or not user:
            raise ApiError(403, "forbidden", "matchmaking needs an authenticated user")
        tab = data.pop("tab", "")
        if not isinstance(tab, str) or len(tab) > 32:
            raise ApiError(400, "bad_request", "tab is a string of up to 32 characters")
        session = f"{user}:{tab}" if tab else user
        # the caller's connection holds the seat from now on (SeatWatcher follows it through the bus)
        client = body.get("client") if isinstance(body.get("client"), str) else None
        if method == "rooms.join_or_create":
            return await matchmaker.join_or_create(MatchRequest.parse({**data, "session": session}), client)
        if method == "rooms.join":
            room = data.get("room")
            if not isinstance(room, str):
                raise ApiError(400, "bad_request", "data.room is a room name")
            return await matchmaker.join(room, session, client)
        if method in ("rooms.lock", "rooms.unlock"):
            room = data.get("room")
            if not isinstance(room, str) or not ROOM_NAME.match(room):
                raise ApiError(400, "bad_request", "data.room is a room name")
            return await matchmaker.set_lock(room, method == "rooms.lock", user, admins)
        if method == "rooms.list":
            kind = data.get("kind")
            return {"rooms": await matchmaker.listing(kind if isinstance(kind, str) else None)}
        raise ApiError(
            404,
            "not_found",
            f"no method {method[:64]!r}: rooms.join_or_create, rooms.join, rooms.list, rooms.lock, rooms.unlock",
        )

    return app
