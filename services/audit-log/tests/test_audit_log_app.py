"""The service on the embedded engines: bus in, HTTP out, bad input answered with 400s."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from tsunagu_audit_log.app import create_app
from tsunagu_audit_log.config import AuditSettings
from tsunagu_core import topics
from tsunagu_core.bus import DEAD_LETTER_SUFFIX, BusMessage
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import POSTGRES_DSN, eventually, require_stack
from tsunagu_core.wire.events_pb2 import AuditEvent, GatewayEvent


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), AuditSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "audit-log"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == set(("bus",))
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_port_comes_from_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_AUDIT_PORT", "18087")
    assert AuditSettings().port == 18087


@asynccontextmanager
async def running(settings: AuditSettings | None = None) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(Runtime(CoreSettings()), settings or AuditSettings(checkpoint_rows=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://audit") as http:
            yield app, http


async def publish_audit(app: FastAPI, actor: str, action: str, subject: str, details: bytes = b"{}") -> str:
    event = AuditEvent(actor=actor, action=action, subject=subject, details=details, outcome="ok")
    runtime: Runtime = app.state.runtime
    await publish_event(runtime.bus, topics.AUDIT, "audit.event", event, key=actor, source="test")
    return actor


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def items(http: httpx.AsyncClient, **params: str) -> list[dict[str, object]]:
    response = await http.get("/v1/audit", params=params)
    assert response.status_code == 200, response.text
    found: list[dict[str, object]] = response.json()["items"]
    return found


async def test_events_from_the_bus_are_listed_paginated_and_verified() -> None:
    async with running() as (app, http):
        for n in range(7):
            await publish_audit(app, "alice", "auth.login", "sess-1", details=json.dumps({"n": n}).encode())
        await publish_audit(app, "bob", "auth.revoke", "user-9")
        await eventually(lambda: app.state.audit.store.chain_head.seq == 8)
        assert len(await items(http, limit="1000")) == 8
        page = await http.get("/v1/audit", params={"subject": "sess-1", "limit": "3", "order": "asc"})
        body = page.json()
        assert [item["details"] for item in body["items"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        seen = list(body["items"])
        while body["next_cursor"]:
            params = {"subject": "sess-1", "limit": "3", "order": "asc", "cursor": body["next_cursor"]}
            body = (await http.get("/v1/audit", params=params)).json()
            seen += body["items"]
        assert [item["details"] for item in seen] == [{"n": n} for n in range(7)]
        assert len({item["seq"] for item in seen}) == 7
        revoke = await items(http, action="auth.revoke")
        assert [(i["actor"], i["subject"], i["type"], i["source"]) for i in revoke] == [
            ("bob", "user-9", "audit.event", "test")
        ]
        verify = (await http.get("/v1/audit/verify")).json()
        assert verify["ok"] is True and verify["rows_checked"] == 8 and verify["first_broken"] is None
        assert metric("tsunagu_audit_chain_ok") == 1.0
        key = (await http.get("/v1/audit/public-key")).json()
        assert key["algorithm"] == "Ed25519" and len(base64.b64decode(key["public_key"])) == 32
        assert key["ephemeral"] is True
        pem = await http.get("/v1/audit/public-key", headers={"accept": "application/x-pem-file"})
        assert pem.text.startswith("-----BEGIN PUBLIC KEY-----")


async def test_bad_records_are_counted_and_skipped_and_forced_logouts_recorded() -> None:
    async with running() as (app, http):
        bus = app.state.runtime.bus
        before = metric("tsunagu_audit_bad_events_total", {"topic": topics.AUDIT})
        await bus.publish(topics.AUDIT, b"\xff\x00 not an envelope")
        await publish_event(bus, topics.AUDIT, "audit.event", AuditEvent(actor="x"), key="x", source="test")
        heartbeat = GatewayEvent(kind=GatewayEvent.NODE_HEARTBEAT, node="n1")
        await publish_event(bus, topics.GATEWAY_EVENTS, "gateway.node_heartbeat", heartbeat, key="n1", source="gw")
        plain = GatewayEvent(kind=GatewayEvent.DISCONNECTED, user_id="dora", code=3000, reason="normal")
        await publish_event(bus, topics.GATEWAY_EVENTS, "gateway.disconnected", plain, key="dora", source="gw/n1")
        forced = GatewayEvent(
            kind=GatewayEvent.DISCONNECTED,
            user_id="dora",
            session_id="s-1",
            client_id="c-1",
            code=3500,
            reason="token revoked",
            node="n1",
        )
        await publish_event(bus, topics.GATEWAY_EVENTS, "gateway.disconnected", forced, key="dora", source="gw/n1")
        await publish_audit(app, "alice", "auth.login", "after-the-bad-ones")
        await eventually(lambda: app.state.audit.store.chain_head.seq == 2)
        assert metric("tsunagu_audit_bad_events_total", {"topic": topics.AUDIT}) == before + 2
        logout = await items(http, action="session.forced_logout")
        assert len(logout) == 1
        assert logout[0]["subject"] == "dora" and logout[0]["actor"] == "gw/n1"
        assert logout[0]["details"] == {
            "client_id": "c-1",
            "code": 3500,
            "node": "n1",
            "reason": "token revoked",
            "session_id": "s-1",
            "transport": "",
        }
        assert [i["subject"] for i in await items(http, actor="alice")] == ["after-the-bad-ones"]


async def test_checkpoints_are_signed_as_rows_arrive() -> None:
    async with running(AuditSettings(checkpoint_rows=3, checkpoint_interval=3600)) as (app, http):
        for n in range(7):
            await publish_audit(app, "alice", "auth.login", f"s{n}")
        store = app.state.audit.store
        await eventually(lambda: store.chain_head.seq == 7 and max(store.signed, default=0) >= 6, timeout=10)
        verify = (await http.get("/v1/audit/verify")).json()
        assert verify["ok"] and verify["last_checkpoint"]["seq"] >= 6


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-01-01T00:00:00"}, "time zone"),
        ({"since": "2000", "until": "1000"}, "since is after until"),
        ({"order": "random"}, "order"),
        ({"cursor": "!!!"}, "cursor"),
        ({"subjet": "typo"}, "unknown parameter"),
    ],
)
async def test_bad_query_parameters_are_400s(params: dict[str, str], message: str) -> None:
    async with running() as (_, http):
        response = await http.get("/v1/audit", params=params)
        assert response.status_code == 400
        assert message in response.json()["error"]


async def test_a_cursor_only_works_in_its_own_order() -> None:
    async with running() as (app, http):
        for n in range(3):
            await publish_audit(app, "alice", "auth.login", f"s{n}")
        await eventually(lambda: app.state.audit.store.chain_head.seq == 3)
        cursor = (await http.get("/v1/audit", params={"limit": "1"})).json()["next_cursor"]
        assert cursor
        response = await http.get("/v1/audit", params={"cursor": cursor, "order": "asc"})
        assert response.status_code == 400 and "other order" in response.json()["error"]
        since = await http.get("/v1/audit", params={"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"})
        assert len(since.json()["items"]) == 3


def test_a_bad_signing_key_stops_the_service_with_one_line() -> None:
    with pytest.raises(ConfigError, match="SIGNING_KEY"):
        create_app(Runtime(CoreSettings()), AuditSettings(signing_key="not a key"))
    with pytest.raises(ConfigError, match="TRUSTED_KEYS"):
        create_app(Runtime(CoreSettings()), AuditSettings(trusted_keys="AAAA"))


async def test_on_postgres_without_a_key_nothing_is_signed_but_the_chain_still_verifies() -> None:
    require_stack("audit-log on PostgreSQL")
    schema = f"audit_t_{uuid.uuid4().hex[:12]}"
    core = CoreSettings(database="postgres", postgres_dsn=POSTGRES_DSN)
    app = create_app(Runtime(core), AuditSettings(schema_name=schema, checkpoint_rows=1, checkpoint_interval=0.1))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://audit") as http:
                await app.state.runtime.wait_ready(["bus", "audit-database"], timeout=10)
                for n in range(3):
                    await publish_audit(app, "alice", "auth.login", f"pg-{schema}-{n}")
                store = app.state.audit.store
                for _ in range(200):
                    if (await store.head()).seq == 3:
                        break
                    await asyncio.sleep(0.02)
                assert (await store.head()).seq == 3
                await asyncio.sleep(0.5)  # checkpoints would be due every row and every 0.1 s
                key = (await http.get("/v1/audit/public-key")).json()
                assert key["ephemeral"] is True and key["signs_checkpoints"] is False
                assert await store.checkpoints() == []
                report = (await http.get("/v1/audit/verify")).json()
                assert report["ok"] and report["rows_checked"] == 3 and report["last_checkpoint"] is None
                assert [i["subject"] for i in await items(http, order="asc")] == [f"pg-{schema}-{n}" for n in range(3)]
    finally:
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.execute("DELETE FROM tsunagu_migrations WHERE service = $1", f"audit-log/{schema}")
        finally:
            await conn.close()


async def test_a_batch_is_appended_in_order_and_its_bad_record_goes_to_the_dead_letter_topic() -> None:
    async with running() as (app, http):
        bus = app.state.runtime.bus
        dead: list[BusMessage] = []

        async def collect(message: BusMessage) -> None:
            dead.append(message)

        dead_letters = await bus.consume([topics.AUDIT + DEAD_LETTER_SUFFIX], "audit-dlq-test", collect)
        writes_before = REGISTRY.get_sample_value("tsunagu_audit_batch_size_count") or 0
        try:
            for n in range(40):
                if n == 17:
                    await bus.publish(topics.AUDIT, b"\xff\x00 not an envelope", key="alice")
                await publish_audit(app, "alice", "doc.edit", "doc-1", details=json.dumps({"n": n}).encode())
            await eventually(lambda: app.state.audit.store.chain_head.seq == 40 and len(dead) == 1)
        finally:
            await dead_letters.stop()
        rows = await items(http, limit="1000", order="asc")
        assert [row["details"] for row in rows] == [{"n": n} for n in range(40)]
        assert dead[0].value == b"\xff\x00 not an envelope"
        assert dead[0].headers["tsunagu-dlq-error"] and dead[0].headers["tsunagu-dlq-group"] == "audit-log"
        assert (await http.get("/v1/audit/verify")).json()["ok"] is True
        writes = (REGISTRY.get_sample_value("tsunagu_audit_batch_size_count") or 0) - writes_before
        assert writes < 40, "the events were not appended in batches"
