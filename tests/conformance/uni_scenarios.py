"""The unidirectional transports (uni_http_stream, uni_sse, uni_websocket) scripted alike against any server
that speaks them: what a client without an SDK reads, as a transcript (scenarios.py's normalisation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed

from .scenarios import SETTLE_SECONDS, Peer, Transcript, api, token

TRANSPORTS = ("uni_http_stream", "uni_sse", "uni_websocket")


class Reader:
    """One unidirectional connection: its pushes (pings left out) as they arrive, and how it ended."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.status = 0
        self.ended = False

    @classmethod
    async def open(cls, peer: Peer, transport: str, request: Any) -> Reader:
        reader = cls()
        started = asyncio.get_running_loop().create_future()
        reader.task = asyncio.create_task(reader._read(peer, transport, request, started))
        await asyncio.wait_for(started, 10)
        return reader

    async def _read(self, peer: Peer, transport: str, request: Any, started: asyncio.Future[None]) -> None:
        base = peer.api_url.removesuffix("/api")
        try:
            if transport == "uni_websocket":
                async with websockets.connect(base.replace("http", "ws", 1) + "/connection/uni_websocket") as ws:
                    await ws.send(request if isinstance(request, str) else json.dumps(request))
                    started.set_result(None)
                    try:
                        async for message in ws:
                            self._line(str(message))
                    except ConnectionClosed:
                        pass
                    code = ws.close_code
                    self.queue.put_nowait({"closed": code})
                return
            url = f"{base}/connection/{transport}"
            async with httpx.AsyncClient(timeout=None) as http:
                if transport == "uni_sse":
                    raw = request if isinstance(request, str) else json.dumps(request)
                    opened = http.stream("GET", url, params={"cf_connect": raw})
                else:
                    body = request.encode() if isinstance(request, str) else json.dumps(request).encode()
                    opened = http.stream("POST", url, content=body)
                async with opened as response:
                    self.status = response.status_code
                    started.set_result(None)
                    async for line in response.aiter_lines():
                        if transport == "uni_sse":
                            if not line.startswith("data: "):
                                continue  # (event ids: ours only, docs/protocol.md)
                            line = line[len("data: ") :]
                        self._line(line)
        finally:
            self.ended = True
            if not started.done():
                started.set_result(None)
            self.queue.put_nowait({"ended": True})

    def _line(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip() and json.loads(line) != {}:
                self.queue.put_nowait(json.loads(line))

    async def pushes(self, wanted: int, settle: float = SETTLE_SECONDS) -> list[Any]:
        got: list[Any] = []
        async with asyncio.timeout(10):
            while len(got) < wanted:
                got.append(await self.queue.get())
        with contextlib.suppress(TimeoutError):
            while not (got and "ended" in got[-1]):
                got.append(await asyncio.wait_for(self.queue.get(), settle))
        return got

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def unidirectional(peer: Peer, run: str, out: Transcript, transport: str) -> None:
    channel = f"{run}-{transport}"  # no namespace: history kept, recovery forced
    follows = token("uni", subs={channel: {}})
    reader = await Reader.open(peer, transport, {"token": follows})
    (connect,) = await reader.pushes(1)
    epoch = connect["connect"]["subs"][channel]["epoch"]
    out.add("connect", [connect])
    for n in range(2):
        out.add(f"api publish {n}", await api(peer, "publish", {"channel": channel, "data": {"n": n}}))
    out.add("publications", await reader.pushes(2))
    await reader.close()
    for n in range(2, 4):
        out.add(f"api publish {n} while away", await api(peer, "publish", {"channel": channel, "data": {"n": n}}))
    position = {"recover": True, "offset": 2, "epoch": epoch}
    reader = await Reader.open(peer, transport, {"token": follows, "subs": {channel: position}})
    out.add("reconnect with its position", await reader.pushes(1))
    await reader.close()
    lost = {"recover": True, "offset": 1, "epoch": "another-epoch"}
    reader = await Reader.open(peer, transport, {"token": follows, "subs": {channel: lost}})
    out.add("reconnect with a position of another epoch", await reader.pushes(1))
    out.add("disconnect", await api(peer, "disconnect", {"user": "uni"}))
    out.add("disconnected", await reader.pushes(2, settle=1.0))
    out.add("status", reader.status)
    await reader.close()
    for step, request in (
        ("bad token", {"token": "not-a-jwt"}),
        ("expired token", {"token": token("uni", ttl=-3600)}),
        ("no token", {}),
        ("malformed JSON", "{not json"),
    ):
        reader = await Reader.open(peer, transport, request)
        pushes = await reader.pushes(1, settle=1.0)
        out.add(step, {"status": reader.status, "pushes": pushes})
        await reader.close()
