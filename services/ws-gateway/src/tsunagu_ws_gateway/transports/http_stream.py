"""A long HTTP response as a transport: Server-Sent Events (`text/event-stream`, each frame one `data:`
event) or plain HTTP streaming (each frame one line of newline-delimited JSON).

The client's request is over before the stream starts (its body, if any, is the connect request); what
is left to read is only the end of the connection (`http.disconnect`), which is all `received` yields
on. `send` never blocks: frames join the queue and the stream is marked for the WebSocket transports'
flusher (websocket.py), whose callbacks write what is queued as one chunk straight to the socket
(server.py's `StreamSocket`, under uvicorn's httptools protocol: no task, no await, no ASGI `send`
per chunk), holding it while the socket does not take writes. The response's start and end go through
ASGI. Where the server offers no such socket, a writer task sends the chunks through ASGI instead.
Past `send_buffer_bytes` queued the client is cut off as slow (3008), as a WebSocket client is.
`close` queues the disconnect push (`{"disconnect": {...}}`, the only way a stream says why it ends;
not for a plain end, 3000, nor for a slow client) and ends the response after it.

SSE events of publications in recoverable channels carry an `id:` field: the connection's whole stream
position, `{"<channel>": {"offset": N, "epoch": "..."}, ...}` as JSON (no line breaks, so a valid event
id). A browser's EventSource sends the last one back as `Last-Event-ID` when it reconnects, and the
endpoint turns it into the connect request's recovery positions (protocols/uni.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.types import Message, Receive, Send

from tsunagu_ws_gateway.core.registry import DISCONNECTS
from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.uni_frames import Positioned, disconnect_push
from tsunagu_ws_gateway.transports.server import StreamSocket
from tsunagu_ws_gateway.transports.stream_encoding import GZIP_HEADERS, GzipStream
from tsunagu_ws_gateway.transports.websocket import flusher

log = logging.getLogger("tsunagu.gateway.http_stream")

# How long a closing stream may take to send what it has queued before it is dropped.
CLOSE_TIMEOUT = 5.0
# As Centrifugo's: no proxy buffering or caching of a stream.
_HEADERS = [
    (b"cache-control", b"private, no-cache, no-store, must-revalidate, max-age=0"),
    (b"pragma", b"no-cache"),
    (b"expires", b"0"),
    (b"x-accel-buffering", b"no"),
]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), *_HEADERS]
STREAM_HEADERS = [(b"content-type", b"application/x-ndjson"), *_HEADERS]


class HttpStreamTransport:
    __slots__ = (
        "client_closed",
        "closing",
        "drop",
        "encoder",
        "ended",
        "ender",
        "event_stream",
        "flusher",
        "headers",
        "limit",
        "marked",
        "name",
        "positions",
        "preamble",
        "queue",
        "queued_bytes",
        "receive",
        "send_message",
        "socket",
        "socket_of",
        "started",
        "wake",
        "writer",
    )

    def __init__(
        self,
        name: str,
        send: Send,
        receive: Receive,
        limit: int,
        *,
        event_stream: bool,
        headers: list[tuple[bytes, bytes]] | None = None,
        abort: Callable[[], None] | None = None,
        socket_of: Callable[[], StreamSocket | None] | None = None,
        encoder: GzipStream | None = None,
        retry_ms: int = 0,
    ) -> None:
        self.name = name
        # Drops the connection with what it buffered (a client that does not read; transports/server.py).
        self.drop = abort
        # The socket to write to once the response has started (None: through ASGI).
        self.socket_of = socket_of
        self.socket: StreamSocket | None = None
        self.marked = False
        self.flusher = flusher()
        self.ender: asyncio.Task[None] | None = None
        self.headers = [*(SSE_HEADERS if event_stream else STREAM_HEADERS), *(headers or [])]
        # gzip for a client that takes it (stream_encoding.py): every write goes through it.
        self.encoder = encoder
        if encoder is not None:
            self.headers += GZIP_HEADERS
        # (as Centrifugo: a first line, so the client sees the stream open before the first push; SSE: with
        # the reconnect delay an EventSource should wait, when one is set)
        self.preamble = b"\r\n" if event_stream else b""
        if event_stream and retry_ms:
            self.preamble += b"retry: %d\n\n" % retry_ms
        self.send_message = send
        self.receive = receive
        self.limit = limit
        self.event_stream = event_stream
        self.closing: codes.Disconnect | None = None
        # An HTTP stream ends the same way whether the client left on purpose or lost its link.
        self.client_closed = False
        self.queue: list[bytes] = []
        self.queued_bytes = 0
        self.wake = asyncio.Event()
        # Done when the response is over (ended by us, or the client went).
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writer: asyncio.Task[None] | None = None
        self.started = False
        # SSE: where the client stands in each recoverable channel (the events' ids); None: no ids.
        self.positions: dict[str, dict[str, Any]] | None = None

    def start(self) -> None:
        """Begin the response (200 and the stream's headers), then write as the socket lets us."""
        self.writer = asyncio.get_running_loop().create_task(self._write(), name=f"{self.name}-writer")

    def abort(self) -> None:
        if self.drop is not None:
            self.drop()

    # Transport

    def send(self, frame: bytes) -> None:
        if self.closing is not None:
            return
        self._queue(self._chunk(frame))

    def connected(self, frame: bytes, positions: dict[str, dict[str, Any]]) -> None:
        """The connect push, and the positions it leaves the client at (the first event id)."""
        if self.closing is not None:
            return
        if self.event_stream and positions:
            self.positions = positions
            self._queue(b"id: " + orjson.dumps(positions) + b"\ndata: " + frame + b"\n\n")
        else:
            self._queue(self._chunk(frame))

    def close(self, disconnect: codes.Disconnect) -> None:
        if self.closing is not None:
            return
        if disconnect is codes.SLOW:
            self.closing = disconnect
            DISCONNECTS.labels(str(disconnect.code)).inc()
            # A client that does not read: drop it and what is queued rather than wait for it.
            self.queue.clear()
            self.queued_bytes = 0
            self.abort()
            for task in (self.writer, self.ender):
                if task is not None:
                    task.cancel()
            if not self.ended.done():
                self.ended.set_result(None)
            return
        if disconnect.code != codes.CONNECTION_CLOSED.code:
            self._queue(self._chunk(self._disconnect_frame(disconnect)), bounded=False)
        self.closing = disconnect
        DISCONNECTS.labels(str(disconnect.code)).inc()
        self._ready()
        if self.writer is None and not self.ended.done():
            self.ended.set_result(None)

    # framing and queueing

    def _disconnect_frame(self, disconnect: codes.Disconnect) -> bytes:
        """The push that tells why the stream ends (the bidirectional emulation's is a reply's push)."""
        return disconnect_push(disconnect)

    def _chunk(self, frame: bytes) -> bytes:
        if not self.event_stream:
            return frame + b"\n"
        positions = self.positions
        if positions is not None and isinstance(frame, Positioned) and frame.offset:
            position = positions.get(frame.channel)
            if position is not None:
                position["offset"] = frame.offset
                return b"id: " + orjson.dumps(positions) + b"\ndata: " + frame + b"\n\n"
        return b"data: " + frame + b"\n\n"

    def _queue(self, chunk: bytes, *, bounded: bool = True) -> None:
        self.queue.append(chunk)
        self.queued_bytes += len(chunk)
        if bounded and self.queued_bytes > self.limit:
            self.close(codes.SLOW)
            return
        self._ready()

    def _ready(self) -> None:
        """Something to write (or the end): the flusher's when the socket is ours, else the writer's."""
        if self.socket is None:
            self.wake.set()
        elif not self.marked:
            self.marked = True
            self.flusher.add(self)

    def flush(self) -> None:
        """The flusher's callback: what is queued as one chunk, unless the socket holds writes (then
        `_resumed` brings the stream back); the end once all is written."""
        self.marked = False
        socket = self.socket
        if socket is None:
            return
        if self.queue:
            if socket.paused:
                return
            chunk = b"".join(self.queue) if len(self.queue) > 1 else self.queue[0]
            self.queue = []
            self.queued_bytes = 0
            socket.write(self._encoded(chunk))
        if self.closing is not None and self.ender is None and not self.ended.done():
            self.ender = asyncio.get_running_loop().create_task(self._end(), name=f"{self.name}-end")

    def _resumed(self) -> None:
        if self.queue or self.closing is not None:
            self._ready()

    async def _end(self) -> None:
        try:
            await self.send_message({"type": "http.response.body", "body": self._tail(), "more_body": False})
        except Exception as exc:  # the client went
            log.debug("%s stream ended: %r", self.name, exc)
        finally:
            if not self.ended.done():
                self.ended.set_result(None)

    async def _write(self) -> None:
        send = self.send_message
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            self.started = True
            await send({"type": "http.response.body", "body": self._encoded(self.preamble), "more_body": True})
            socket = self.socket_of() if self.socket_of is not None else None
            if socket is not None and self.closing is not codes.SLOW:
                # From here the flusher writes; this task is done.
                socket.on_resume = self._resumed
                self.socket = socket
                if self.queue or self.closing is not None:
                    self._ready()
                return
            while True:
                if not self.queue:
                    if self.closing is not None:
                        break
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                chunk = b"".join(self.queue) if len(self.queue) > 1 else self.queue[0]
                self.queue = []
                self.queued_bytes = 0
                await send({"type": "http.response.body", "body": self._encoded(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": self._tail(), "more_body": False})
        except asyncio.CancelledError:
            pass  # slow, or the stream's time to close was up: the server drops the connection
        except Exception as exc:  # the client went (uvicorn's ClientDisconnected is an OSError)
            log.debug("%s stream ended: %r", self.name, exc)
            if self.closing is None:
                self.closing = codes.CONNECTION_CLOSED
        finally:
            if self.socket is None and not self.ended.done():
                self.ended.set_result(None)

    def _encoded(self, chunk: bytes) -> bytes:
        return chunk if self.encoder is None else self.encoder.encode(chunk)

    def _tail(self) -> bytes:
        """The response's last bytes: nothing, or the end of its gzip member."""
        return b"" if self.encoder is None else self.encoder.finish()

    # reading

    async def received(self) -> AsyncIterator[bytes | str]:
        """Nothing: the client has said all it says; this ends when it goes or the stream ends."""
        receiving: asyncio.Future[Message] = asyncio.ensure_future(self.receive())
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {receiving, self.ended}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if self.ended.done() or receiving.result()["type"] == "http.disconnect":
                    return
                receiving = asyncio.ensure_future(self.receive())
        finally:
            receiving.cancel()
        yield b""  # pragma: no cover (makes this an async generator that yields no frame)

    async def finish(self) -> None:
        """After the loop: let what is queued go out and the response end, for a bounded time."""
        if self.closing is None:
            self.close(codes.CONNECTION_CLOSED)
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), CLOSE_TIMEOUT)
        except TimeoutError:
            self.abort()
            for task in (self.writer, self.ender):
                if task is not None:
                    task.cancel()
        for task in (self.writer, self.ender):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def __repr__(self) -> str:
        return f"<{self.name} transport, {len(self.queue)} queued>"
