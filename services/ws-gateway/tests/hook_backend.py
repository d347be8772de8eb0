"""An application backend answering Centrifugo's HTTP proxy requests, as a team moving from Centrifugo
has one: a FastAPI app on a loopback port that the proxy-hook tests start, steer and read back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from tsunagu_core.testing import free_port, serving

Answer = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]
HOOKS = ("connect", "refresh", "subscribe", "publish", "sub_refresh", "rpc")


@dataclass
class HookBackend:
    port: int
    # The answer of each hook, from the request's JSON body; tests replace them.
    answers: dict[str, Answer] = field(default_factory=dict)
    # Every request as it arrived: (hook, body, headers by lower-case name).
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def url(self, hook: str) -> str:
        return f"http://127.0.0.1:{self.port}/centrifugo/{hook}"

    def proxy(self, hook: str, **options: Any) -> dict[str, Any]:
        """A TSUNAGU_GATEWAY_PROXIES entry pointing at this backend's `hook` endpoint."""
        return {"endpoint": self.url(hook), **options}

    def received(self, hook: str) -> list[dict[str, Any]]:
        return [body for name, body, _ in self.requests if name == hook]

    def headers_of(self, hook: str) -> list[dict[str, str]]:
        return [headers for name, _, headers in self.requests if name == hook]


def _app(backend: HookBackend) -> FastAPI:
    app = FastAPI()

    @app.post("/centrifugo/{hook}")
    async def answer(hook: str, request: Request) -> Any:
        body = await request.json()
        backend.requests.append((hook, body, {k.lower(): v for k, v in request.headers.items()}))
        respond = backend.answers.get(hook)
        if respond is None:
            return {"error": {"code": 1000, "message": f"no answer for {hook}"}}
        result = respond(body)
        return await result if asyncio.iscoroutine(result) else result

    return app


@contextlib.asynccontextmanager
async def hook_backend() -> AsyncIterator[HookBackend]:
    backend = HookBackend(free_port())
    async with serving(_app(backend), backend.port):
        yield backend
