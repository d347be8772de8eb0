"""Attacks on audit-log's API and start-up, each answered with a refusal while the service stays up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from tsunagu_audit_log.app import create_app
from tsunagu_audit_log.config import AuditSettings
from tsunagu_core import topics
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import eventually
from tsunagu_core.wire.events_pb2 import AuditEvent

TOKEN = "audit-internal-token"
PATIENT = "DOE^JANE^Q"


@asynccontextmanager
async def running(**core: object) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(Runtime(CoreSettings(internal_token=TOKEN, **core)), AuditSettings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://audit") as http:
            yield app, http


async def record_hl7(app: FastAPI) -> None:
    details = b'{"raw": "MSH|^~\\\\&|LAB|WARD|||20260101||ORU^R01|1|P|2.5\\rPID|1||123||' + PATIENT.encode() + b'"}'
    event = AuditEvent(actor="LAB@WARD", action="hl7.received", subject="123", details=details, outcome="ok")
    await publish_event(app.state.runtime.bus, topics.AUDIT, "audit.event", event, key="lab", source="test")
    await eventually(lambda: app.state.audit.store.chain_head.seq == 1)


async def test_the_log_with_patient_names_is_not_given_to_anyone_who_asks() -> None:
    async with running() as (app, http):
        await record_hl7(app)
        for path in ("/v1/audit", "/v1/audit/verify", "/v1/audit/public-key"):
            for headers in ({}, {"authorization": "Bearer guess"}):
                refused = await http.get(path, headers=headers)
                assert refused.status_code == 401, (path, refused.text)
                assert PATIENT not in refused.text
        assert (await http.get("/readyz")).status_code == 200
        allowed = await http.get("/v1/audit", headers={"authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200 and PATIENT in allowed.text


async def test_an_oversized_body_is_refused_with_413() -> None:
    async with running(http_max_body_bytes=2048) as (_app, http):
        big = await http.request(
            "GET", "/v1/audit", content=b"x" * 100_000, headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
        assert (await http.get("/healthz")).status_code == 200


def test_production_refuses_unsigned_checkpoints() -> None:
    core = CoreSettings(env="production", database="postgres", internal_token=TOKEN)
    with pytest.raises(ConfigError, match="TSUNAGU_AUDIT_SIGNING_KEY"):
        create_app(Runtime(core), AuditSettings())


def test_production_refuses_an_open_audit_api() -> None:
    core = CoreSettings(env="production")
    with pytest.raises(ConfigError, match="TSUNAGU_INTERNAL_TOKEN"):
        create_app(Runtime(core), AuditSettings())
