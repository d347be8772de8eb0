"""Scripted client sessions in the Centrifugo client protocol (JSON), run against any server that speaks
it, each returning a transcript: what the server answered to every step, normalised so that two servers
can be compared field by field.

Normalising replaces what is legitimately different on every run (client ids, epochs, node names,
versions, token TTLs) by placeholders numbered in order of appearance: two transcripts still differ when
one server reuses an id where the other gives a new one. Error messages are cut to the meaning before the
first `:` (we append a detail after it; docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import websockets
from websockets.exceptions import ConnectionClosed

SECRET = "conformance-secret-long-enough-for-hs256"
API_KEY = "conformance-api-key"
VOLATILE = {"client", "version", "node", "epoch", "session", "uid", "name"}
# How long a step waits for frames that may come (pushes) before it records what it has.
SETTLE_SECONDS = 0.3
# Subscriptions one connection may hold, configured alike on both servers.
CHANNEL_LIMIT = 8


@dataclass(frozen=True)
class Peer:
    """A server under test: where its client protocol and server API answer."""

    name: str
    ws_url: str
    api_url: str
    api_key: str = API_KEY


def token(user: str, ttl: float = 600, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": user, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


@dataclass
class Transcript:
    steps: list[tuple[str, Any]] = field(default_factory=list)
    _placeholders: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, step: str, value: Any) -> None:
        self.steps.append((step, self._normalise(value)))

    def _placeholder(self, kind: str, value: str) -> str:
        slot = (kind, value)
        if slot not in self._placeholders:
            count = sum(1 for k, _ in self._placeholders if k == kind)
            self._placeholders[slot] = f"<{kind}{count + 1}>"
        return self._placeholders[slot]

    def _normalise(self, value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            if key == "presence":  # keyed by client id
                return {self._placeholder("client", k): self._normalise(v, k) for k, v in sorted(value.items())}
            out = {k: self._normalise(v, k) for k, v in value.items()}
            if isinstance(out.get("message"), str) and "code" in out:
                out["message"] = out["message"].split(":", 1)[0]
            return out
        if isinstance(value, list):
            return [self._normalise(v, key) for v in value]
        if key in VOLATILE and isinstance(value, str) and value:
            return self._placeholder(key, value)
        if key == "ttl" and isinstance(value, int):
            return "<ttl>"
        return value


class Connection:
    """One raw WebSocket connection speaking newline-delimited JSON commands."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1

    @classmethod
    async def open(cls, peer: Peer) -> Connection:
        return cls(await websockets.connect(peer.ws_url, max_size=2**24))

    async def send(self, *commands: dict[str, Any]) -> list[int]:
        ids = []
        lines = []
        for command in commands:
            if "id" not in command:
                command = {"id": self.next_id, **command}
                self.next_id += 1
            ids.append(command["id"])
            lines.append(json.dumps(command))
        await self.ws.send("\n".join(lines))
        return ids

    async def frames(self, wanted: int = 0, settle: float = SETTLE_SECONDS, timeout: float = 10.0) -> list[Any]:
        """Frames until `wanted` replies with an id arrived, then whatever else comes within `settle` s.
        Server pings (`{}`) are answered and left out; a close is recorded as {"closed": [code, reason]}."""
        got: list[Any] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            replies = sum(1 for frame in got if isinstance(frame, dict) and frame.get("id"))
            remaining = deadline - asyncio.get_running_loop().time()
            wait = settle if replies >= wanted else remaining
            if wait <= 0:
                return got
            try:
                message = await asyncio.wait_for(self.ws.recv(), wait)
            except TimeoutError:
                if replies >= wanted:
                    return got
                raise AssertionError(f"{wanted} replies expected, got {got}") from None
            except ConnectionClosed as closed:
                code, reason = (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (None, "")
                got.append({"closed": [code, reason]})
                return got
            for line in str(message).splitlines():
                if not line.strip():
                    continue
                frame = json.loads(line)
                if frame == {}:
                    await self.ws.send("{}")
                    continue
                got.append(frame)

    async def call(self, transcript: Transcript, step: str, *commands: dict[str, Any]) -> list[Any]:
        await self.send(*commands)
        frames = await self.frames(wanted=len(commands))
        transcript.add(step, sorted_frames(frames))
        return frames

    async def close(self) -> None:
        await self.ws.close()


def sorted_frames(frames: list[Any]) -> list[Any]:
    """Replies in id order, then pushes in arrival order (two servers may interleave them differently)."""
    replies = sorted((f for f in frames if isinstance(f, dict) and f.get("id")), key=lambda f: f["id"])
    return replies + [f for f in frames if not (isinstance(f, dict) and f.get("id"))]


async def connected(peer: Peer, transcript: Transcript, user: str = "ann", **claims: Any) -> Connection:
    conn = await Connection.open(peer)
    await conn.call(transcript, "connect", {"connect": {"token": token(user, **claims), "name": "conformance"}})
    return conn


async def api(peer: Peer, method: str, body: dict[str, Any]) -> Any:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{peer.api_url}/{method}", headers={"X-API-Key": peer.api_key}, json=body)
    return {"status": response.status_code, **response.json()}


# The scenarios: each takes a peer and a unique channel suffix, and fills a transcript.


async def connect_and_errors_at_connect(peer: Peer, run: str, out: Transcript) -> None:
    conn = await connected(peer, out)
    await conn.close()
    for step, connect in (
        ("connect with a bad token", {"token": "not-a-jwt"}),
        ("connect with an expired token", {"token": token("ann", ttl=-3600)}),
        ("connect with no token", {}),
    ):
        conn = await Connection.open(peer)
        await conn.send({"connect": connect})
        out.add(step, await conn.frames(wanted=1, settle=1.0))
        await conn.close()
    conn = await Connection.open(peer)
    await conn.send({"subscribe": {"channel": f"chat:{run}"}})
    out.add("subscribe before connect", await conn.frames(wanted=1, settle=1.0))
    conn = await Connection.open(peer)
    await conn.ws.send("{not json")
    out.add("malformed JSON", await conn.frames(wanted=1, settle=1.0))


async def subscribe_publish_history_presence(peer: Peer, run: str, out: Transcript) -> None:
    channel = f"chat:{run}"
    ann = await connected(peer, out, "ann")
    await ann.call(out, "subscribe with join/leave", {"subscribe": {"channel": channel, "join_leave": True}})
    bob = await connected(peer, out, "bob")
    await bob.call(out, "bob subscribes", {"subscribe": {"channel": channel}})
    out.add("ann sees bob join", await ann.frames())
    await bob.call(out, "bob publishes", {"publish": {"channel": channel, "data": {"text": "hi"}}})
    out.add("ann receives", await ann.frames())
    await ann.call(out, "history", {"history": {"channel": channel, "limit": 10}})
    reverse = {"channel": channel, "limit": 5, "reverse": True}
    await ann.call(out, "history, newest first", {"history": reverse})
    await ann.call(out, "presence_stats", {"presence_stats": {"channel": channel}})
    await ann.call(out, "presence", {"presence": {"channel": channel}})
    await bob.call(out, "bob unsubscribes", {"unsubscribe": {"channel": channel}})
    out.add("ann sees bob leave", await ann.frames())
    await ann.close()
    await bob.close()


async def recovery(peer: Peer, run: str, out: Transcript) -> None:
    channel = f"chat:{run}-recover"
    ann = await connected(peer, out)
    first = await ann.call(out, "subscribe recoverable", {"subscribe": {"channel": channel, "recover": False}})
    epoch = first[0]["subscribe"]["epoch"]
    for n in range(3):
        out.add(f"api publish {n}", await api(peer, "publish", {"channel": channel, "data": {"n": n}}))
    out.add("pushes", await ann.frames())
    await ann.close()
    for n in range(3, 5):
        out.add(f"api publish {n} while away", await api(peer, "publish", {"channel": channel, "data": {"n": n}}))
    ann = await connected(peer, out)
    request = {"channel": channel, "recover": True, "offset": 3, "epoch": epoch}
    await ann.call(out, "resubscribe with recovery", {"subscribe": request})
    await ann.close()
    ann = await connected(peer, out)
    request = {"channel": channel, "recover": True, "offset": 1, "epoch": "another-epoch"}
    await ann.call(out, "recovery from another epoch", {"subscribe": request})
    await ann.close()


async def command_errors(peer: Peer, run: str, out: Transcript) -> None:
    ann = await connected(peer, out)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("subscribe to an unknown namespace", {"subscribe": {"channel": f"nowhere:{run}"}}),
        ("subscribe where clients may not", {"subscribe": {"channel": f"secret:{run}"}}),
        ("subscribe", {"subscribe": {"channel": f"chat:{run}-twice"}}),
        ("subscribe twice", {"subscribe": {"channel": f"chat:{run}-twice"}}),
        ("publish where clients may not", {"publish": {"channel": f"readonly:{run}", "data": {}}}),
        ("history where none is kept", {"history": {"channel": f"nohistory:{run}"}}),
        ("presence where it is off", {"presence": {"channel": f"nohistory:{run}"}}),
        ("rpc with no backend", {"rpc": {"method": "nothing.here", "data": {}}}),
        ("unsubscribe from what is not subscribed", {"unsubscribe": {"channel": f"chat:{run}-never"}}),
        ("ping", {"ping": {}}),
    ]
    for step, command in steps:
        await ann.call(out, step, command)
    await ann.close()
    ann = await connected(peer, out)
    for n in range(CHANNEL_LIMIT + 1):  # the last one is over the limit
        await ann.call(out, f"subscription {n + 1}", {"subscribe": {"channel": f"lim{run}-{n}"}})
    await ann.close()


async def refresh_and_expiry(peer: Peer, run: str, out: Transcript) -> None:
    ann = await connected(peer, out, ttl=120)
    await ann.call(out, "refresh", {"refresh": {"token": token("ann", ttl=300)}})
    await ann.call(out, "refresh for another user", {"refresh": {"token": token("bob", ttl=300)}})
    out.add("after a refresh for another user", await ann.frames(settle=1.0))


async def server_api(peer: Peer, run: str, out: Transcript) -> None:
    channel = f"chat:{run}-api"
    ann = await connected(peer, out, "ann")
    await ann.call(out, "subscribe", {"subscribe": {"channel": channel}})
    out.add("publish", await api(peer, "publish", {"channel": channel, "data": {"x": 1}}))
    out.add("publication", await ann.frames())
    out.add("broadcast", await api(peer, "broadcast", {"channels": [channel, f"chat:{run}-other"], "data": {"x": 2}}))
    out.add("broadcast arrives", await ann.frames())
    out.add("history", await api(peer, "history", {"channel": channel, "limit": 10}))
    out.add("presence_stats", await api(peer, "presence_stats", {"channel": channel}))
    out.add("publish to an unknown namespace", await api(peer, "publish", {"channel": f"nowhere:{run}", "data": {}}))
    out.add("history_remove", await api(peer, "history_remove", {"channel": channel}))
    out.add("history after remove", await api(peer, "history", {"channel": channel, "limit": 10}))
    out.add("disconnect ann", await api(peer, "disconnect", {"user": "ann"}))
    out.add("ann is disconnected", await ann.frames(wanted=1, settle=1.0))


async def server_side_subscriptions(peer: Peer, run: str, out: Transcript) -> None:
    channel = f"{run}-server-side"
    ann = await connected(peer, out, "ann", subs={channel: {}})
    out.add("api publish", await api(peer, "publish", {"channel": channel, "data": {"n": 0}}))
    out.add("publication", await ann.frames())
    await ann.close()


SCENARIOS: dict[str, Callable[[Peer, str, Transcript], Awaitable[None]]] = {
    "connect": connect_and_errors_at_connect,
    "subscribe, publish, history, presence": subscribe_publish_history_presence,
    "recovery": recovery,
    "command errors": command_errors,
    "refresh": refresh_and_expiry,
    "server API": server_api,
    "server-side subscriptions": server_side_subscriptions,
}
