"""A reconnect storm for tests and benchmarks (test dependencies: websockets, httpx, PyJWT).

Thousands of subscribers of recoverable channels, each a light client of the native JSON protocol
(the Centrifugo client protocol, as the stock SDKs speak it: connect and subscribe in one frame,
`recover` with the last offset and epoch, `{}` answered to pings), many to a process: `python -m
tsunagu_core.testing_storm` is one such process (a worker), driven over its stdin and stdout by `Storm`.

A client behaves as a stock SDK behind a Kubernetes Service: when its socket ends it waits the SDK's
full-jitter backoff (`min + U(0, min(max, min * 2^attempt))`) and connects to the first of its
gateways that accepts a TCP connection; a close code of 3500-3999 or 4500-4999 ends it (the SDKs do not
reconnect then). Every publication's data is `{"n": sequence, "t": publish time}`: a client counts what
it lost, got twice or out of order, and (while it has never been disconnected) publish -> deliver latency.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import websockets

WORKER = "tsunagu_core.testing_storm"


@dataclass
class StormClient:
    user: str
    channel: str
    urls: list[str]
    token: str
    min_delay: float = 0.5
    max_delay: float = 10.0
    # Where it stands in the channel's stream (what it sends with `recover`).
    offset: int = 0
    epoch: str = ""
    received: list[int] = field(default_factory=list)
    # (n, offset, live) of each publication, in arrival order: what a failing test shows
    trace: list[tuple[int, int, bool]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    connects: int = 0
    shed: int = 0
    disconnects: list[float] = field(default_factory=list)
    # (time, recovered, was_recovering) of each successful subscribe
    subscribed: list[tuple[float, bool, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fatal: int | None = None
    live: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    latencies: array.array[float] | None = None

    @property
    def home(self) -> str:
        return self.urls[0]

    def complete(self, count: int) -> bool:
        return len(self.seen) >= count and sum(1 for n in self.seen if 0 <= n < count) == count

    def summary(self, count: int) -> dict[str, Any]:
        got = [n for n in self.received if n < count]
        unique = set(got)
        out_of_order = sum(1 for a, b in itertools.pairwise(got) if b <= a)
        return {
            "user": self.user,
            "channel": self.channel,
            "home": self.home,
            "received": len(self.received),
            "lost": count - len(unique),
            "duplicated": len(got) - len(unique),
            "out_of_order": out_of_order,
            "connects": self.connects,
            "shed": self.shed,
            "disconnects": self.disconnects,
            "subscribed": self.subscribed,
            "errors": self.errors[-5:],
            "fatal": self.fatal,
            # Only for a client that saw something wrong: what it got around the first wrong one.
            "trace": self._around_trouble(count) if len(got) != len(unique) or out_of_order else [],
        }

    def _around_trouble(self, count: int) -> list[tuple[int, int, bool]]:
        seen: set[int] = set()
        for index, (n, _, _) in enumerate(self.trace):
            if n in seen or (seen and n <= max(seen)):
                return self.trace[max(0, index - 6) : index + 3]
            seen.add(n)
        return []

    async def run(self, opening: asyncio.Semaphore) -> None:
        attempt = 0
        while self.fatal is None:
            self.live = False
            try:
                async with opening:
                    ws = await self._open()
                self.connects += 1
                async with ws:
                    await self._session(ws)
                code, reason = ws.close_code, ws.close_reason or ""
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
                code, reason = None, f"{type(exc).__name__}: {exc}"
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
                reason = closed.rcvd.reason if closed.rcvd else str(closed)
            if code == 3013:
                self.shed += 1
            elif code is not None and (3500 <= code < 4000 or 4500 <= code < 5000):
                self.fatal = code
                self.errors.append(f"closed {code} {reason}")
                self.ready.set()
                return
            elif reason:
                self.errors.append(f"{code} {reason}"[:200])
            if self.live:  # the socket had a subscription: the client lost it
                self.disconnects.append(time.time())
                attempt = 0
            delay = min(
                self.max_delay, self.min_delay + random.uniform(0, min(self.max_delay, self.min_delay * 2**attempt))
            )
            attempt = min(attempt + 1, 31)
            await asyncio.sleep(delay)

    async def _open(self) -> websockets.ClientConnection:
        """The first gateway that takes the TCP connection, as a Service sends a new connection to a live pod."""
        failure: Exception = OSError("no gateway")
        for url in self.urls:
            try:
                return await websockets.connect(
                    url, open_timeout=20, ping_interval=None, max_queue=None, compression=None
                )
            except OSError as exc:
                failure = exc
        raise failure

    def _subscribe(self, command_id: int) -> str:
        params: dict[str, Any] = {"channel": self.channel, "recoverable": True, "positioned": True}
        if self.epoch:
            params.update(recover=True, offset=self.offset, epoch=self.epoch)
        return json.dumps({"id": command_id, "subscribe": params})

    async def _session(self, ws: websockets.ClientConnection) -> None:
        """Until the socket ends; `live` once the subscription is made on it."""
        next_id = 3
        await ws.send(
            json.dumps({"id": 1, "connect": {"token": self.token, "name": "storm"}}) + "\n" + self._subscribe(2)
        )
        async for message in ws:
            text = message if isinstance(message, str) else message.decode()
            for line in text.split("\n"):
                if not line:
                    continue
                if line == "{}":
                    await ws.send("{}")
                    continue
                reply = json.loads(line)
                if "push" in reply:
                    push = reply["push"]
                    if "pub" in push and push.get("channel") == self.channel:
                        self._publication(push["pub"], live=True)
                    elif "unsubscribe" in push and push.get("channel") == self.channel:
                        if push["unsubscribe"].get("code", 0) >= 2500:
                            await ws.send(self._subscribe(next_id))
                            next_id += 1
                        else:
                            self.errors.append(f"unsubscribed {push['unsubscribe']}")
                    continue
                if "error" in reply:
                    self.errors.append(f"reply {reply.get('id')}: {reply['error']}")
                    if reply.get("id") == 1:
                        await ws.close()
                    continue
                if "subscribe" in reply:
                    result = reply["subscribe"]
                    for pub in result.get("publications", []):
                        self._publication(pub, live=False)
                    self.epoch = result.get("epoch", self.epoch)
                    self.offset = max(self.offset, int(result.get("offset", 0)))
                    self.subscribed.append(
                        (time.time(), bool(result.get("recovered")), bool(result.get("was_recovering")))
                    )
                    self.live = True
                    self.ready.set()

    def _publication(self, pub: dict[str, Any], live: bool) -> None:
        data = pub.get("data") or {}
        n = int(data.get("n", -1))
        self.received.append(n)
        self.seen.add(n)
        self.trace.append((n, int(pub.get("offset", 0)), live))
        self.offset = max(self.offset, int(pub.get("offset", 0)))
        if live and self.latencies is not None and not self.disconnects:
            now = time.time()
            self.latencies.extend((now, now - float(data.get("t", now))))


def storm_token(secret: str, user: str, channels: Sequence[str]) -> str:
    claims = {"sub": user, "channels": list(channels), "exp": int(time.time()) + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


async def _worker() -> None:
    """One process of clients: a plan on the first stdin line, `ready` when every client is subscribed,
    then on `finish {"expected": {channel: count}, "timeout": s}` the summary of every client."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # a plan of thousands of clients is one line
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    plan = json.loads(await reader.readline())
    samples_path = plan.get("samples")
    latencies: array.array[float] = array.array("d")
    clients = [
        StormClient(
            spec["user"],
            spec["channel"],
            spec["urls"],
            storm_token(plan["secret"], spec["user"], [spec["channel"]]),
            plan.get("min_delay", 0.5),
            plan.get("max_delay", 10.0),
            # Only witnesses (a benchmark's clients of the surviving gateway) keep their latencies.
            latencies=latencies if samples_path and spec.get("witness") else None,
        )
        for spec in plan["clients"]
    ]
    opening = asyncio.Semaphore(plan.get("opening", 64))
    tasks = [asyncio.create_task(client.run(opening)) for client in clients]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(plan.get("ready_timeout", 120)):
            await asyncio.gather(*(client.ready.wait() for client in clients))
    print(
        json.dumps({"ready": sum(1 for c in clients if c.subscribed), "fatal": sum(1 for c in clients if c.fatal)}),
        flush=True,
    )
    line = await reader.readline()
    finish = json.loads(line.decode().removeprefix("finish"))
    expected: dict[str, int] = finish["expected"]
    deadline = time.monotonic() + finish.get("timeout", 60)
    while time.monotonic() < deadline and not all(
        c.fatal is not None or c.complete(expected.get(c.channel, 0)) for c in clients
    ):
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if samples_path:
        await asyncio.to_thread(Path(samples_path).write_bytes, latencies.tobytes())
    print(json.dumps({"clients": [c.summary(expected.get(c.channel, 0)) for c in clients]}), flush=True)


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)


class Storm:
    """Workers of `clients_per_worker` clients; `channel_of(i)` and `urls_of(i)` place client i."""

    def __init__(
        self,
        secret: str,
        specs: list[dict[str, Any]],
        clients_per_worker: int = 500,
        min_delay: float = 0.5,
        max_delay: float = 10.0,
        samples_dir: str | None = None,
    ) -> None:
        self.secret = secret
        self.specs = specs
        self.per_worker = clients_per_worker
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.samples_dir = samples_dir
        self.workers: list[Worker] = []

    async def start(self, ready_timeout: float = 120.0) -> None:
        """Every worker started and every client subscribed (or the timeout passed: `subscribed` says)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for index, first in enumerate(range(0, len(self.specs), self.per_worker)):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", WORKER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, limit=64 * 1024 * 1024,
            )  # fmt: skip
            plan = {
                "secret": self.secret,
                "clients": self.specs[first : first + self.per_worker],
                "min_delay": self.min_delay,
                "max_delay": self.max_delay,
                "ready_timeout": ready_timeout,
                "samples": f"{self.samples_dir}/worker-{index}.bin" if self.samples_dir else None,
            }
            assert process.stdin is not None
            process.stdin.write(json.dumps(plan).encode() + b"\n")
            await process.stdin.drain()
            self.workers.append(Worker(process))
        for worker in self.workers:
            assert worker.process.stdout is not None
            line = await asyncio.wait_for(worker.process.stdout.readline(), ready_timeout + 30)
            worker.ready = json.loads(line) if line else {"ready": 0, "fatal": "exited"}

    @property
    def subscribed(self) -> int:
        return sum(int(w.ready.get("ready", 0)) for w in self.workers)

    async def finish(self, expected: dict[str, int], timeout: float = 60.0) -> list[dict[str, Any]]:
        """Each worker waits until its clients have all `expected[channel]` publications (or the timeout);
        the summary of every client."""
        summaries: list[dict[str, Any]] = []
        command = b"finish" + json.dumps({"expected": expected, "timeout": timeout}).encode() + b"\n"
        for worker in self.workers:
            assert worker.process.stdin is not None
            worker.process.stdin.write(command)
            await worker.process.stdin.drain()
        for worker in self.workers:
            assert worker.process.stdout is not None
            line = await asyncio.wait_for(worker.process.stdout.readline(), timeout + 60)
            summaries += json.loads(line)["clients"]
            await worker.process.wait()
        return summaries

    def kill(self) -> None:
        for worker in self.workers:
            if worker.process.returncode is None:
                worker.process.kill()


async def publish_steadily(
    api: str,
    api_key: str,
    channels: Sequence[str],
    count: int,
    rate: float,
    on_tick: Any = None,
    per_batch: int = 10,
) -> list[float]:
    """`count` publications on every channel at `rate` a second each (data `{"n", "t"}`): each tick
    sends `/api/batch` requests of `per_batch` channels at once, each stamped when it is sent (the server
    carries out a batch's publishes one after the other, so a large batch would count its own time as
    delivery latency). A publication the gateway did not take is sent again with its idempotency key
    (harmless after a lost answer). Returns when each tick was published."""
    started = time.monotonic()
    ticks: list[float] = []
    headers = {"X-API-Key": api_key}

    async def batch(http: httpx.AsyncClient, n: int, names: Sequence[str]) -> None:
        pending = list(names)
        deadline = time.monotonic() + 30
        while pending:
            stamp = time.time()
            commands = [
                {"publish": {"channel": c, "data": {"n": n, "t": stamp}, "idempotency_key": f"{c}-{n}"}}
                for c in pending
            ]
            try:
                answer = await http.post(api + "/batch", headers=headers, json={"commands": commands})
                replies = answer.json().get("replies", [])
                done = {c for c, reply in zip(pending, replies, strict=False) if "publish" in reply}
                pending = [c for c in pending if c not in done]
            except (httpx.HTTPError, ValueError):
                pass
            if pending:
                assert time.monotonic() < deadline, f"publication {n} never accepted on {pending[:3]}"
                await asyncio.sleep(0.05)

    chunks = [channels[i : i + per_batch] for i in range(0, len(channels), per_batch)]
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=len(chunks))) as http:
        for n in range(count):
            await asyncio.gather(*(batch(http, n, chunk) for chunk in chunks))
            ticks.append(time.time())
            if on_tick is not None:
                await on_tick(n)
            await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
    return ticks


class FailoverProxy:
    """What a Kubernetes Service does for a test: each new TCP connection goes to the first upstream
    that accepts it, so clients of a dead gateway land on the other replica."""

    def __init__(self, upstreams: list[int]) -> None:
        self.upstreams = upstreams
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for upstream in self.upstreams:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def copy(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await source.read(65536):
                    target.write(data)
                    await target.drain()
            target.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


if __name__ == "__main__":
    asyncio.run(_worker())
