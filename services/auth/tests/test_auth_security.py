"""Attacks on auth's logins and admin API, replayed: parallel guesses past the limit, locking a victim out
from elsewhere, one address behind an ingress locking everyone out, an oversized body, the revoke call
as the README suggests it, production without encrypted keys. Each is refused and auth stays up, on the
memory engine and on real Redis (the limiter's Lua script)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from tsunagu_auth.app import create_app
from tsunagu_auth.config import AuthSettings
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import REDIS_URL, free_port, require_stack, serving

ADMIN_KEY = "security-test-admin-key"
PASSWORD = "correct horse battery"
FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}
INGRESS = "10.96.0.17"  # the ingress controller's pod: every client's socket peer behind it


def address() -> str:
    """An address of its own per client, so parallel tests never share counters in the shared Redis."""
    n = uuid.uuid4().int
    return f"198.{18 + n % 2}.{n >> 8 & 255}.{n >> 16 & 255}"


class Auth:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def client(self, ip: str | None = None, **headers: str) -> httpx.AsyncClient:
        """An HTTP client whose socket peer is `ip`."""
        transport = httpx.ASGITransport(app=self.app, client=(ip or address(), 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://auth", headers=headers)

    async def user(self) -> str:
        name = f"u{uuid.uuid4().hex[:10]}"
        async with self.client(authorization=f"Bearer {ADMIN_KEY}") as admin:
            created = await admin.post("/v1/users", json={"username": name, "password": PASSWORD, "channels": ["*"]})
        assert created.status_code == 201, created.text
        return name


async def login(http: httpx.AsyncClient, user: str, password: str = PASSWORD, **headers: str) -> httpx.Response:
    body = {"grant_type": "password", "username": user, "password": password}
    return await http.post("/v1/token", json=body, headers=headers)


@pytest.fixture(params=["memory", "redis"])
def start_auth(request: pytest.FixtureRequest) -> Callable[..., AbstractAsyncContextManager[Auth]]:
    core: dict[str, Any] = {}
    if request.param == "redis":
        require_stack("the login limiter on Redis")
        core = {"broker": "redis", "redis_url": REDIS_URL}

    @asynccontextmanager
    async def start(core_overrides: dict[str, Any] | None = None, **settings: Any) -> AsyncIterator[Auth]:
        runtime = Runtime(CoreSettings(**core, **(core_overrides or {})))
        app = create_app(runtime, AuthSettings(admin_api_key=ADMIN_KEY, **{**FAST_ARGON2, **settings}))
        async with app.router.lifespan_context(app):
            await runtime.wait_ready(["bus", "login-limits"], timeout=10)
            auth = Auth(app)
            yield auth
            async with auth.client() as http:
                assert (await http.get("/readyz")).status_code == 200, "auth stays healthy"

    return start


def logins(outcome: str) -> float:
    return REGISTRY.get_sample_value("tsunagu_auth_logins_total", {"outcome": outcome}) or 0.0


async def test_parallel_guesses_get_no_more_than_the_limit_through(start_auth: Any) -> None:
    # Real argon2 cost: each check takes tens of milliseconds, the window the guesses race through.
    real_argon2 = {"argon2_time_cost": 2, "argon2_memory_cost": 19456, "argon2_parallelism": 1}
    async with start_auth(login_max_failures=5, **real_argon2) as auth:
        victim = await auth.user()
        async with auth.client() as attacker:
            answers = await asyncio.gather(*(login(attacker, victim, f"guess-{n}") for n in range(20)))
        statuses = [a.status_code for a in answers]
        assert statuses.count(401) == 5, statuses
        assert statuses.count(429) == 15
        assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)


async def test_failures_from_one_address_do_not_lock_the_user_out_elsewhere(start_auth: Any) -> None:
    async with start_auth(login_max_failures=3) as auth:
        victim = await auth.user()
        async with auth.client() as attacker, auth.client() as owner:
            for _ in range(3):
                assert (await login(attacker, victim, "wrong")).status_code == 401
            assert (await login(attacker, victim)).status_code == 429, "the guesser's address is shut out"
            assert (await login(owner, victim)).status_code == 200, "the user is not"


async def test_behind_an_ingress_one_attacker_does_not_lock_out_everyone(start_auth: Any) -> None:
    async with start_auth({"trusted_proxies": ["10.96.0.0/12"]}, login_max_failures_per_ip=5) as auth:
        user = await auth.user()
        attacker, colleague = address(), address()
        async with auth.client(INGRESS) as through_ingress:
            for n in range(5):
                sprayed = await login(through_ingress, f"nobody{n}", "wrong", **{"x-forwarded-for": attacker})
                assert sprayed.status_code == 401
            blocked = await login(through_ingress, user, **{"x-forwarded-for": attacker})
            assert blocked.status_code == 429
            assert (await login(through_ingress, user, **{"x-forwarded-for": colleague})).status_code == 200


async def test_a_forged_forwarded_for_does_not_escape_the_limit(start_auth: Any) -> None:
    """Regression guard: only trusted proxies are believed, a client's own header is not."""
    async with start_auth({"trusted_proxies": ["10.96.0.0/12"]}, login_max_failures=3) as auth:
        victim = await auth.user()
        async with auth.client() as attacker:
            for _ in range(3):
                assert (await login(attacker, victim, "wrong", **{"x-forwarded-for": address()})).status_code == 401
            assert (await login(attacker, victim, "wrong", **{"x-forwarded-for": address()})).status_code == 429


async def test_a_user_attacked_from_many_addresses_is_slowed_down_not_locked(start_auth: Any) -> None:
    async with start_auth(login_max_failures=2, login_user_slowdown_after=4, login_user_max_delay=0.5) as auth:
        victim = await auth.user()
        async with auth.client() as known_device:
            assert (await login(known_device, victim)).status_code == 200
            for _ in range(4):  # a botnet: two guesses from each of four addresses
                async with auth.client() as bot:
                    for _ in range(2):
                        assert (await login(bot, victim, "wrong")).status_code == 401
            slowed = logins("slowed")
            async with auth.client() as new_device:
                assert (await login(new_device, victim)).status_code == 200
            assert logins("slowed") == slowed + 1, "an unknown address waits first"
            assert (await login(known_device, victim)).status_code == 200
            assert logins("slowed") == slowed + 1, "the address the user logged in from before does not"


async def test_revoke_takes_the_admin_key_as_the_server_api_does(start_auth: Any) -> None:
    async with start_auth() as auth:
        user = await auth.user()
        async with auth.client() as http:
            assert (await login(http, user)).status_code == 200
            revoked = await http.post("/v1/revoke", json={"user": user}, headers={"X-API-Key": ADMIN_KEY})
            assert revoked.status_code == 200, revoked.text
            assert revoked.json()["sessions"] == 1
            bearer = await http.post(
                "/v1/revoke", json={"user": user}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            assert bearer.status_code == 200
            wrong = await http.post("/v1/revoke", json={"user": user}, headers={"X-API-Key": "guess"})
            assert wrong.status_code == 403
            missing = await http.post("/v1/revoke", json={"user": user})
            assert missing.status_code == 401 and "X-API-Key" in missing.json()["error_description"]


async def test_an_oversized_body_is_answered_413_before_it_is_sent() -> None:
    runtime = Runtime(CoreSettings())
    app = create_app(runtime, AuthSettings(**FAST_ARGON2))
    port = free_port()
    async with serving(app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = "POST /v1/token HTTP/1.1\r\nhost: auth\r\ncontent-type: application/json\r\n"
        head += "content-length: 50000000\r\n\r\n"
        writer.write(head.encode() + b'{"grant_type": "')
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)  # 50 MB were announced, 16 bytes sent
        assert status.startswith(b"HTTP/1.1 413"), status
        writer.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(20):
                    yield b" " * 4096

            streamed = await http.post("/v1/token", content=chunks())
            assert streamed.status_code == 413
            assert streamed.json() == {
                "error": "invalid_request",
                "error_description": "request body over 65536 bytes",
            }
            assert (await http.get("/readyz")).status_code == 200


def test_production_refuses_unencrypted_signing_keys() -> None:
    with pytest.raises(ConfigError, match="TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET"):
        create_app(Runtime(CoreSettings(env="production")), AuthSettings())
    create_app(Runtime(CoreSettings(env="production")), AuthSettings(key_encryption_secret="a real passphrase"))
