"""collab application factory: the Kafka consumer of document updates and the documents' HTTP API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from tsunagu_core import topics
from tsunagu_core.broker import BrokerError
from tsunagu_core.bus import BusError
from tsunagu_core.database import DatabaseUnavailable, Postgres
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app, internal_api

from tsunagu_collab.config import CollabSettings
from tsunagu_collab.service import DocError, DocService
from tsunagu_collab.store import MIGRATIONS, MemoryStore, PostgresStore, Store, Version

SERVICE = "collab"
DATABASE = "collab-database"
EVICT_INTERVAL = 5.0
log = logging.getLogger("tsunagu.collab")


class VersionRequest(BaseModel):
    label: str = Field("", max_length=200)


def _version(version: Version) -> dict[str, Any]:
    return {"version": version.version, "label": version.label, "created_at": version.created_at, "size": version.size}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(runtime: Runtime, settings: CollabSettings) -> FastAPI:
    core = runtime.settings
    needs = ["bus", "broker"]
    store: Store
    if core.database == "postgres":
        database = Postgres(core.postgres_dsn, service=SERVICE, migrations=MIGRATIONS)
        runtime.add_dependency(DATABASE, database)
        store = PostgresStore(database)
        needs.append(DATABASE)
    else:
        store = MemoryStore()
    docs = DocService(settings, store, runtime.bus, runtime.broker, core.node_name)

    consumers = consumer_hook(
        runtime,
        needs=needs,
        topics=[topics.COLLAB_UPDATES],
        group=settings.consumer_group,
        batch_handler=docs.handle_batch,
        name="collab-consumer",
    )

    async def evict() -> None:
        while True:
            await asyncio.sleep(EVICT_INTERVAL)
            try:
                await docs.evict_idle()
            except Exception as exc:
                log.warning("evicting idle documents failed: %r", exc)

    @asynccontextmanager
    async def consumer() -> AsyncIterator[None]:
        evictor = asyncio.create_task(evict(), name="collab-evict")
        try:
            async with consumers():
                yield
        finally:
            evictor.cancel()
            await docs.flush()

    app = create_service_app(service=SERVICE, runtime=runtime, needs=needs, hooks=[consumer], **internal_api(runtime))
    app.state.settings = settings
    app.state.docs = docs

    @app.exception_handler(DocError)
    async def on_doc_error(request: Request, exc: DocError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(DatabaseUnavailable)
    async def on_database_down(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return _error(503, "the database is not reachable yet")

    @app.exception_handler(BusError)
    async def on_bus_down(request: Request, exc: BusError) -> JSONResponse:
        return _error(503, f"the event bus did not accept it: {exc}")

    @app.exception_handler(BrokerError)
    async def on_broker_down(request: Request, exc: BrokerError) -> JSONResponse:
        return _error(503, f"the broker is not reachable: {exc}")

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        return _error(400, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'bad request')}")

    @app.get("/v1/docs/{doc}", tags=["docs"])
    async def get_doc(doc: str, format: str = Query("json", pattern="^(json|update)$")) -> dict[str, Any]:
        """The state as a base64 Yjs update (v1) with the `collab:{doc}` channel offset and epoch it
        includes; `format=json` (default) adds `content`, the JSON of the root types."""
        return await docs.document(doc, with_content=format == "json")

    @app.delete("/v1/docs/{doc}", tags=["docs"])
    async def delete_doc(doc: str) -> Response:
        if not await docs.delete(doc):
            return _error(404, f"document {doc!r} does not exist")
        return Response(status_code=204)

    @app.get("/v1/docs/{doc}/versions", tags=["docs"])
    async def list_versions(doc: str) -> dict[str, Any]:
        return {"doc": doc, "versions": [_version(v) for v in await docs.versions(doc)]}

    @app.post("/v1/docs/{doc}/versions", tags=["docs"], status_code=201)
    async def create_version(doc: str, body: VersionRequest | None = None) -> dict[str, Any]:
        version = await docs.snapshot_version(doc, body.label if body else "")
        return {"doc": doc, **_version(version)}

    @app.post("/v1/docs/{doc}/versions/{version}/restore", tags=["docs"], status_code=202)
    async def restore_version(doc: str, version: int) -> dict[str, Any]:
        size = await docs.restore(doc, version)
        return {"doc": doc, "restored": version, "update_bytes": size}

    return app
