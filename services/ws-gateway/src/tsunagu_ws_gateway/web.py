"""The demo web app at `/`: its built files (web/ → `web/` beside this module), its configuration, and
which backend services answer, so each view can say "not running" or what a service waits for instead
of spinning."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from tsunagu_core.tls import client_context

from tsunagu_ws_gateway.config import WEB_DEMO, GatewaySettings

WEB_ROOT = Path(__file__).parent / "web"
# A view polls every few seconds; probing each service once per interval is enough for every tab.
STATUS_CACHE_SECONDS = 2.0
PROBE_TIMEOUT = 1.0


ServiceStatus = dict[str, Any]


class ServiceProbe:
    """Asks each configured service's `/readyz`, at most once per STATUS_CACHE_SECONDS for all callers.

    A service is `up` (ready), `down` (does not answer: not running), or `waiting` (it runs, but a
    dependency is missing): then `missing` names each dependency that is not ok with its reason, as the
    service's `/readyz` gives them (`{"mqtt": "unreachable: ..."}`), so the app can say what to start.
    """

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self._client: httpx.AsyncClient | None = None
        self._answer: dict[str, ServiceStatus] = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def status(self) -> dict[str, ServiceStatus]:
        async with self._lock:
            if time.monotonic() - self._at >= STATUS_CACHE_SECONDS:
                names = list(self.urls)
                answers = await asyncio.gather(*(self._probe(self.urls[name]) for name in names))
                self._answer = dict(zip(names, answers, strict=True))
                self._at = time.monotonic()
            return dict(self._answer)

    async def _probe(self, base: str) -> ServiceStatus:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=PROBE_TIMEOUT, verify=client_context())
        try:
            response = await self._client.get(base.rstrip("/") + "/readyz")
        except httpx.HTTPError:
            return {"state": "down"}
        if response.status_code == 200:
            return {"state": "up"}
        try:
            checks = response.json().get("checks")
        except (ValueError, AttributeError):
            checks = None
        if not isinstance(checks, dict):
            return {"state": "waiting", "missing": {"readiness": f"HTTP {response.status_code}"}}
        missing = {str(name): str(state) for name, state in checks.items() if state != "ok"}
        return {"state": "waiting", "missing": missing}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class WebApp:
    """Serves the built files for GET/HEAD requests that no route took (the app routes by URL hash)."""

    def __init__(self, root: Path) -> None:
        self.files = StaticFiles(directory=root, html=True, check_dir=False)
        self.index = root / "index.html"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            response: Any = JSONResponse({"detail": "Not Found"}, status_code=404)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": "no such endpoint"})
                return
            await response(scope, receive, send)
            return
        if not self.index.is_file():
            missing = PlainTextResponse(
                "The web app is not built: run `npm ci --prefix web && npm run build --prefix web`.", status_code=404
            )
            await missing(scope, receive, send)
            return
        await self.files(scope, receive, send)


def build_web_router(settings: GatewaySettings, probe: ServiceProbe) -> APIRouter:
    router = APIRouter(tags=["web"])

    @router.get("/web/config.json")
    async def web_config() -> JSONResponse:
        body = {
            "auth_url": settings.web_auth_url,
            "native_path": "/connection/websocket",
            "collab_path": "/collab",
            # an operator's TSUNAGU_GATEWAY_WEB_DEMO may name only what it changes
            **WEB_DEMO,
            **settings.web_demo,
        }
        return JSONResponse(body, headers={"cache-control": "no-store"})

    @router.get("/web/services")
    async def web_services() -> JSONResponse:
        return JSONResponse(await probe.status(), headers={"cache-control": "no-store"})

    return router


def serve_web_app(app: FastAPI, settings: GatewaySettings) -> ServiceProbe:
    """Adds the web routes and makes the static app the fallback of every unmatched request, so routes
    added later (by anyone) still win over a file of the same path."""
    probe = ServiceProbe(settings.web_service_urls)
    app.include_router(build_web_router(settings, probe))
    app.router.default = WebApp(WEB_ROOT)
    return probe
