"""auth application factory: tokens, second factors, refresh rotation, revocation, JWKS with key rotation,
sessions with their connections (from the gateways' events) and the operator console's backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from tsunagu_core import topics
from tsunagu_core.bus import BusError
from tsunagu_core.config import ConfigError
from tsunagu_core.database import DatabaseUnavailable, Postgres
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app
from tsunagu_core.nonces import MemoryNonceRegistry, NonceRegistry, RedisNonceRegistry
from tsunagu_core.proxies import TrustedProxies
from tsunagu_core.revocation_store import DEPENDENCY as REVOCATIONS
from tsunagu_core.revocation_store import shared_revocation_store
from tsunagu_core.service_auth import service_headers

from tsunagu_auth.config import AuthSettings
from tsunagu_auth.connections import create_index
from tsunagu_auth.console import Console
from tsunagu_auth.domain import AuthError, AuthService
from tsunagu_auth.factors import Factors, SecretBox
from tsunagu_auth.handlers import MAX_BODY, build_router, error_response
from tsunagu_auth.limits import LoginLimiter, create_counters
from tsunagu_auth.notices import Notices
from tsunagu_auth.store import MIGRATIONS, MemoryStore, PostgresStore, Store
from tsunagu_auth.turn import IceServers

SERVICE = "auth"
LIMITS = "login-limits"
DATABASE = "auth-database"
NONCES = "auth-nonces"
CONNECTIONS = "auth-connections"
log = logging.getLogger("tsunagu.auth")


def create_app(runtime: Runtime, settings: AuthSettings) -> FastAPI:
    core = runtime.settings
    if core.env == "production" and not settings.key_encryption_secret:
        raise ConfigError(
            "auth: TSUNAGU_ENV=production without TSUNAGU_AUTH_KEY_ENCRYPTION_SECRET: the private signing keys"
            " would be stored unencrypted"
        )
    needs = ["bus", "broker", REVOCATIONS, LIMITS, NONCES, CONNECTIONS]
    store: Store
    if core.database == "postgres":
        database = Postgres(core.postgres_dsn, service=SERVICE, migrations=MIGRATIONS)
        # Named for the service: in `tsunagu run` every service has its own pool and migrations.
        runtime.add_dependency(DATABASE, database)
        store = PostgresStore(database)
        needs.append(DATABASE)
    else:
        store = MemoryStore()
    counters = create_counters(core)
    runtime.add_dependency(LIMITS, counters)
    limiter = LoginLimiter(
        counters,
        per_pair=settings.login_max_failures,
        per_ip=settings.login_max_failures_per_ip,
        window=settings.login_window,
        user_slowdown_after=settings.login_user_slowdown_after,
        user_max_delay=settings.login_user_max_delay,
    )
    factor_limiter = LoginLimiter(
        counters,
        per_pair=settings.mfa_max_failures,
        per_ip=settings.login_max_failures_per_ip,
        window=settings.login_window,
        user_slowdown_after=1 << 30,
        user_max_delay=0.0,
        per_user=settings.mfa_max_failures,
    )
    # mfa_tokens and passkey challenges are single-use on every replica.
    nonces: NonceRegistry = (
        RedisNonceRegistry(core.redis_url, prefix="tsunagu:auth:once")
        if core.broker == "redis"
        else MemoryNonceRegistry()
    )
    runtime.add_dependency(NONCES, nonces)
    index = create_index(core.broker, core.redis_url, settings.gateway_dead_after)
    runtime.add_dependency(CONNECTIONS, index)
    factors = Factors(
        store,
        SecretBox(settings.key_encryption_secret),
        issuer=settings.totp_issuer,
        skew=settings.totp_skew,
        rp_id=settings.webauthn_rp_id,
        rp_name=settings.webauthn_rp_name,
        origins=settings.webauthn_origins,
    )
    notices = Notices(runtime.broker, settings.notify_namespace)
    auth = AuthService(
        settings,
        store,
        shared_revocation_store(runtime),
        runtime.bus,
        limiter,
        core.node_name,
        factors=factors,
        factor_limiter=factor_limiter,
        nonces=nonces,
        notices=notices,
    )
    console = Console(settings, auth, index, service_headers(core))
    follow_connections = consumer_hook(
        runtime,
        needs=["bus", CONNECTIONS],
        topics=[topics.GATEWAY_EVENTS],
        group=settings.sessions_consumer_group,
        handler=index.handle,
        name="auth-sessions",
    )
    # Rotation is audited on the bus, so the timer starts once the bus (and database) are there.
    dependencies = ["bus", DATABASE] if core.database == "postgres" else ["bus"]

    async def keep_keys() -> None:
        await runtime.wait_ready(dependencies)
        bootstrapped = False
        while True:
            try:
                if not bootstrapped:
                    await auth.bootstrap()
                    bootstrapped = True
                await auth.maintain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bootstrap or signing key maintenance failed: %r", exc)
            await asyncio.sleep(settings.key_check_interval)

    @asynccontextmanager
    async def key_timer() -> AsyncIterator[None]:
        task = asyncio.create_task(keep_keys(), name="auth-keys")
        try:
            async with follow_connections():
                yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await auth.flush()
            await notices.flush()
            await console.close()

    app = create_service_app(
        service=SERVICE,
        runtime=runtime,
        needs=needs,
        hooks=[key_timer],
        max_body_bytes=MAX_BODY,
        body_error=lambda limit: {"error": "invalid_request", "error_description": f"request body over {limit} bytes"},
    )
    if settings.cors_origins:
        # Browsers log in from the gateway's origin; no cookies are involved, tokens travel in bodies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type"],
            # A locked login's 429 says for how long; the app shows it ("locked for 4 min 56 s").
            expose_headers=["retry-after"],
            max_age=600,
        )
    app.state.settings = settings
    app.state.auth = auth
    app.state.console = console
    app.state.ice_servers = IceServers(
        settings.turn_secret, tuple(settings.turn_uris), tuple(settings.stun_uris), settings.turn_credential_ttl
    )
    app.state.proxies = TrustedProxies(core.trusted_proxies)

    @app.exception_handler(AuthError)
    async def on_auth_error(request: Request, exc: AuthError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(DatabaseUnavailable)
    async def on_database_down(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return error_response(AuthError(503, "temporarily_unavailable", "the database is not reachable yet"))

    @app.exception_handler(BusError)
    async def on_bus_down(request: Request, exc: BusError) -> JSONResponse:
        return error_response(AuthError(503, "temporarily_unavailable", f"the event bus did not accept it: {exc}"))

    @app.exception_handler(RedisError)
    async def on_redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return error_response(AuthError(503, "temporarily_unavailable", "Redis is not reachable"))

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(AuthError(400, "invalid_request", str(exc.errors()[0].get("msg", "bad request"))))

    app.include_router(build_router())
    return app
