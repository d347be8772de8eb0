"""Attacks on collab's document API: delete, version and restore without the platform's credential are
refused and change nothing; an oversized body gets 413; the service stays up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from pycrdt import Doc, Text
from tsunagu_collab.app import create_app
from tsunagu_collab.config import CollabSettings
from tsunagu_core import topics
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.wire.events_pb2 import CollabUpdate

TOKEN = "collab-internal-token"
PLATFORM = {"authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def collab_with_a_document(**core: object) -> AsyncIterator[httpx.AsyncClient]:
    runtime = Runtime(CoreSettings(node_name="unit", internal_token=TOKEN, **core))
    app = create_app(runtime, CollabSettings())
    async with app.router.lifespan_context(app):
        await runtime.wait_ready(["bus", "broker"], timeout=5)
        source: Doc = Doc()
        source.get("text", type=Text).insert(0, "the minutes")
        update = CollabUpdate(doc="minutes", update=source.get_update(), client_id="c1")
        await publish_event(runtime.bus, topics.COLLAB_UPDATES, "collab.update", update, key="minutes", source="t")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collab") as http:
            async with asyncio.timeout(5):
                while (await http.get("/v1/docs/minutes", headers=PLATFORM)).json().get("offset", 0) < 1:
                    await asyncio.sleep(0.02)
            yield http


async def test_delete_version_and_restore_without_the_credential_are_refused() -> None:
    async with collab_with_a_document() as http:
        for headers in ({}, {"authorization": "Bearer guessed"}):
            attacks = [
                http.delete("/v1/docs/minutes", headers=headers),
                http.post("/v1/docs/minutes/versions", json={"label": "x"}, headers=headers),
                http.post("/v1/docs/minutes/versions/1/restore", headers=headers),
                http.get("/v1/docs/minutes", headers=headers),
                http.get("/v1/docs/minutes/versions", headers=headers),
            ]
            for attack in attacks:
                answer = await attack
                assert answer.status_code == 401, answer.text
        document = await http.get("/v1/docs/minutes", headers=PLATFORM)
        assert document.status_code == 200 and document.json()["content"] == {"text": "the minutes"}
        assert (await http.get("/v1/docs/minutes/versions", headers=PLATFORM)).json()["versions"] == []
        assert (await http.get("/readyz")).status_code == 200


async def test_an_oversized_version_request_gets_413() -> None:
    async with collab_with_a_document(http_max_body_bytes=2048) as http:
        big = await http.post("/v1/docs/minutes/versions", content=b"{" + b" " * 50_000 + b"}", headers=PLATFORM)
        assert big.status_code == 413, big.text
        assert (await http.get("/v1/docs/minutes/versions", headers=PLATFORM)).json()["versions"] == []
        assert (await http.get("/healthz")).status_code == 200


def test_production_refuses_an_open_document_api() -> None:
    with pytest.raises(ConfigError, match="collab: TSUNAGU_ENV=production without TSUNAGU_INTERNAL_TOKEN"):
        create_app(Runtime(CoreSettings(env="production")), CollabSettings())
