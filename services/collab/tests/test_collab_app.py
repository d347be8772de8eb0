"""collab on embedded engines: the HTTP API, applying updates from the bus, compaction, versions."""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import pytest
from pycrdt import Doc, Map, Text
from tsunagu_collab.app import create_app
from tsunagu_collab.config import CollabSettings
from tsunagu_collab.service import DocService
from tsunagu_collab.store import MIGRATIONS, MemoryStore, PostgresStore, Store
from tsunagu_core import topics
from tsunagu_core.broker import MemoryBroker
from tsunagu_core.bus import MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.database import Postgres
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import POSTGRES_DSN, require_stack
from tsunagu_core.wire.events_pb2 import CollabUpdate


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    from fastapi.testclient import TestClient

    app = create_app(Runtime(CoreSettings()), CollabSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "collab"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"bus", "broker"}
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_settings_come_from_their_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_COLLAB_PORT", "18083")
    monkeypatch.setenv("TSUNAGU_COLLAB_CONSUMER_GROUP", "collab-x")
    assert (CollabSettings().port, CollabSettings().consumer_group) == (18083, "collab-x")


def edits(count: int) -> list[bytes]:
    """`count` single-character edits of Y.Text "text" (every fifth deletes), one update each."""
    doc: Doc = Doc()
    text = doc.get("text", type=Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    for i in range(count):
        if i % 5 == 4 and len(text):
            del text[i % len(text)]
        else:
            text.insert(i % (len(text) + 1), "abcdefghij"[i % 10])
    return updates


async def exercise(store: Store) -> None:
    broker = MemoryBroker()
    bus = MemoryBus()
    settings = CollabSettings(compact_min_bytes=512, compact_max_updates=100)
    docs = DocService(settings, store, bus, broker, "test")
    doc = f"unit-{uuid.uuid4().hex[:8]}"
    reference: Doc = Doc()
    for update in edits(600):
        reference.apply_update(update)
        await docs.apply(CollabUpdate(doc=doc, update=update, client_id="c1"))
    # a malformed update is dropped, the document is untouched
    await docs.apply(CollabUpdate(doc=doc, update=b"\x05\xff\xff garbage", client_id="c2"))
    expected = str(reference.get("text", type=Text))
    body = await docs.document(doc, with_content=True)
    assert body["content"] == {"text": expected}
    assert (await broker.history(f"collab:{doc}", limit=0)).position.offset == 600
    assert body["offset"] == 600
    # storage stays within about twice the encoded document, also after a restart from the store
    encoded = len(reference.get_update())
    assert await docs.stored_bytes(doc) <= 2 * encoded + settings.compact_min_bytes
    fresh = DocService(settings, store, bus, broker, "test")
    assert (await fresh.document(doc, with_content=True))["content"] == {"text": expected}
    await docs.evict_idle()
    # versions and restore: the restore is an ordinary update through the bus
    version = await docs.snapshot_version(doc, "v1")
    assert [v.version for v in await docs.versions(doc)] == [version.version]
    more: Doc = Doc()
    more.apply_update(reference.get_update())
    before = more.get_state()
    more.get("text", type=Text).insert(0, "NEW ")
    await docs.apply(CollabUpdate(doc=doc, update=more.get_update(before)))
    published: list[CollabUpdate] = []

    async def collect(message: object) -> None:
        from tsunagu_core.envelope import envelope_of, payload_of

        published.append(payload_of(envelope_of(message), CollabUpdate))  # type: ignore[arg-type]

    await bus.start()
    subscription = await bus.consume([topics.COLLAB_UPDATES], "collect", collect)
    await docs.restore(doc, version.version)
    async with asyncio.timeout(5):
        while not published:
            await asyncio.sleep(0.01)
    await subscription.stop()
    await docs.apply(published[0])
    assert (await docs.document(doc, with_content=True))["content"] == {"text": expected}
    assert await docs.delete(doc)
    assert (await docs.document(doc, with_content=True))["content"] == {}


async def test_documents_on_the_memory_store() -> None:
    await exercise(MemoryStore())


async def test_documents_on_postgres() -> None:
    require_stack("collab's PostgreSQL store")
    database = Postgres(POSTGRES_DSN, service="collab", migrations=MIGRATIONS)
    await database.start()
    try:
        await exercise(PostgresStore(database))
    finally:
        await database.close()


async def test_http_api_and_updates_from_the_bus() -> None:
    runtime = Runtime(CoreSettings(node_name="unit"))
    app = create_app(runtime, CollabSettings())
    async with app.router.lifespan_context(app):
        await runtime.wait_ready(["bus", "broker"], timeout=5)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collab")
        source: Doc = Doc()
        source.get("meta", type=Map)["title"] = "Notes"
        source.get("text", type=Text).insert(0, "hello")
        update = CollabUpdate(doc="notes", update=source.get_update(), client_id="c1")
        await publish_event(runtime.bus, topics.COLLAB_UPDATES, "collab.update", update, key="notes", source="test")
        async with asyncio.timeout(5):
            while (body := (await client.get("/v1/docs/notes")).json()).get("offset", 0) < 1:
                await asyncio.sleep(0.02)
        assert body["content"] == {"meta": {"title": "Notes"}, "text": "hello"}
        check: Doc = Doc()
        check.apply_update(base64.b64decode(body["update"]))
        assert str(check.get("text", type=Text)) == "hello"
        raw = (await client.get("/v1/docs/notes", params={"format": "update"})).json()
        assert "content" not in raw and raw["offset"] == 1
        created = await client.post("/v1/docs/notes/versions", json={"label": "first"})
        assert created.status_code == 201 and created.json()["version"] == 1
        assert [v["label"] for v in (await client.get("/v1/docs/notes/versions")).json()["versions"]] == ["first"]
        missing = await client.post("/v1/docs/notes/versions/9/restore")
        assert missing.status_code == 404 and "no version 9" in missing.json()["error"]
        bad = await client.get("/v1/docs/bad%20id")
        assert bad.status_code == 400 and "invalid document id" in bad.json()["error"]
        assert (await client.get("/v1/docs/notes", params={"format": "xml"})).status_code == 400
        assert (await client.delete("/v1/docs/notes")).status_code == 204
        assert (await client.delete("/v1/docs/notes")).status_code == 404
        await client.aclose()


async def test_a_batch_of_updates_is_merged_per_client_in_order_and_a_malformed_one_is_dead_lettered() -> None:
    from tsunagu_core.bus import DEAD_LETTER_SUFFIX, BusMessage

    runtime = Runtime(CoreSettings())
    app = create_app(runtime, CollabSettings())
    doc = f"batch-{uuid.uuid4().hex[:8]}"
    bus = runtime.bus
    await bus.start()
    updates = edits(120)
    reference: Doc = Doc()
    for update in updates:
        reference.apply_update(update)
    # Queued before collab consumes: they reach it as one batch, in Kafka order, three runs of clients.
    for n, update in enumerate(updates):
        client = "c1" if n < 50 or n >= 90 else "c2"
        event = CollabUpdate(doc=doc, update=update, client_id=client)
        await publish_event(bus, topics.COLLAB_UPDATES, "collab.update", event, key=doc, source="test")
        if n == 60:
            garbage = CollabUpdate(doc=doc, update=b"\x05\xff\xff garbage", client_id="c3")
            await publish_event(bus, topics.COLLAB_UPDATES, "collab.update", garbage, key=doc, source="test")
    dead: list[BusMessage] = []

    async def collect(message: BusMessage) -> None:
        dead.append(message)

    dead_letters = await bus.consume([topics.COLLAB_UPDATES + DEAD_LETTER_SUFFIX], "collab-dlq-test", collect)
    async with app.router.lifespan_context(app):
        docs: DocService = app.state.docs
        async with asyncio.timeout(10):
            while (await docs.document(doc, with_content=True))["content"] != {
                "text": str(reference.get("text", type=Text))
            } or not dead:
                await asyncio.sleep(0.02)
        history = await runtime.broker.history(f"collab:{doc}")
    await dead_letters.stop()
    published = [CollabUpdate.FromString(p.data) for p in history.publications]
    # c1 (0-49), c2 (50-89 but for the malformed one in between, which breaks no run), c1 (90-119)
    assert [p.client_id for p in published] == ["c1", "c2", "c1"]
    replayed: Doc = Doc()
    for p in published:
        replayed.apply_update(p.update)
    assert str(replayed.get("text", type=Text)) == str(reference.get("text", type=Text))
    assert "malformed Yjs update" in dead[0].headers["tsunagu-dlq-error"]
