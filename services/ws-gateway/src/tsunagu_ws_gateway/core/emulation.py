"""Where an emulation request's commands go: the emulated session they name, on whichever node holds it.

An emulated connection (`/connection/http_stream`, `/connection/sse`) is a long response on one gateway
replica; its client's commands come as separate `POST /emulation` requests, which a load balancer may
send to any replica. The connect reply names the session (a random id of this connection) and the node
(this replica's id, `Node.id`), and every emulation request carries both back:

- the node is this one: the commands join the session's stream of frames (the socket loop reads them
  as it reads a WebSocket's) and the request is answered 204;
- another node: the request is forwarded over the broker to that node's own channel
  (`__tsunagu:emulation:<node id>`, which only that node subscribes to, as Centrifugo's surveys go to
  one node), which hands the commands to its session and answers on the asking node's channel with the
  status the request gets (204, 404 no such session, 429 too many commands waiting, 400 the wrong
  protocol). No answer within `ANSWER_WAIT`: 404 when no node of that id has been heard of (heartbeats,
  hub.py), else 504.

A broker message is a JSON header line, `\\n`, then the commands as the client sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client import Counter
from tsunagu_core.broker import BrokerError, Publication, PublishOptions

from tsunagu_ws_gateway.hub import Node

log = logging.getLogger("tsunagu.gateway.emulation")

EMULATION_PREFIX = "__tsunagu:emulation:"
# How long an emulation request for another node waits for that node's answer.
ANSWER_WAIT = 3.0
SUBSCRIBE_RETRY = 1.0
EMULATION_REQUESTS = Counter(
    "tsunagu_gateway_emulation_requests_total",
    "Emulation requests by where their session was (local, forwarded) and the status they got",
    ["route", "status"],
)


class Emulated(Protocol):
    """An emulated connection's transport as the router needs it (transports/emulation.py)."""

    binary: bool

    @property
    def closing(self) -> Any: ...

    def push(self, frame: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    detail: str = ""


DELIVERED = Outcome(204)


def channel_of(node_id: str) -> str:
    return EMULATION_PREFIX + node_id


class EmulationRouter:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.channel = channel_of(node.id)
        self.streams: dict[str, Emulated] = {}
        self._waiting: dict[int, asyncio.Future[Outcome]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscribing: asyncio.Task[None] | None = None
        node.claim(EMULATION_PREFIX, self)

    # lifecycle

    async def start(self) -> None:
        self._subscribing = asyncio.create_task(self._subscribe(), name="emulation-subscribe")

    async def stop(self) -> None:
        tasks = [t for t in (self._subscribing, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_result(Outcome(503, "the gateway is shutting down"))

    async def _subscribe(self) -> None:
        # Retried: the broker may not be reachable yet when the gateway starts.
        while True:
            try:
                await self.node.broker.subscribe(self.channel)
                return
            except Exception as exc:
                log.warning("emulation channel not subscribed yet (%s): retrying", exc)
                await asyncio.sleep(SUBSCRIBE_RETRY)

    # this node's emulated sessions

    def open(self, stream: Emulated) -> str:
        session = str(uuid.uuid4())
        self.streams[session] = stream
        return session

    def close(self, session: str) -> None:
        self.streams.pop(session, None)

    def local(self, session: str, data: bytes, binary: bool) -> Outcome:
        stream = self.streams.get(session)
        if stream is None or stream.closing is not None:
            return Outcome(404, f"no session {session!r} on this gateway node (it ended, or never was)")
        if stream.binary != binary:
            speaks = "protobuf" if stream.binary else "JSON"
            return Outcome(400, f"session {session!r} speaks {speaks}: send its commands as {speaks}")
        if not stream.push(data):
            if stream.closing is not None:
                return Outcome(404, f"session {session!r} is closing")
            return Outcome(429, f"session {session!r} has too many commands waiting: slow down")
        return DELIVERED

    # any node's

    async def deliver(self, node: str, session: str, data: bytes, binary: bool) -> Outcome:
        if node == self.node.id:
            outcome = self.local(session, data, binary)
            EMULATION_REQUESTS.labels("local", str(outcome.status)).inc()
            return outcome
        outcome = await self._forward(node, session, data, binary)
        EMULATION_REQUESTS.labels("forwarded", str(outcome.status)).inc()
        return outcome

    async def _forward(self, node: str, session: str, data: bytes, binary: bool) -> Outcome:
        request_id = next(self._ids)
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        header = {"op": "command", "id": request_id, "from": self.node.id, "session": session, "binary": binary}
        try:
            await self.node.broker.publish(channel_of(node), orjson.dumps(header) + b"\n" + data, PublishOptions())
            return await asyncio.wait_for(answer, ANSWER_WAIT)
        except BrokerError as exc:
            log.warning("an emulation request for node %s was not forwarded: %s", node, exc)
            return Outcome(503, "the broker is unavailable: retry")
        except TimeoutError:
            if node not in self.node.nodes:
                return Outcome(404, f"no gateway node {node!r}")
            return Outcome(504, f"gateway node {node!r} did not answer in {ANSWER_WAIT:g} s")
        finally:
            self._waiting.pop(request_id, None)

    # the broker's side (a ChannelOwner of hub.py)

    async def on_publication(self, channel: str, publication: Publication) -> None:
        if channel != self.channel:
            return
        header_line, _, data = publication.data.partition(b"\n")
        try:
            header = orjson.loads(header_line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(header, dict):
            return
        if header.get("op") == "command":
            outcome = self.local(str(header.get("session", "")), data, bool(header.get("binary")))
            answer = {"op": "answer", "id": header.get("id"), "status": outcome.status, "detail": outcome.detail}
            # Not awaited here: this runs in the broker's delivery loop, which every channel shares.
            self._run(self._answer(str(header.get("from", "")), answer))
        elif header.get("op") == "answer":
            waiting = self._waiting.get(header.get("id", 0))
            if waiting is not None and not waiting.done():
                waiting.set_result(Outcome(int(header.get("status", 500)), str(header.get("detail", ""))))

    async def on_resubscribed(self) -> None:
        return  # a request lost while the link was down timed out (504); nothing to catch up

    async def _answer(self, node: str, answer: dict[str, Any]) -> None:
        if node:
            await self.node.broker.publish(channel_of(node), orjson.dumps(answer), PublishOptions())

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="emulation-answer")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("an emulation answer was not sent: %r", task.exception())
