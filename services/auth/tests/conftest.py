"""An auth app per test on each engine set: memory, and real PostgreSQL + Redis (a schema of its own)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from fastapi.testclient import TestClient
from tsunagu_auth.app import create_app
from tsunagu_auth.config import AuthSettings
from tsunagu_auth.domain import AuthService
from tsunagu_core.bus import BusMessage, MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.envelope import envelope_of
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import POSTGRES_DSN, REDIS_URL, require_stack

ADMIN_KEY = "test-admin-key"
# Cheap argon2 so tests are fast; production parameters are the settings' defaults.
FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}


def with_search_path(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


async def _run_sql(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class AuthUnderTest:
    client: TestClient
    auth: AuthService
    bus: MemoryBus
    engine: str
    seen: list[BusMessage]

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def user(self, channels: list[str] | None = None, password: str = "correct horse") -> str:
        name = f"u{uuid.uuid4().hex[:10]}"
        body = {"username": name, "password": password, "channels": channels or ["chat:*"]}
        response = self.client.post("/v1/users", json=body, headers=self.admin())
        assert response.status_code == 201, response.text
        return name

    def login(self, username: str, password: str = "correct horse", **headers: str) -> Any:
        body = {"grant_type": "password", "username": username, "password": password}
        return self.client.post("/v1/token", json=body, headers=headers)

    def events(self, topic: str) -> list[Any]:
        return [envelope_of(m) for m in self.seen if m.topic == topic]


@pytest.fixture(params=["memory", "postgres"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_stack("auth on PostgreSQL and Redis")
    return str(request.param)


@pytest.fixture
def make_auth(engine: str) -> Iterator[Any]:
    schemas: list[str] = []
    clients: list[TestClient] = []

    def make(**overrides: Any) -> AuthUnderTest:
        core: dict[str, Any] = {}
        if engine == "postgres":
            schema = f"auth_test_{uuid.uuid4().hex[:10]}"
            asyncio.run(_run_sql(f"CREATE SCHEMA {schema}"))
            schemas.append(schema)
            core = {
                "database": "postgres",
                "postgres_dsn": with_search_path(POSTGRES_DSN, schema),
                "broker": "redis",
                "redis_url": REDIS_URL,
            }
        bus = MemoryBus()
        runtime = Runtime(CoreSettings(**core), bus=bus)
        settings = AuthSettings(
            admin_api_key=ADMIN_KEY, **{**FAST_ARGON2, "login_max_failures_per_ip": 10_000, **overrides}
        )
        app = create_app(runtime, settings)
        # An address of its own, so per-IP counters in the shared Redis never mix parallel tests.
        client = TestClient(
            app, client=(f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}", 50000)
        )
        client.__enter__()
        clients.append(client)
        seen: list[BusMessage] = []

        async def record(message: BusMessage) -> None:
            seen.append(message)

        client.portal.call(bus.consume, ["tsunagu.audit", "tsunagu.auth.revocations"], f"t-{uuid.uuid4().hex}", record)
        ready = client.get("/readyz")
        for _ in range(100):
            if ready.status_code == 200:
                break
            client.portal.call(asyncio.sleep, 0.05)
            ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        return AuthUnderTest(client, app.state.auth, bus, engine, seen)

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    for schema in schemas:
        asyncio.run(_run_sql(f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture
def auth(make_auth: Any) -> AuthUnderTest:
    result: AuthUnderTest = make_auth()
    return result
