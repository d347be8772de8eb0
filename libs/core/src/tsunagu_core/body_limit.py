"""A cap on HTTP request bodies, enforced while they arrive: a larger body is answered 413 and never
held in memory, whether it declares its length or comes chunked."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# After a 413, up to this many times the cap (at most DRAIN_MAX bytes, DRAIN_SECONDS) of the rest is read
# and dropped, so a client that reads only once it has sent everything still gets the answer; past that
# the connection is closed.
DRAIN_FACTOR = 4
DRAIN_MAX = 8 * 1024 * 1024
DRAIN_SECONDS = 5.0


class BodyTooLarge(Exception):
    """Raised into the application when the body passes the cap (the client has its 413 by then)."""


def default_error(limit: int) -> dict[str, Any]:
    return {"error": "payload_too_large", "message": f"the request body is larger than {limit} bytes"}


class BodyLimit:
    """ASGI middleware answering 413 for a request body over `limit` bytes.

    A `Content-Length` over the cap is refused before the body is read. A body without one (chunked)
    is counted as it arrives: the first chunk over the cap gets the 413 sent, and the application's
    read fails with BodyTooLarge; whatever the application sends after that is dropped. Nothing of
    the body is kept: what follows a 413 is read and dropped up to a bound, then the connection ends."""

    def __init__(self, app: ASGIApp, *, limit: int, error: Callable[[int], dict[str, Any]] = default_error) -> None:
        self.app = app
        self.limit = limit
        self.error = error

    async def _refuse(self, send: Send, receive: Receive, unread: int) -> None:
        """The 413, sent at once; the rest of the body (`unread` bytes, -1: unknown) is read and dropped
        before the answer ends when it is within the drain bound, so the client's sending completes."""
        body = json.dumps(self.error(self.limit)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        budget = min(DRAIN_MAX, DRAIN_FACTOR * self.limit)
        if unread <= budget:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    while budget > 0:
                        message = await receive()
                        if message["type"] != "http.request" or not message.get("more_body", False):
                            break
                        budget -= len(message.get("body", b""))
        await send({"type": "http.response.body", "body": b""})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await self._refuse(send, receive, declared)
                    return
        received = 0
        started = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if not started and not refused:
                        refused = True
                        await self._refuse(send, receive, -1 if message.get("more_body", False) else 0)
                    raise BodyTooLarge(f"request body over {self.limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception as exc:
            # The application failed on the body it could not read (BodyTooLarge, or what it made of it,
            # e.g. FastAPI's "error parsing the body"): the client has its 413 already.
            if not refused and not isinstance(exc, BodyTooLarge):
                raise
