from __future__ import annotations

import time

from fastapi.testclient import TestClient
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime, create_service_app
from tsunagu_core.testing import eventually


class FlakyDependency:
    """Refuses the first `failures` connection attempts, like a database that is still booting."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.closed = False

    async def start(self) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionRefusedError("connection refused")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


async def test_dependency_is_retried_until_it_answers_and_readiness_follows() -> None:
    runtime = Runtime(CoreSettings(dependency_retry_max=0.05))
    database = FlakyDependency(failures=3)
    runtime.add_dependency("postgres", database)
    await runtime.acquire(["bus", "postgres"])
    ready, checks = await runtime.readiness(["bus", "postgres"])
    assert not ready
    assert checks["postgres"].startswith(("connecting", "unreachable"))
    await runtime.wait_ready(["postgres"], timeout=5)
    ready, checks = await runtime.readiness(["bus", "postgres"])
    assert ready and checks == {"bus": "ok", "postgres": "ok"}
    assert database.attempts == 4
    await runtime.release()
    assert database.closed


async def test_engines_stay_up_until_the_last_service_releases_them() -> None:
    database = FlakyDependency(failures=0)
    runtime = Runtime(CoreSettings())
    runtime.add_dependency("postgres", database)
    await runtime.acquire(["postgres"])
    await runtime.acquire(["postgres"])
    await runtime.wait_ready(["postgres"], timeout=5)
    await runtime.release()
    assert not database.closed
    await runtime.release()
    assert database.closed


def test_readyz_explains_what_is_missing() -> None:
    runtime = Runtime(CoreSettings(dependency_retry_max=0.05))
    runtime.add_dependency("postgres", FlakyDependency(failures=10**9))
    app = create_service_app(service="collab", runtime=runtime, needs=["bus", "postgres"])
    with TestClient(app) as client:
        time.sleep(0.2)  # the app runs in TestClient's thread; let it try and fail a few times
        response = client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert body["checks"]["bus"] == "ok"
        assert body["checks"]["postgres"] == "unreachable: connection refused"
        assert client.get("/healthz").status_code == 200


async def test_eventually_fails_instead_of_hanging() -> None:
    try:
        await eventually(lambda: False, timeout=0.05)
    except TimeoutError:
        return
    raise AssertionError("eventually() returned although the condition never held")


def test_a_dependency_name_is_taken_once() -> None:
    import pytest
    from tsunagu_core.broker import MemoryBroker
    from tsunagu_core.bus import MemoryBus
    from tsunagu_core.config import CoreSettings
    from tsunagu_core.lifecycle import Runtime

    runtime = Runtime(CoreSettings(), bus=MemoryBus(), broker=MemoryBroker())
    first = MemoryBroker()
    runtime.add_dependency("cache", first)
    runtime.add_dependency("cache", first)  # the same object again: fine (shared stores do this)
    with pytest.raises(ValueError, match="'cache' is already registered"):
        runtime.add_dependency("cache", MemoryBroker())


def test_the_root_of_a_service_links_its_endpoints() -> None:
    """What `tsunagu run` prints is a URL per service: opening it shows where to go, not a 404."""
    app = create_service_app(service="presence", runtime=Runtime(CoreSettings()), needs=["bus"])
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "tsunagu presence" in page.text
        for path in ("/healthz", "/readyz", "/metrics", "/docs"):
            assert f'href="{path}"' in page.text
            assert client.get(path).status_code == 200
