"""Collaborative editing benchmark: gateway `/collab` + collab in this process, pycrdt clients,
next to pycrdt-websocket's own server with the same clients and trace in the same run.

    uv run python bench/collab.py [--ops 30000] [--late-mb 1] [--engines stack|memory]
    (eval "$(uv run tsunagu stack env)" first: `--engines stack`, the default, runs on Kafka, Redis
     and PostgreSQL; `memory` on the embedded engines)

A synthetic editing trace in the shape of crdt-benchmarks B4 (a person typing: mostly single-char
inserts at a cursor that mostly moves by one, ~10% deletes, occasional jumps) is replayed through
one client, one update per op; a second client on the same document measures when it has
converged. Prints: time to converge, updates/s, RSS growth per open document, stored bytes after
compaction vs the encoded document, and the sync time of a late joiner on a ~1 MB document; then the
same trace through a single-process pycrdt-websocket server (`WebsocketServer` + `ASGIServer`).
Raw results go to bench/results/<time>-collab.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import uvicorn
from pycrdt import Doc, Provider, Text
from pycrdt.websocket import ASGIServer, WebsocketServer
from record import Recorder
from tsunagu_collab.app import create_app as collab_app
from tsunagu_collab.config import CollabSettings
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing_clients import WebsocketChannel
from tsunagu_ws_gateway.app import create_app as gateway_app
from tsunagu_ws_gateway.config import GatewaySettings
from websockets.asyncio.client import connect

SECRET = "bench-collab-secret-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


@contextlib.asynccontextmanager
async def serve(app: Any, port: int) -> AsyncIterator[None]:
    server = _Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on", ws_max_size=2**25)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def trace(ops: int, seed: int = 4) -> list[tuple[int, str | None]]:
    """(position, char) inserts and (position, None) deletes, like a person typing."""
    rng = random.Random(seed)
    length = 0
    cursor = 0
    out: list[tuple[int, str | None]] = []
    for _ in range(ops):
        if rng.random() < 0.02:
            cursor = rng.randrange(length + 1)
        if length and cursor and rng.random() < 0.1:
            cursor -= 1
            out.append((cursor, None))
            length -= 1
        else:
            out.append((cursor, rng.choice("abcdefghijklmnopqrstuvwxyz     \n")))
            cursor += 1
            length += 1
    return out


async def wait_length(text: Text, length: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while len(text) != length:
            await asyncio.sleep(0.005)


async def converge(url: str, doc_id: str, ops: int) -> tuple[float, float, int, int]:
    """Replay the trace through a writer and wait for a reader: (seconds to send, seconds to converge,
    encoded size, characters)."""
    writer: Doc = Doc()
    reader: Doc = Doc()
    wtext = writer.get("text", type=Text)
    rtext = reader.get("text", type=Text)
    steps = trace(ops)
    async with (
        connect(url, max_size=2**25) as ws1,
        connect(url, max_size=2**25) as ws2,
        Provider(writer, WebsocketChannel(ws1, doc_id)) as p1,
        Provider(reader, WebsocketChannel(ws2, doc_id)) as p2,
    ):
        await p1.synced.wait()
        await p2.synced.wait()
        started = time.perf_counter()
        for i, (position, char) in enumerate(steps):
            if char is None:
                del wtext[position]
            else:
                wtext.insert(position, char)
            if i % 200 == 0:
                await asyncio.sleep(0)  # let the provider send
        sent = time.perf_counter() - started
        await wait_length(rtext, len(wtext), timeout=900)
        converged = time.perf_counter() - started
        assert str(rtext) == str(wtext)
        return sent, converged, len(writer.get_update()), len(wtext)


async def bench_pycrdt_websocket(ops: int, recorder: Recorder) -> float:
    port = free_port()
    async with WebsocketServer() as server, serve(ASGIServer(server), port):
        doc_id = f"bench-{uuid.uuid4().hex[:8]}"
        sent, converged, _, chars = await converge(f"ws://127.0.0.1:{port}/{doc_id}", doc_id, ops)
    print(f"pycrdt-websocket (one process), {ops} ops")
    print(f"  ops applied locally in {sent:.2f}s; converged on the second client after {converged:.2f}s")
    print(f"  throughput: {ops / converged:,.0f} updates/s end to end")
    recorder.add("pycrdt-websocket, converged", ops / converged, "updates/s", seconds=converged, chars=chars)
    return ops / converged


async def main(ops: int, late_mb: float, recorder: Recorder) -> None:
    collab_port, gateway_port = free_port(), free_port()
    os.environ["TSUNAGU_GATEWAY_COLLAB_URL"] = f"http://127.0.0.1:{collab_port}"
    runtime = Runtime(CoreSettings(node_name="bench-collab"))
    collab = collab_app(runtime, CollabSettings(consumer_group=f"collab-bench-{uuid.uuid4().hex[:6]}"))
    gateway = gateway_app(runtime, GatewaySettings(token_hmac_secret=SECRET))
    token = jwt.encode({"sub": "bench", "channels": ["collab:*"], "exp": int(time.time()) + 3600}, SECRET)
    base = f"ws://127.0.0.1:{gateway_port}/collab"
    engines = f"bus={runtime.settings.bus} broker={runtime.settings.broker} database={runtime.settings.database}"
    print(f"collab bench ({engines}), {ops} ops")
    async with serve(collab, collab_port), serve(gateway, gateway_port):
        await runtime.wait_ready(["bus", "broker"], timeout=30)
        await asyncio.sleep(1.0)
        doc_id = f"bench-{uuid.uuid4().hex[:8]}"
        rss_before = rss_mb()
        sent, converged, encoded, chars = await converge(f"{base}/{doc_id}?token={token}", doc_id, ops)
        print(f"  ops applied locally in {sent:.2f}s; converged on the second client after {converged:.2f}s")
        print(f"  throughput: {ops / converged:,.0f} updates/s end to end")
        print(f"  document: {chars:,} chars, encoded {encoded:,} B")
        growth = rss_mb() - rss_before
        print(f"  process RSS growth with the doc open (gateway + collab + 2 clients): {growth:.1f} MB")
        recorder.add(
            "tsunagu gateway + collab, converged",
            ops / converged,
            "updates/s",
            seconds=converged,
            chars=chars,
            encoded=encoded,
            engines=engines,
            rss_growth_mb=growth,
            target=">= 5,000/s and >= 2x pycrdt-websocket",
        )
        docs = collab.state.docs
        await docs.flush()
        print(f"  stored after compaction: {await docs.stored_bytes(doc_id):,} B ({encoded:,} B encoded)")

        # a late joiner on a ~1 MB document
        big_id = f"bench-big-{uuid.uuid4().hex[:8]}"
        big: Doc = Doc()
        btext = big.get("text", type=Text)
        chunk = "lorem ipsum dolor sit amet " * 40
        async with (
            connect(f"{base}/{big_id}?token={token}", max_size=2**25) as ws,
            Provider(big, WebsocketChannel(ws, big_id)) as provider,
        ):
            await provider.synced.wait()
            while len(btext) < late_mb * 2**20:
                btext += chunk
                await asyncio.sleep(0)
            size = len(big.get_update())
            await asyncio.sleep(0.5)
            # wait until collab has it all
            async with asyncio.timeout(120):
                while len((await docs.state(big_id))[0]) < size:
                    await asyncio.sleep(0.1)
            late: Doc = Doc()
            ltext = late.get("text", type=Text)
            started = time.perf_counter()
            async with (
                connect(f"{base}/{big_id}?token={token}", max_size=2**25) as lws,
                Provider(late, WebsocketChannel(lws, big_id)),
            ):
                await wait_length(ltext, len(btext), timeout=120)
                joined = time.perf_counter() - started
        print(f"  late joiner: {size / 2**20:.2f} MB document synced in {joined * 1000:.0f} ms")
        recorder.add("late joiner sync", joined * 1000, "ms", document_bytes=size)
        print(f"  peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=30000)
    parser.add_argument("--late-mb", type=float, default=1.0)
    parser.add_argument("--engines", choices=("stack", "memory"), default="stack")
    args = parser.parse_args()
    if args.engines == "stack":
        os.environ.update({"TSUNAGU_BUS": "kafka", "TSUNAGU_BROKER": "redis", "TSUNAGU_DATABASE": "postgres"})
    recorder = Recorder("collab", vars(args))

    async def both() -> None:
        await main(args.ops, args.late_mb, recorder)
        reference = await bench_pycrdt_websocket(args.ops, recorder)
        ours = recorder.figures[0]["value"]
        print(f"tsunagu / pycrdt-websocket: {ours / reference:.2f}x (target >= 2x)")
        recorder.add("tsunagu / pycrdt-websocket", ours / reference, "x", target=">= 2x")

    try:
        asyncio.run(both())
    finally:
        recorder.save()
