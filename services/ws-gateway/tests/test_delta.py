"""Delta compression (`delta: "fossil"`), as the stock SDKs negotiate and decode it: the payloads they hand
the application are the published ones, while the wire carries deltas after the first publication."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import orjson
import pytest
import websockets
from centrifuge import Client, DeltaType
from centrifuge.fossil import apply_delta
from tsunagu_core.testing import eventually
from tsunagu_ws_gateway.config import DEFAULT_NAMESPACES
from tsunagu_ws_gateway.protocol import fossil

from .conftest import API_KEY, RunningGateway, make_token, running_gateway
from .sdk_events import Inbox


def with_namespaces(**namespaces: dict[str, Any]) -> dict[str, Any]:
    return {"namespaces": {**DEFAULT_NAMESPACES, **namespaces}}


DELTA_NAMESPACES = with_namespaces(
    ticker={"allowed_delta_types": ["fossil"], "allow_subscribe": "authenticated"},
    plain={"allow_subscribe": "authenticated"},
)


def quote(n: int) -> dict[str, Any]:
    """A ticker update: most of it stays the same from one to the next, as a price feed's does."""
    return {
        "symbol": "ACME",
        "name": "Acme Corporation ordinary shares",
        "exchange": "XTKS",
        "currency": "JPY",
        "price": 1000 + n * 0.25,
        "bid": 999.5 + n * 0.25,
        "ask": 1000.5 + n * 0.25,
        "volume": 1_250_000 + n * 37,
        "n": n,
    }


async def publish(gateway: RunningGateway, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
        answer = await api.post("/api/publish", json={"channel": channel, "data": data})
        assert "error" not in answer.json(), answer.text


def test_fossil_deltas_decode_with_the_sdk_s_own_decoder() -> None:
    """Random edits of random texts: the SDK's `apply_delta` (centrifuge-python's port of delta.c) gives the
    target back, and a small change to a payload makes a small delta."""
    rnd = random.Random(7)
    for _ in range(500):
        source = bytes(rnd.choice(b'abc{}":,019 ') for _ in range(rnd.randint(0, 400)))
        target = bytearray(source)
        for _ in range(rnd.randint(0, 6)):
            at = rnd.randint(0, len(target))
            if target and rnd.random() < 0.5:
                del target[at : at + rnd.randint(1, 12)]
            else:
                target[at:at] = bytes(rnd.choice(b"xyz\xc3\xa9") for _ in range(rnd.randint(1, 12)))
        delta = fossil.create(source, bytes(target))
        assert bytes(apply_delta(source, delta)) == bytes(target)
        assert fossil.apply(source, delta) == bytes(target)
    before, after = orjson.dumps(quote(1)), orjson.dumps(quote(2))
    assert len(fossil.create(before, after)) < len(after) / 2


def test_a_delta_that_does_not_fit_its_source_is_refused() -> None:
    source, target = b"the quick brown fox jumps over the lazy dog", b"the quick brown cat jumps over the lazy dog"
    delta = fossil.create(source, target)
    with pytest.raises(fossil.DeltaError):
        fossil.apply(source[:10], delta)
    with pytest.raises(fossil.DeltaError, match="checksum"):
        fossil.apply(source.replace(b"quick", b"QUICK"), delta)


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
async def test_a_delta_subscriber_gets_every_payload_as_published(use_protobuf: bool) -> None:
    async with running_gateway(**DELTA_NAMESPACES) as gateway:
        client = Client(gateway.ws_url, token=make_token("ann", []), use_protobuf=use_protobuf)
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("ticker:acme", events=inbox, delta=DeltaType.FOSSIL)
        await sub.subscribe()
        await sub.ready(timeout=5)
        assert sub._delta_negotiated  # the SDK's own flag, from the subscribe reply's `delta`
        for n in range(30):
            await publish(gateway, "ticker:acme", quote(n))
        await eventually(lambda: len(inbox.publications) == 30)
        received = [orjson.loads(p.data) if use_protobuf else p.data for p in inbox.publications]
        assert received == [quote(n) for n in range(30)]
        await client.disconnect()


async def test_the_wire_carries_deltas_after_the_first_publication() -> None:
    """Bytes on the wire for the same 40 ticker updates, with and without `delta: "fossil"` (printed)."""
    async with running_gateway(**DELTA_NAMESPACES) as gateway:
        sizes: dict[str, list[int]] = {}
        payloads: dict[str, list[Any]] = {}

        async def follow(name: str, subscribe: dict[str, Any], ready: asyncio.Event) -> None:
            async with websockets.connect(gateway.ws_url) as ws:
                token = make_token(name, [])
                await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
                await ws.recv()
                await ws.send(json.dumps({"id": 2, "subscribe": {"channel": "ticker:wire", **subscribe}}))
                reply = json.loads(await ws.recv())
                assert reply["id"] == 2 and "error" not in reply, reply
                assert reply["subscribe"].get("delta", False) == bool(subscribe), reply
                ready.set()
                sizes[name], payloads[name] = [], []
                previous = b""
                while len(sizes[name]) < 40:
                    frame = await ws.recv()
                    for line in (frame if isinstance(frame, str) else frame.decode()).splitlines():
                        message = json.loads(line)
                        if "push" not in message:
                            continue
                        pub = message["push"]["pub"]
                        sizes[name].append(len(line.encode()))
                        if not subscribe:
                            payloads[name].append(pub["data"])
                            continue
                        text = pub["data"].encode()
                        previous = bytes(apply_delta(previous, text)) if pub.get("delta") else text
                        payloads[name].append(json.loads(previous))

        ready_full, ready_delta = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(follow("full", {}, ready_full)),
            asyncio.create_task(follow("delta", {"delta": "fossil"}, ready_delta)),
        ]
        await asyncio.wait_for(asyncio.gather(ready_full.wait(), ready_delta.wait()), 5)
        for n in range(40):
            await publish(gateway, "ticker:wire", quote(n))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert payloads["full"] == payloads["delta"] == [quote(n) for n in range(40)]
        full, delta = sum(sizes["full"]), sum(sizes["delta"])
        print(f"\n40 ticker updates: {full} B on the wire in full, {delta} B with fossil deltas ({delta / full:.0%})")
        # The first goes in full (the client holds nothing yet), the rest as deltas a fraction of the size.
        assert sizes["delta"][0] >= sizes["full"][0]
        assert delta < full * 0.8


async def test_a_namespace_without_deltas_sends_full_payloads_to_a_client_that_asks() -> None:
    async with running_gateway(**DELTA_NAMESPACES) as gateway:
        client = Client(gateway.ws_url, token=make_token("ann", []))
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("plain:acme", events=inbox, delta=DeltaType.FOSSIL)
        await sub.subscribe()
        await sub.ready(timeout=5)
        assert not sub._delta_negotiated
        for n in range(3):
            await publish(gateway, "plain:acme", quote(n))
        await eventually(lambda: len(inbox.publications) == 3)
        assert [p.data for p in inbox.publications] == [quote(n) for n in range(3)]
        await client.disconnect()


async def test_an_unknown_delta_type_or_delta_with_a_tags_filter_is_a_bad_request() -> None:
    async with running_gateway(**DELTA_NAMESPACES) as gateway, websockets.connect(gateway.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": make_token("ann", [])}}))
        await ws.recv()
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": "ticker:x", "delta": "xdelta"}}))
        reply = json.loads(await ws.recv())
        assert reply["error"]["code"] == 107 and "fossil" in reply["error"]["message"]
        filtered = {"channel": "ticker:x", "delta": "fossil", "tf": {"key": "a", "cmp": "eq", "val": "1"}}
        await ws.send(json.dumps({"id": 3, "subscribe": filtered}))
        reply = json.loads(await ws.recv())
        assert reply["error"]["code"] == 107, reply
        # The connection stays usable.
        await ws.send(json.dumps({"id": 4, "subscribe": {"channel": "ticker:x", "delta": "fossil"}}))
        reply = json.loads(await ws.recv())
        assert reply["subscribe"]["delta"] is True


async def test_a_delta_subscriber_recovers_in_full_then_gets_deltas_again() -> None:
    async with running_gateway(**DELTA_NAMESPACES) as gateway:
        client = Client(gateway.ws_url, token=make_token("ann", []))
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("ticker:rec", events=inbox, delta=DeltaType.FOSSIL)
        await sub.subscribe()
        await sub.ready(timeout=5)
        for n in range(5):
            await publish(gateway, "ticker:rec", quote(n))
        await eventually(lambda: len(inbox.publications) == 5)
        await client.disconnect()
        for n in range(5, 12):  # missed while away
            await publish(gateway, "ticker:rec", quote(n))
        await client.connect()
        await eventually(lambda: len(inbox.subscribed) == 2)
        assert inbox.subscribed[1].recovered
        await eventually(lambda: len(inbox.publications) == 12)
        for n in range(12, 20):
            await publish(gateway, "ticker:rec", quote(n))
        await eventually(lambda: len(inbox.publications) == 20)
        assert [p.data for p in inbox.publications] == [quote(n) for n in range(20)]
        assert [p.offset for p in inbox.publications] == list(range(1, 21))
        await client.disconnect()
