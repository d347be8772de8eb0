"""Positioning, cache recovery and publication tags filters, as the stock centrifuge-python SDK asks for
them (`positioned`, `get_state` with an empty position, `tags_filter`)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from centrifuge import (
    Client,
    StreamPosition,
    SubscriptionState,
)
from centrifuge.filter import Filter
from tsunagu_core.testing import eventually
from tsunagu_ws_gateway.config import DEFAULT_NAMESPACES

from .conftest import API_KEY, RunningGateway, make_token, running_gateway
from .sdk_events import Inbox


def with_namespaces(**namespaces: dict[str, Any]) -> dict[str, Any]:
    return {"namespaces": {**DEFAULT_NAMESPACES, **namespaces}}


async def publish(gateway: RunningGateway, channel: str, data: Any, tags: dict[str, str] | None = None) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
        body: dict[str, Any] = {"channel": channel, "data": data}
        if tags:
            body["tags"] = tags
        answer = await api.post("/api/publish", json=body)
        assert "error" not in answer.json(), answer.text


@pytest.mark.parametrize("use_protobuf", [False, True], ids=["json", "protobuf"])
async def test_a_tags_filter_lets_only_matching_publications_through(use_protobuf: bool) -> None:
    settings = with_namespaces(quotes={"allow_tags_filter": True, "allow_subscribe": "authenticated"})
    async with running_gateway(**settings) as gateway:
        client = Client(gateway.ws_url, token=make_token("ann", []), use_protobuf=use_protobuf)
        await client.connect()
        apple, everything = Inbox(), Inbox()
        filtered = client.new_subscription(
            "quotes:live",
            events=apple,
            tags_filter=Filter.all(Filter.eq("ticker", "AAPL"), Filter.gte("price", "100")),
        )
        plain = Client(gateway.ws_url, token=make_token("bob", []))
        await plain.connect()
        unfiltered = plain.new_subscription("quotes:live", events=everything)
        await filtered.subscribe()
        await unfiltered.subscribe()
        await filtered.ready(timeout=5)
        await unfiltered.ready(timeout=5)
        quotes = [("AAPL", "150"), ("MSFT", "300"), ("AAPL", "99.5"), ("AAPL", "100")]
        for n, (ticker, price) in enumerate(quotes):
            await publish(gateway, "quotes:live", {"n": n}, {"ticker": ticker, "price": price})
        await eventually(lambda: len(everything.publications) == 4)
        await eventually(lambda: len(apple.publications) == 2)
        await asyncio.sleep(0.2)  # nothing else arrives
        # (a protobuf client gets the payload's bytes)
        assert [orjson.loads(p.data)["n"] if use_protobuf else p.data["n"] for p in apple.publications] == [0, 3]
        assert apple.publications[0].tags == {"ticker": "AAPL", "price": "150"}
        await client.disconnect()
        await plain.disconnect()


async def test_a_tags_filter_where_the_namespace_does_not_allow_one_is_refused() -> None:
    async with running_gateway(**with_namespaces(quotes={"allow_subscribe": "authenticated"})) as gateway:
        client = Client(gateway.ws_url, token=make_token("ann", []))
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("quotes:live", events=inbox, tags_filter=Filter.eq("ticker", "AAPL"))
        await sub.subscribe()
        await eventually(lambda: bool(inbox.unsubscribed))
        assert inbox.unsubscribed[0].code == 107 and sub.state == SubscriptionState.UNSUBSCRIBED
        # A malformed filter (a comparison that does not exist) is 107 too, the connection stays.
        bad = client.new_subscription(
            "chat:x", events=(refused := Inbox()), tags_filter=Filter._leaf("ticker", "like", "A%")
        )
        await bad.subscribe()
        await eventually(lambda: bool(refused.unsubscribed))
        assert refused.unsubscribed[0].code == 107
        await client.disconnect()


async def test_recovery_with_a_tags_filter_recovers_only_matching_publications() -> None:
    settings = with_namespaces(quotes={"allow_tags_filter": True, "allow_subscribe": "authenticated"})
    async with running_gateway(**settings) as gateway:
        client = Client(gateway.ws_url, token=make_token("ann", []))
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("quotes:rec", events=inbox, tags_filter=Filter.eq("ticker", "AAPL"))
        await sub.subscribe()
        await sub.ready(timeout=5)
        await client.disconnect()
        for n, ticker in enumerate(["AAPL", "MSFT", "AAPL"]):
            await publish(gateway, "quotes:rec", {"n": n}, {"ticker": ticker})
        await client.connect()
        await eventually(lambda: len(inbox.subscribed) == 2)
        assert inbox.subscribed[1].recovered
        await eventually(lambda: len(inbox.publications) == 2)
        assert [p.data["n"] for p in inbox.publications] == [0, 2]
        await client.disconnect()


async def test_positioning_forced_by_the_namespace_or_asked_for_by_the_client() -> None:
    settings = with_namespaces(
        ticks={"recovery": False, "force_positioning": True, "allow_subscribe": "authenticated"},
        prices={"recovery": False, "allow_positioning": True, "allow_subscribe": "authenticated"},
        plain={"recovery": False, "allow_subscribe": "authenticated"},
    )
    async with running_gateway(**settings) as gateway:
        await publish(gateway, "ticks:a", {"n": 1})
        await publish(gateway, "prices:a", {"n": 1})
        client = Client(gateway.ws_url, token=make_token("ann", []))
        await client.connect()
        results = {}
        for channel, positioned in (("ticks:a", False), ("prices:a", True), ("plain:a", True)):
            inbox = Inbox()
            sub = client.new_subscription(channel, events=inbox, positioned=positioned)
            await sub.subscribe()
            await sub.ready(timeout=5)
            results[channel] = inbox.subscribed[0]
        forced, asked, refused = results["ticks:a"], results["prices:a"], results["plain:a"]
        assert forced.positioned and not forced.recoverable and forced.stream_position is not None
        assert forced.stream_position.offset == 1 and forced.stream_position.epoch
        assert asked.positioned and asked.stream_position is not None and asked.stream_position.offset == 1
        # A namespace that neither forces nor allows positioning (nor lets the client read history) keeps
        # its subscribers unpositioned.
        assert not refused.positioned and not refused.recoverable
        await client.disconnect()


async def test_cache_recovery_delivers_the_latest_publication_on_every_subscribe() -> None:
    settings = with_namespaces(scores={"recovery_mode": "cache", "history_size": 1, "allow_subscribe": "authenticated"})
    async with running_gateway(**settings) as gateway:
        for score in ("0-0", "1-0", "1-1"):
            await publish(gateway, "scores:final", {"score": score})

        async def from_scratch(channel: str) -> StreamPosition:
            # The SDK's way to ask for the current state: recover from an empty position.
            return StreamPosition(offset=0, epoch="")

        client = Client(gateway.ws_url, token=make_token("ann", []))
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("scores:final", events=inbox, get_state=from_scratch)
        await sub.subscribe()
        await sub.ready(timeout=5)
        await eventually(lambda: len(inbox.publications) == 1)
        assert inbox.publications[0].data == {"score": "1-1"}
        assert inbox.subscribed[0].recovered and inbox.subscribed[0].was_recovering
        # Away while the score changes twice: back, only the latest state arrives.
        await client.disconnect()
        for score in ("2-1", "2-2"):
            await publish(gateway, "scores:final", {"score": score})
        await client.connect()
        await eventually(lambda: len(inbox.subscribed) == 2)
        await eventually(lambda: len(inbox.publications) == 2)
        await asyncio.sleep(0.2)
        assert [p.data["score"] for p in inbox.publications] == ["1-1", "2-2"]
        await client.disconnect()
