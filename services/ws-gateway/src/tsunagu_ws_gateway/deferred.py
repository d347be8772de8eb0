"""Protocol stacks that are heavy to import (strawberry + graphql-core, python-socketio + aiohttp), built
off the event loop after the gateway is up instead of before it listens.

Importing them takes longer than the rest of the gateway together (about 1.4 s of a 3.9 s start on
our 2-core machine). A gateway that is killed and restarted is that much sooner back to serve the
native protocol, and a client that reconnects to it recovers from history that much less: at 25
publications/s a 100-publication history covers 4 s. The stack is imported in a worker thread as soon
as the app has started; a request that arrives earlier waits for it, and nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("tsunagu.gateway.deferred")


class DeferredApp:
    """An ASGI app built by `build` (in a worker thread) on `warm()` or on its first request."""

    def __init__(self, name: str, build: Callable[[], ASGIApp]) -> None:
        self.name = name
        self._build = build
        self._app: ASGIApp | None = None
        self._lock = threading.Lock()
        self._building: asyncio.Future[ASGIApp] | None = None

    def _build_once(self) -> ASGIApp:
        with self._lock:
            if self._app is None:
                self._app = self._build()
                log.debug("%s is ready", self.name)
            return self._app

    def warm(self) -> asyncio.Future[ASGIApp]:
        """Start building in a worker thread (once); the future is the app."""
        if self._building is None:
            self._building = asyncio.get_running_loop().run_in_executor(None, self._build_once)
        return self._building

    async def app(self) -> ASGIApp:
        if self._app is not None:
            return self._app
        return await asyncio.shield(self.warm())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app if self._app is not None else await self.app()
        await app(scope, receive, send)
