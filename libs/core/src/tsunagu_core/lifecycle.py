"""The engines a process shares, their start with retries, and the app every service is built on.

A dependency that cannot be reached is never a crash loop: the runtime retries it with backoff
in the background and `/readyz` says what is missing, so Kubernetes routes no traffic to the
replica until it is whole. One Runtime can serve several services (`tsunagu run`); it starts an
engine when the first service needing it starts, and closes the engines after the last one stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tsunagu_core import service_auth, topics, workers
from tsunagu_core.body_limit import BodyLimit, default_error
from tsunagu_core.broker import Broker, MemoryBroker
from tsunagu_core.bus import BatchHandler, BatchPolicy, Bus, Handler, MemoryBus, RetryPolicy, Subscription
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.dependency import Dependency

log = logging.getLogger("tsunagu.lifecycle")

READINESS_TIMEOUT = 2.0


def create_bus(settings: CoreSettings) -> Bus:
    if settings.bus == "kafka":
        from tsunagu_core.bus.kafka import KafkaBus

        return KafkaBus(
            settings.kafka_bootstrap,
            client_id=f"tsunagu-{settings.node_name}",
            partitions=settings.kafka_partitions,
            replication=settings.kafka_replication,
        )
    return MemoryBus()


def create_broker(settings: CoreSettings) -> Broker:
    if settings.broker == "redis":
        from tsunagu_core.broker.redis import RedisBroker

        return RedisBroker(settings.redis_url, retry_max=settings.dependency_retry_max)
    return MemoryBroker()


class Runtime:
    def __init__(self, settings: CoreSettings, *, bus: Bus | None = None, broker: Broker | None = None) -> None:
        self.settings = settings
        self.bus = bus if bus is not None else create_bus(settings)
        self.broker = broker if broker is not None else create_broker(settings)
        self._dependencies: dict[str, Dependency] = {"bus": self.bus, "broker": self.broker}
        self._state: dict[str, str] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._connectors: dict[str, asyncio.Task[None]] = {}
        self._users = 0
        self.draining = False

    def add_dependency(self, name: str, dependency: Dependency) -> None:
        """Register a dependency once; a different one under a taken name is a wiring mistake (two
        services of one process each need their own name, e.g. `auth-database`)."""
        registered = self._dependencies.setdefault(name, dependency)
        if registered is not dependency:
            raise ValueError(f"dependency {name!r} is already registered")

    async def acquire(self, needs: Sequence[str]) -> None:
        self._users += 1
        self.draining = False
        for name in needs:
            if name not in self._dependencies:
                raise KeyError(f"unknown dependency {name!r}")
            if name not in self._connectors:
                self._ready[name] = asyncio.Event()
                self._state[name] = "connecting"
                self._connectors[name] = asyncio.create_task(self._connect(name), name=f"connect-{name}")

    async def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        self.draining = True
        for task in self._connectors.values():
            task.cancel()
        for name, task in self._connectors.items():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._ready[name].is_set():
                try:
                    await self._dependencies[name].close()
                except Exception as exc:
                    log.warning("closing %s failed: %r", name, exc)
        self._connectors.clear()
        self._ready.clear()
        self._state.clear()

    async def _connect(self, name: str) -> None:
        dependency = self._dependencies[name]
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                await dependency.start()
                if name == "bus":
                    await self.bus.ensure_topics(topics.ALL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._state[name] = f"unreachable: {exc}"
                log.warning("%s not reachable yet (attempt %d): %s; retrying in %.1fs", name, attempt, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.dependency_retry_max)
                continue
            self._state[name] = "ok"
            self._ready[name].set()
            if attempt > 1:
                log.info("%s reachable after %d attempts", name, attempt)
            return

    async def wait_ready(self, needs: Sequence[str], timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            for name in needs:
                await self._ready[name].wait()

    async def readiness(self, needs: Sequence[str]) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        for name in needs:
            if name not in self._ready or not self._ready[name].is_set():
                checks[name] = self._state.get(name, "not started")
                continue
            try:
                async with asyncio.timeout(READINESS_TIMEOUT):
                    await self._dependencies[name].ping()
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"failing: {exc or type(exc).__name__}"
        ready = not self.draining and all(state == "ok" for state in checks.values())
        return ready, checks


ServiceHook = Callable[[], AbstractAsyncContextManager[None]]


def consumer_hook(
    runtime: Runtime,
    *,
    needs: Sequence[str],
    topics: Sequence[str] | Callable[[], Sequence[str]],
    group: str,
    handler: Handler | None = None,
    batch_handler: BatchHandler | None = None,
    consumers: int = 1,
    batch: BatchPolicy = BatchPolicy(),
    retry: RetryPolicy = RetryPolicy(),
    prepare: Callable[[], Awaitable[None]] | None = None,
    name: str = "consumer",
    from_latest: bool = False,
) -> ServiceHook:
    """A service's consumers as a hook: they join `group` in the background once `needs` are ready
    (nothing is consumed before the store answers: a handler failing for that would only burn the
    event's retries), and leaving the hook lets the batches in hand finish and commit them.
    Give an event `handler` or a `batch_handler`; `prepare` runs first (e.g. creating a topic).
    `from_latest` (batch handlers): a group with no committed position starts at the newest event."""
    if (handler is None) == (batch_handler is None):
        raise ValueError("give one of handler and batch_handler")

    async def join() -> list[Subscription]:
        await runtime.wait_ready(needs)
        if prepare is not None:
            await prepare()
        subscribed = list(topics() if callable(topics) else topics)
        subscriptions: list[Subscription] = []
        try:
            for _ in range(consumers):
                if batch_handler is not None:
                    subscription = await runtime.bus.consume_batches(
                        subscribed, group, batch_handler, batch=batch, retry=retry, from_latest=from_latest
                    )
                else:
                    assert handler is not None and not from_latest
                    subscription = await runtime.bus.consume(subscribed, group, handler, retry=retry)
                subscriptions.append(subscription)
        except BaseException:
            for subscription in subscriptions:
                await subscription.stop()
            raise
        log.info("%s: consuming %s in group %s (%d consumers)", name, ", ".join(subscribed), group, consumers)
        return subscriptions

    @asynccontextmanager
    async def consuming() -> AsyncIterator[None]:
        task = asyncio.create_task(join(), name=name)
        try:
            yield
        finally:
            if task.done() and not task.cancelled() and task.exception() is None:
                for subscription in task.result():
                    await subscription.stop()
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    return consuming


def create_service_app(
    *,
    service: str,
    runtime: Runtime,
    needs: Sequence[str] = (),
    hooks: Sequence[ServiceHook] = (),
    version: str = "0.1.0",
    warnings: Callable[[], dict[str, str]] | None = None,
    index: bool = True,
    internal_api: bool = False,
    max_body_bytes: int | None = None,
    body_error: Callable[[int], dict[str, Any]] = default_error,
) -> FastAPI:
    """A FastAPI app with the health, readiness and metrics endpoints every service exposes.

    `hooks` are entered in order once the runtime is acquired (the service's own consumers and
    background work) and left in reverse order when the service stops. `warnings` names what is
    configured so that the service runs but cannot do its job (a gateway with no token key): logged
    at start and shown in `/readyz` under `warnings`, without failing readiness. `index`: a small page
    at `/` that links the service's endpoints (off where the service serves something else there).

    `internal_api`: every route but `/`, `/healthz` and `/readyz` (and `/metrics` on this port) needs the
    platform's service credential (service_auth.py); with none configured the API is open, which
    `TSUNAGU_ENV=production` refuses. `max_body_bytes`: request bodies over it get 413 (`body_error`
    is the JSON answered) before they are read. `TSUNAGU_METRICS_PORT` set: no `/metrics` here, the
    CLI serves it on that port.
    """
    core = runtime.settings
    credential = service_auth.configured(core)
    if internal_api and not credential and core.env == "production":
        raise ConfigError(
            f"{service}: TSUNAGU_ENV=production without TSUNAGU_INTERNAL_TOKEN (or TSUNAGU_INTERNAL_PEERS with"
            " client certificates): its internal API would be open to anyone who reaches its port"
        )

    def noted() -> dict[str, str]:
        found = dict(warnings()) if warnings is not None else {}
        if internal_api and not credential:
            found["internal_api"] = "open to anyone who reaches this port: set TSUNAGU_INTERNAL_TOKEN"
        return found

    slot = workers.current()

    async def own_readiness() -> tuple[bool, dict[str, object]]:
        ready, checks = await runtime.readiness(needs)
        status = "ready" if ready else ("draining" if runtime.draining else "not ready")
        body: dict[str, object] = {"status": status, "service": service, "checks": checks}
        if slot is not None:
            body["worker"] = slot.index
        return ready, body

    async def control_ready() -> bytes:
        ready, body = await own_readiness()
        return json.dumps({"ready": ready, **body}).encode()

    async def control_metrics() -> bytes:
        return workers.own_metrics()

    async def control_ping() -> bytes:
        return b"pong"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.acquire(needs)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if slot is not None:
                    handlers = {"ready": control_ready, "metrics": control_metrics, "ping": control_ping}
                    control = await workers.serve_control(slot, handlers)
                    stack.push_async_callback(_close_control, control, slot)
                for hook in hooks:
                    await stack.enter_async_context(hook())
                for topic, warning in noted().items():
                    log.warning("%s: %s: %s", service, topic, warning)
                log.info("%s started", service)
                yield
                runtime.draining = True
                log.info("%s draining", service)
        finally:
            await runtime.release()

    app = FastAPI(title=f"tsunagu {service}", version=version, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.service = service

    if index:

        @app.get("/", include_in_schema=False)
        async def index_page() -> HTMLResponse:
            links = "".join(
                f'<li><a href="{path}">{path}</a> {what}</li>'
                for path, what in (
                    ("/healthz", "alive"),
                    ("/readyz", "dependencies answer (503 with the reason otherwise)"),
                    ("/metrics", "Prometheus metrics" if not core.metrics_port else "on TSUNAGU_METRICS_PORT"),
                    ("/docs", "the HTTP API (OpenAPI; /openapi.json)"),
                )
            )
            title = f"tsunagu {service}"
            return HTMLResponse(f"<!doctype html><title>{title}</title><h1>{title}</h1><ul>{links}</ul>")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, object]:
        body: dict[str, object] = {"status": "ok", "service": service}
        if slot is not None:
            body["worker"] = slot.index
        return body

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        if slot is None:
            ready, body = await own_readiness()
        else:
            # Through the shared port this is the whole process group's answer, not one worker's.
            (ready, body), siblings = await asyncio.gather(own_readiness(), workers.siblings_readiness(slot))
            states = {str(slot.index): {"ready": ready, "status": body["status"]}} | siblings
            body["workers"] = {index: states[index].get("status") for index in sorted(states, key=int)}
            if ready and not all(state.get("ready") for state in siblings.values()):
                ready = False
                body["status"] = "not ready"
        found = noted()
        if found:
            body["warnings"] = found
        return JSONResponse(body, status_code=200 if ready else 503)

    open_paths = set(service_auth.PROBE_PATHS) | ({"/"} if index else set())
    if not core.metrics_port:
        open_paths.add("/metrics")

        @app.get("/metrics", tags=["health"])
        async def metrics() -> Response:
            return Response(await workers.exposition(), media_type=CONTENT_TYPE_LATEST)

    # Added innermost first: the credential is checked before a byte of the body is read.
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, limit=max_body_bytes, error=body_error)
    if internal_api and credential:
        app.add_middleware(
            service_auth.ServiceAuth, token=core.internal_token, peers=core.internal_peers, open_paths=open_paths
        )
    return app


def internal_api(runtime: Runtime) -> dict[str, Any]:
    """create_service_app's arguments of a service whose HTTP API is internal: the service credential
    and the shared body cap (`TSUNAGU_HTTP_MAX_BODY_BYTES`)."""
    return {"internal_api": True, "max_body_bytes": runtime.settings.http_max_body_bytes}


async def _close_control(control: asyncio.AbstractServer, slot: workers.WorkerSlot) -> None:
    control.close()
    slot.control_path().unlink(missing_ok=True)
    with contextlib.suppress(Exception):
        await control.wait_closed()


def metrics_app() -> Any:
    """The ASGI app of a `/metrics` listener of its own (`TSUNAGU_METRICS_PORT`): the process's registry,
    or every worker's when it is one of several (workers.py)."""
    if workers.current() is None:
        from prometheus_client import make_asgi_app

        return make_asgi_app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await workers.exposition()
        headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app
