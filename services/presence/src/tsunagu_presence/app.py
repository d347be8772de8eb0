"""presence application factory: the consumer of gateway events, the dead-node sweeper, the HTTP answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from tsunagu_core import topics
from tsunagu_core.broker import BrokerError, ClientInfo
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app, internal_api

from tsunagu_presence.config import PresenceSettings
from tsunagu_presence.store import MemoryPresenceStore, PresenceStore, RedisPresenceStore, StoreError
from tsunagu_presence.tracker import PresenceTracker

SERVICE = "presence"
STORE = "presence-store"
NEEDS = ("bus", "broker", STORE)

MAX_NAME = 255
# Printable, no whitespace: what a user id or a channel name can be.
_NAME = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


class BadRequest(Exception):
    pass


def create_store(core: CoreSettings, settings: PresenceSettings) -> PresenceStore:
    """Redis when the broker is Redis (several replicas share it), memory for `tsunagu run`."""
    if core.broker == "redis":
        return RedisPresenceStore(core.redis_url, settings.key_prefix, settings.tombstone_ttl, settings.dead_node_ttl)
    return MemoryPresenceStore(settings.tombstone_ttl, settings.dead_node_ttl)


def _checked(what: str, value: str) -> str:
    if not value or len(value) > MAX_NAME or not _NAME.match(value):
        raise BadRequest(f"{what} must be 1 to {MAX_NAME} printable characters without spaces")
    return value


def _json_bytes(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _info(info: ClientInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.conn_info:
        out["conn_info"] = _json_bytes(info.conn_info)
    if info.chan_info:
        out["chan_info"] = _json_bytes(info.chan_info)
    return out


def create_app(runtime: Runtime, settings: PresenceSettings, store: PresenceStore | None = None) -> FastAPI:
    store = store if store is not None else create_store(runtime.settings, settings)
    runtime.add_dependency(STORE, store)
    tracker = PresenceTracker(
        store, runtime.broker, dead_after=settings.dead_after, sweep_interval=settings.sweep_interval
    )

    consumers = consumer_hook(
        runtime,
        needs=["bus", STORE],
        topics=[topics.GATEWAY_EVENTS],
        group=settings.consumer_group,
        handler=tracker.handle,
        name="presence-consumer",
    )

    async def sweep() -> None:
        await runtime.wait_ready(["broker", STORE])
        await tracker.run_sweeper()

    @asynccontextmanager
    async def track() -> AsyncIterator[None]:
        sweeper = asyncio.create_task(sweep(), name="presence-sweeper")
        try:
            async with consumers():
                yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS, hooks=[track], **internal_api(runtime))
    app.state.settings = settings
    app.state.tracker = tracker

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": "bad_request", "message": str(exc)}, status_code=400)

    @app.exception_handler(StoreError)
    @app.exception_handler(BrokerError)
    @app.exception_handler(RedisError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "unavailable", "message": str(exc)}, status_code=503)

    @app.get("/v1/users/{user}/online", tags=["presence"])
    async def user_online(user: str) -> dict[str, Any]:
        """Whether the user has a connection on any gateway, and which."""
        connections = await store.connections(_checked("user", user))
        return {"user": user, "online": bool(connections), "connections": [c.as_dict() for c in connections]}

    @app.get("/v1/channels/{channel:path}/presence-stats", tags=["presence"])
    async def channel_presence_stats(channel: str) -> dict[str, int]:
        """What the gateway's `presence_stats` command answers."""
        stats = await runtime.broker.presence_stats(_checked("channel", channel))
        return {"num_clients": stats.num_clients, "num_users": stats.num_users}

    @app.get("/v1/channels/{channel:path}/presence", tags=["presence"])
    async def channel_presence(channel: str) -> dict[str, Any]:
        """What the gateway's `presence` command answers: clients present in the channel."""
        clients = await runtime.broker.presence(_checked("channel", channel))
        return {"presence": {client: _info(info) for client, info in clients.items()}}

    return app
