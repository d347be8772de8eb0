"""Collaborative editing end to end: stock y-websocket clients (Node) and pycrdt's provider against
`/collab/{doc}` on the gateway, with the collab service applying, storing and fanning out updates; stock
@hocuspocus/provider clients (Node) with several documents over one socket on `/collab` beside them.

- memory mode: gateway + collab in one process, one event loop, memory bus/broker/store;
- real stack: two gateway processes and a collab process on Kafka, Redis and PostgreSQL, then
  collab (kill -9) and one gateway restarted in the middle of editing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from pycrdt import Doc, Provider, Text
from tsunagu_collab.app import create_app as collab_app
from tsunagu_collab.config import CollabSettings
from tsunagu_core.broker import MemoryBroker
from tsunagu_core.bus import MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import serving
from tsunagu_core.testing_clients import WebsocketChannel
from tsunagu_ws_gateway.app import create_app as gateway_app
from tsunagu_ws_gateway.config import DEFAULT_NAMESPACES, ChannelOptions, GatewaySettings
from tsunagu_ws_gateway.protocol import hocuspocus as hp
from websockets.asyncio.client import connect

SECRET = "e2e-collab-secret-long-enough-for-hs256"
JS = Path(__file__).parent / "js"
# Any signed-in user may read a document (subscribe); writing (publish) needs a `collab:` claim.
NAMESPACES = {**DEFAULT_NAMESPACES, "collab": ChannelOptions(allow_subscribe="authenticated", allow_publish="claim")}


def token(user: str, channels: list[str]) -> str:
    return jwt.encode({"sub": user, "channels": channels, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: Any, port: int) -> AsyncIterator[None]:
    async with serving(app, port):
        yield


async def y_client(
    url: str, room: str, tok: str, letter: str, count: int, expect: int, timeout: float = 40, delay_ms: int = 2
) -> Any:
    process = await asyncio.create_subprocess_exec(
        "node",
        "y_client.mjs",
        url,
        room,
        tok,
        letter,
        str(count),
        str(expect),
        str(timeout),
        str(delay_ms),
        cwd=JS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, (out.decode(), err.decode()[-2000:])
    return json.loads(out.decode().strip().splitlines()[-1])


async def hocuspocus_client(
    url: str, tok: str, docs: list[str], denied: list[str], letter: str, count: int, expect: int, timeout: float = 40
) -> Any:
    process = await asyncio.create_subprocess_exec(
        "node",
        "hocuspocus_client.mjs",
        url,
        tok,
        ",".join(docs),
        ",".join(denied) or "-",
        letter,
        str(count),
        str(expect),
        str(timeout),
        cwd=JS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, (out.decode(), err.decode()[-2000:])
    return json.loads(out.decode().strip().splitlines()[-1])


async def wait_text(ytext: Text, length: int, timeout: float = 20) -> str:
    async with asyncio.timeout(timeout):
        while len(str(ytext)) < length:
            await asyncio.sleep(0.02)
    return str(ytext)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        return response.json()


async def stored_text(http: str, doc: str, length: int, timeout: float = 20) -> str:
    async with httpx.AsyncClient(base_url=http) as client, asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/v1/docs/{doc}")
            assert response.status_code == 200, response.text
            body = response.json()
            text = str(body["content"].get("text", ""))
            if len(text) >= length:
                return text
            await asyncio.sleep(0.1)


async def test_memory_mode_stock_clients_converge_with_collab(monkeypatch: pytest.MonkeyPatch) -> None:
    collab_port, gateway_port = free_port(), free_port()
    monkeypatch.setenv("TSUNAGU_GATEWAY_COLLAB_URL", f"http://127.0.0.1:{collab_port}")
    runtime = Runtime(CoreSettings(node_name="collab-e2e"), bus=MemoryBus(), broker=MemoryBroker())
    collab = collab_app(runtime, CollabSettings())
    gateway = gateway_app(runtime, GatewaySettings(token_hmac_secret=SECRET, namespaces=NAMESPACES))
    doc = f"mem-{uuid.uuid4().hex[:8]}"
    writer = token("ann", ["collab:*"])
    url = f"ws://127.0.0.1:{gateway_port}/collab"
    async with serve(collab, collab_port), serve(gateway, gateway_port):
        first, second = await asyncio.gather(
            y_client(url, doc, writer, "a", 60, 120), y_client(url, doc, writer, "b", 60, 120)
        )
        assert first["text"] == second["text"]
        assert sorted(first["text"]) == ["a"] * 60 + ["b"] * 60
        assert await stored_text(f"http://127.0.0.1:{collab_port}", doc, 120) == first["text"]

        # pycrdt's own provider syncs too: it gets the text and its edit reaches collab.
        ydoc: Doc = Doc()
        ytext = ydoc.get("text", type=Text)
        async with (
            connect(f"{url}/{doc}?token={writer}") as websocket,
            Provider(ydoc, WebsocketChannel(websocket, doc)),
        ):
            assert await wait_text(ytext, 120) == first["text"]
            ytext.insert(0, "py")
            text = await stored_text(f"http://127.0.0.1:{collab_port}", doc, 122)
            assert text == "py" + first["text"]
            await asyncio.sleep(0.2)

        # A read-only token reads along; its edits are refused and the stored doc is unchanged.
        reader = token("bob", ["other:*"])
        refused = await y_client(url, doc, reader, "r", 1, 123, timeout=10)
        assert "Permission denied" in refused["denied"] and "read-only" in refused["denied"], refused
        await asyncio.sleep(0.3)
        body = await get_json(f"http://127.0.0.1:{collab_port}/v1/docs/{doc}")
        assert body["content"]["text"] == text

        # On a Hocuspocus socket the same reader is told `readonly` for the document; its edit stays local
        # (unsynced), the stored doc is unchanged.
        hocus = await hocuspocus_client(url, reader, [doc], [], "r", 1, 123, timeout=15)
        assert hocus["scopes"] == {doc: "readonly"} and hocus["unsynced"][doc] >= 1, hocus
        assert sorted(hocus["texts"][doc]) == sorted(text + "r")
        await asyncio.sleep(0.3)
        body = await get_json(f"http://127.0.0.1:{collab_port}/v1/docs/{doc}")
        assert body["content"]["text"] == text

        # A malformed frame for an open Hocuspocus document closes the socket with 4400, naming it.
        async with connect(url) as websocket:
            await websocket.send(hp.auth_token(doc, writer))
            assert await websocket.recv() == hp.authenticated(doc, read_only=False)
            greeting = await websocket.recv()
            assert isinstance(greeting, bytes) and greeting.startswith(hp.prefix(doc) + b"\x00\x00")  # SyncStep1
            await websocket.send(hp.prefix(doc) + b"\x00\x02\x03\x01\x02\x03")  # an update that is no Yjs
            with pytest.raises(Exception) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await websocket.recv()
            assert websocket.close_code == 4400, closed.value
            assert websocket.close_reason == f"document {doc!r}: malformed Yjs update"

        # garbage and truncated frames close with 4400 and a reason; the stored doc is untouched
        for garbage in (b"\x00\x02\xff\xff\xff", b"\x07", b"\x00\x02\x05ab", b"\x00\x02\x03\x01\x02\x03"):
            async with connect(f"{url}/{doc}?token={writer}") as websocket:
                await websocket.recv()
                await websocket.send(garbage)
                with pytest.raises(Exception) as closed:
                    async with asyncio.timeout(5):
                        while True:
                            await websocket.recv()
                assert websocket.close_code == 4400, closed.value
                assert websocket.close_reason
        body = await get_json(f"http://127.0.0.1:{collab_port}/v1/docs/{doc}?format=update")
        check: Doc = Doc()
        check.apply_update(base64.b64decode(body["update"]))
        assert str(check.get("text", type=Text)) == text


def stack_envs(real_env: dict[str, str], collab_port: int) -> tuple[dict[str, str], dict[str, str]]:
    collab_env = {**real_env, "TSUNAGU_COLLAB_CONSUMER_GROUP": "collab-e2e-tests", "TSUNAGU_COLLAB_IDLE_SECONDS": "5"}
    gateway_env = {
        **real_env,
        "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET,
        "TSUNAGU_GATEWAY_COLLAB_URL": f"http://127.0.0.1:{collab_port}",
    }
    return collab_env, gateway_env


async def test_real_stack_two_gateways_converge_and_survive_restarts(start_service, real_env, pick_port) -> None:  # type: ignore[no-untyped-def]
    collab_port = pick_port()
    collab_env, gateway_env = stack_envs(real_env, collab_port)
    collab = start_service(["serve", "collab"], collab_env, port=collab_port)
    first_port = pick_port()
    first = start_service(["serve", "ws-gateway"], gateway_env, port=first_port)
    second = start_service(["serve", "ws-gateway"], gateway_env)
    for service in (collab, first, second):
        await asyncio.to_thread(service.wait_ready, 90)
    doc = f"stack-{uuid.uuid4().hex[:8]}"
    writer = token("ann", ["collab:*"])
    urls = [f"ws://127.0.0.1:{first.port}/collab", f"ws://127.0.0.1:{second.port}/collab"]

    # two stock clients on two replicas, concurrent edits of one Y.Text
    a, b = await asyncio.gather(
        y_client(urls[0], doc, writer, "a", 100, 200), y_client(urls[1], doc, writer, "b", 100, 200)
    )
    assert a["text"] == b["text"] and sorted(a["text"]) == ["a"] * 100 + ["b"] * 100
    assert await stored_text(collab.base, doc, 200) == a["text"]

    # pycrdt's provider on the second replica gets the same text
    ydoc: Doc = Doc()
    ytext = ydoc.get("text", type=Text)
    async with (
        connect(f"{urls[1]}/{doc}?token={writer}") as websocket,
        Provider(ydoc, WebsocketChannel(websocket, doc)),
    ):
        assert await wait_text(ytext, 200) == a["text"]

    # kill -9 collab and restart the first gateway while two clients keep editing
    async def chaos() -> None:
        await asyncio.sleep(1.5)
        collab.process.kill()
        collab.process.wait()
        restarted = start_service(["serve", "collab"], collab_env, port=collab_port)
        first.process.kill()
        first.process.wait()
        await asyncio.sleep(0.5)
        again = start_service(["serve", "ws-gateway"], gateway_env, port=first_port)
        await asyncio.to_thread(restarted.wait_healthy, 60)
        await asyncio.to_thread(again.wait_healthy, 60)

    c, d, _ = await asyncio.gather(
        y_client(urls[0], doc, writer, "c", 150, 500, timeout=90),
        y_client(urls[1], doc, writer, "d", 150, 500, timeout=90),
        chaos(),
    )
    assert c["text"] == d["text"]
    assert sorted(c["text"]) == sorted("a" * 100 + "b" * 100 + "c" * 150 + "d" * 150)
    assert await stored_text(collab.base, doc, 500, timeout=30) == c["text"]


def applied(base: str) -> float:
    """Updates this collab replica applied and published (its /metrics)."""
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith("tsunagu_collab_updates_applied_total "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_two_collab_replicas_share_the_documents_and_one_is_killed(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    """Two collab replicas in one consumer group on the 6-partition updates topic; pycrdt writers (and two
    stock y-websocket clients) edit eight documents through a gateway. The second replica joins while
    the first holds every document in memory, takes some partitions, compacts as it goes, and is killed
    -9 mid-stream; the first takes its partitions back. Every document ends with every update once, each
    writer's in its order, in the store, at every writer and at a late joiner."""
    run = uuid.uuid4().hex[:8]
    collab_port = pick_port()
    collab_env, gateway_env = stack_envs(real_env, collab_port)
    # A group of its own, that every run reuses: a new group would first replay the whole topic.
    collab_env |= {"TSUNAGU_COLLAB_CONSUMER_GROUP": "collab-e2e-replicas", "TSUNAGU_COLLAB_COMPACT_MAX_UPDATES": "20"}
    survivor = start_service(["serve", "collab"], collab_env, port=collab_port)
    gateway = start_service(["serve", "ws-gateway"], gateway_env)
    for service in (survivor, gateway):
        await asyncio.to_thread(service.wait_ready, 90)
    url = f"ws://127.0.0.1:{gateway.port}/collab"
    writer_token = token("ann", ["collab:*"])
    docs = [f"replicas-{run}-{n}" for n in range(8)]
    stop = asyncio.Event()
    sent: dict[str, int] = {}

    async def write(doc: str, ytext: Text) -> None:
        count = 0
        while not stop.is_set():
            ytext += f"{count:03d},"
            count += 1
            await asyncio.sleep(0.03)
        sent[doc] = count

    async with contextlib.AsyncExitStack() as stack:
        texts: dict[str, Text] = {}
        for doc in docs:
            ydoc: Doc = Doc()
            texts[doc] = ydoc.get("text", type=Text)
            websocket = await stack.enter_async_context(connect(f"{url}/{doc}?token={writer_token}"))
            await stack.enter_async_context(Provider(ydoc, WebsocketChannel(websocket, doc)))
        await asyncio.sleep(0.5)  # synced with the (empty) documents
        writers = [asyncio.create_task(write(doc, texts[doc])) for doc in docs]
        await asyncio.sleep(2)  # the first replica opens every document
        doomed = start_service(["serve", "collab"], collab_env)
        await asyncio.to_thread(doomed.wait_ready, 90)
        async with asyncio.timeout(40):
            while not await asyncio.to_thread(applied, doomed.base):
                await asyncio.sleep(0.3)
        # stock y-websocket clients insert at random places on two documents across the kill
        letters = [asyncio.create_task(y_client(url, doc, writer_token, "Y", 60, 60, 60, 50)) for doc in docs[:2]]
        await asyncio.sleep(1.5)
        doomed.process.kill()  # kill -9 with batches in hand and offsets not committed
        doomed.process.wait()
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*writers, *letters)

        def wanted(doc: str) -> str:
            return "".join(f"{n:03d}," for n in range(sent[doc]))

        def complete(text: str, doc: str) -> bool:
            return len(text) >= len(wanted(doc)) + (60 if doc in docs[:2] else 0)

        # the survivor waits out the dead member's session, then applies its partitions' backlog
        async with asyncio.timeout(40):
            while not all(complete(str(texts[doc]), doc) for doc in docs):
                await asyncio.sleep(0.2)
        for doc in docs:
            text = str(texts[doc])
            assert text.replace("Y", "") == wanted(doc), f"{doc}: lost, doubled or reordered updates"
            assert text.count("Y") == (60 if doc in docs[:2] else 0)
            assert await stored_text(survivor.base, doc, len(text)) == text
            late: Doc = Doc()
            late_text = late.get("text", type=Text)
            async with (
                connect(f"{url}/{doc}?token={writer_token}") as websocket,
                Provider(late, WebsocketChannel(websocket, doc)),
            ):
                assert await wait_text(late_text, len(text)) == text
    assert min(sent.values()) > 50


async def test_real_stack_hocuspocus_documents_share_a_socket_beside_y_websocket(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    """One stock @hocuspocus/provider socket, three documents and one it may not read; a stock y-websocket
    client on each of the three edits at the same time. All converge, collab stores them, the refused
    document is refused alone."""
    collab_port = pick_port()
    collab_env, gateway_env = stack_envs(real_env, collab_port)
    collab = start_service(["serve", "collab"], collab_env, port=collab_port)
    gateway = start_service(["serve", "ws-gateway"], gateway_env)
    for service in (collab, gateway):
        await asyncio.to_thread(service.wait_ready, 90)
    prefix = f"hp-{uuid.uuid4().hex[:8]}"
    docs = [f"{prefix}-{i}" for i in range(3)]
    locked = f"locked-{uuid.uuid4().hex[:8]}"
    tok = token("ann", [f"collab:{prefix}-*"])
    url = f"ws://127.0.0.1:{gateway.port}/collab"

    hocus, *ys = await asyncio.gather(
        hocuspocus_client(url, tok, docs, [locked], "h", 40, 80),
        *(y_client(url, doc, tok, letter, 40, 80) for doc, letter in zip(docs, "xyz", strict=True)),
    )
    assert hocus["sockets"] == 1 and hocus["closes"] == [], hocus
    assert hocus["denied"] == {locked: f"no read permission for collab:{locked}"}
    assert hocus["scopes"] == dict.fromkeys(docs, "read-write")
    for doc, y, letter in zip(docs, ys, "xyz", strict=True):
        assert hocus["texts"][doc] == y["text"]
        assert sorted(y["text"]) == sorted("h" * 40 + letter * 40)
        assert await stored_text(collab.base, doc, 80) == y["text"]

    # A later y-websocket client gets what both kinds of client wrote from the store.
    late = await y_client(url, docs[0], tok, "l", 0, 80)
    assert late["text"] == ys[0]["text"]
