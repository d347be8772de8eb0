"""The one socket loop: every protocol's connection is read, bounded and closed here.

    frame in -> size check -> the protocol's `on_frame` (decode, dispatch to its session, replies out
    through the session's sink) -> ... -> the protocol's `on_close` -> the registry forgets the socket

A protocol plugs in as a `Handler`; a transport (transports/) provides the frames and the `Transport`
the replies go to. The close codes are the same for all: a frame over the protocol's limit closes with
1009, a client that broke its protocol with the code of its ProtocolError, a bug of ours with 3004, a
slow client with 3008 (by the transport), the end of the socket with 3000.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

from tsunagu_ws_gateway.core.registry import Registry
from tsunagu_ws_gateway.core.transport import Connection
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import Disconnect, ProtocolError

log = logging.getLogger("tsunagu.gateway.loop")


class Handler(Protocol):
    """What a protocol (protocols/) gives the loop for one connection."""

    # The largest frame it takes; larger closes with 1009.
    max_frame_bytes: int

    async def on_open(self) -> None:
        """The socket is accepted (a protocol that knows its credential at the handshake admits here)."""
        ...

    async def on_frame(self, frame: bytes | str) -> None:
        """One frame: decode it, hand its commands to the session, let the replies go out.
        Raises ProtocolError to close the connection with its code."""
        ...

    def on_too_large(self, size: int) -> None:
        """Tell the client why before the loop closes it with 1009 (a protocol that can say so)."""
        ...

    async def on_close(self, disconnect: Disconnect) -> None:
        """The connection ends (whoever ended it): forget its sessions."""
        ...


async def serve(
    connection: Connection, handler: Handler, frames: AsyncIterator[bytes | str], registry: Registry
) -> None:
    """Run one connection until its socket ends; the transport is closing when this returns."""
    transport = connection.transport
    try:
        await _guarded(connection, handler.on_open())
        if transport.closing is None:
            limit = handler.max_frame_bytes
            async for frame in frames:
                if len(frame) > limit:
                    handler.on_too_large(len(frame))
                    transport.close(codes.MESSAGE_SIZE_LIMIT)
                    break
                await _guarded(connection, handler.on_frame(frame))
                if transport.closing is not None:
                    break
    except asyncio.CancelledError:
        # The transport cancels a reader stuck behind a slow client; anything else is the server's.
        if transport.closing is not codes.SLOW:
            raise
    finally:
        ended = transport.closing or codes.CONNECTION_CLOSED
        try:
            await handler.on_close(ended)
        finally:
            registry.close(connection)
            if transport.closing is None:
                transport.close(codes.CONNECTION_CLOSED)


async def _guarded(connection: Connection, step: Awaitable[None]) -> None:
    try:
        await step
    except ProtocolError as exc:
        log.info("closing %r: %s (%s)", connection, exc.disconnect.reason, exc)
        connection.close(exc.disconnect)
    except Exception:
        log.exception("closing %r after an error of ours", connection)
        connection.close(codes.SERVER_ERROR)
