"""Proxy hooks: the application's backend decides (Centrifugo's HTTP proxy requests, JSON).

A real FastAPI backend on a loopback port answers connect, refresh, subscribe, publish, sub_refresh and
rpc; the stock centrifuge-python SDK connects through the gateway. The backend stopped or slow is refused
with error 100 (temporary), never let in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from centrifuge import (
    Client,
    ClientState,
    SubscriptionState,
)
from centrifuge.exceptions import ReplyError
from tsunagu_core.testing import eventually, free_port
from tsunagu_ws_gateway.config import DEFAULT_NAMESPACES

from .conftest import API_KEY, RunningGateway, make_token, running_gateway
from .hook_backend import HookBackend, hook_backend
from .sdk_events import Events, Inbox


def namespaces(**app: Any) -> dict[str, Any]:
    """The default namespaces plus `app` (subscribed and published through hooks)."""
    return {**DEFAULT_NAMESPACES, "app": {"history_size": 10, **app}}


@contextlib.asynccontextmanager
async def gateway_with(backend: HookBackend, **settings: Any) -> AsyncIterator[RunningGateway]:
    proxies = {hook: backend.proxy(hook, timeout=1.0) for hook in ("connect", "subscribe", "publish", "rpc")}
    proxies |= settings.pop("proxies", {})
    async with running_gateway(proxies=proxies, **settings) as gateway:
        yield gateway


async def publish_by_api(gateway: RunningGateway, channel: str, data: Any, **extra: Any) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url, headers={"X-API-Key": API_KEY}) as api:
        answer = await api.post("/api/publish", json={"channel": channel, "data": data, **extra})
        assert answer.status_code == 200 and "error" not in answer.json(), answer.text


async def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    """A sample of the gateway's /metrics (0 when absent)."""
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        text = (await http.get("/metrics")).text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if got == wanted:
                return float(value)
    return 0.0


def allow_ann(body: dict[str, Any]) -> dict[str, Any]:
    return {"result": {"user": "ann", "info": {"role": "editor"}, "meta": {"tenant": "t1"}}}


# connect


async def test_backend_lets_a_client_without_a_token_in_and_subscribes_it() -> None:
    async with hook_backend() as backend:
        backend.answers["connect"] = lambda body: {
            "result": {
                "user": "ann",
                "info": {"role": "editor"},
                "data": {"welcome": body["data"]["device"]},
                "meta": {"tenant": "t1"},
                "channels": ["app:news"],
            }
        }
        async with gateway_with(backend, connect_proxy="connect", namespaces=namespaces()) as gateway:
            events = Events()
            client = Client(gateway.ws_url, events=events, data={"device": "d1"}, headers={"X-Tenant": "t1"})
            await client.connect()
            await client.ready(timeout=5)
            assert events.connected[0].data == {"welcome": "d1"}
            await eventually(lambda: [s.channel for s in events.server_subscribed] == ["app:news"])
            await publish_by_api(gateway, "app:news", {"n": 1})
            await eventually(lambda: len(events.server_publications) == 1)
            publication = events.server_publications[0].pub
            assert publication.data == {"n": 1}
            await client.disconnect()
        [request] = backend.received("connect")
        assert request["transport"] == "websocket" and request["protocol"] == "json"
        assert request["data"] == {"device": "d1"} and request["name"] == "python" and request["client"]
        # The handshake header the proxy names is passed on; the others are not.
        [headers] = backend.headers_of("connect")
        assert "x-tenant" not in headers  # not listed in http_headers


async def test_listed_handshake_headers_and_meta_reach_the_backend() -> None:
    async with hook_backend() as backend:
        backend.answers["connect"] = allow_ann
        backend.answers["subscribe"] = lambda body: {"result": {}}
        proxies = {
            "connect": backend.proxy("connect", http_headers=["X-Tenant"], static_headers={"X-Gateway": "g1"}),
            "subscribe": backend.proxy("subscribe", http_headers=["X-Tenant"]),
        }
        async with gateway_with(
            backend, proxies=proxies, connect_proxy="connect", namespaces=namespaces(subscribe_proxy="subscribe")
        ) as gateway:
            client = Client(gateway.ws_url, headers={"X-Tenant": "t1", "X-Other": "no"})
            await client.connect()
            sub = client.new_subscription("app:room")
            await sub.subscribe()
            await sub.ready(timeout=5)
            await client.disconnect()
        [connect_headers] = backend.headers_of("connect")
        assert connect_headers["x-tenant"] == "t1" and connect_headers["x-gateway"] == "g1"
        assert "x-other" not in connect_headers
        [subscribe] = backend.received("subscribe")
        assert subscribe["user"] == "ann" and subscribe["channel"] == "app:room"
        # The connect answer's meta goes with every later call about the connection.
        assert subscribe["meta"] == {"tenant": "t1"}
        assert backend.headers_of("subscribe")[0]["x-tenant"] == "t1"


async def test_backend_refuses_with_an_error_or_a_disconnect() -> None:
    async with hook_backend() as backend, gateway_with(backend, connect_proxy="connect") as gateway:
        backend.answers["connect"] = lambda body: {"error": {"code": 4403, "message": "not on the guest list"}}
        events = Events()
        client = Client(gateway.ws_url, events=events)
        await client.connect()
        await eventually(lambda: bool(events.disconnected))
        assert events.disconnected[0].code == 4403 and client.state == ClientState.DISCONNECTED

        backend.answers["connect"] = lambda body: {"disconnect": {"code": 4501, "reason": "banned"}}
        events = Events()
        client = Client(gateway.ws_url, events=events)
        await client.connect()
        await eventually(lambda: bool(events.disconnected))
        assert events.disconnected[0].code == 4501 and events.disconnected[0].reason == "banned"
        assert client.state == ClientState.DISCONNECTED


async def test_an_answer_without_a_result_is_no_yes() -> None:
    async with hook_backend() as backend:
        backend.answers["connect"] = lambda body: {}
        backend.answers["subscribe"] = lambda body: {"result": None}
        async with gateway_with(
            backend, connect_proxy="connect", namespaces=namespaces(subscribe_proxy="subscribe")
        ) as gateway:
            events = Events()
            client = Client(gateway.ws_url, events=events, max_reconnect_delay=0.5)
            await client.connect()
            await eventually(lambda: bool(events.errors))
            error = events.errors[0].error
            assert isinstance(error, ReplyError) and error.code == 100 and events.connected == []
            await client.disconnect()
            member = Client(gateway.ws_url, token=make_token("ann", ["app:*"]))
            await member.connect()
            inbox = Inbox()
            sub = member.new_subscription("app:room", events=inbox)
            await sub.subscribe()
            await eventually(lambda: bool(inbox.errors))
            assert inbox.errors[0].error.code == 100 and inbox.subscribed == []
            await member.disconnect()


async def test_a_client_with_a_token_is_not_asked_about() -> None:
    async with hook_backend() as backend:
        async with gateway_with(backend, connect_proxy="connect") as gateway:
            client = Client(gateway.ws_url, token=make_token("bob", ["chat:*"]))
            await client.connect()
            await client.ready(timeout=5)
            await client.disconnect()
        assert backend.received("connect") == []


async def test_backend_down_or_slow_is_refused_with_a_temporary_error() -> None:
    port = free_port()  # nothing listens there
    async with hook_backend() as slow:

        async def too_late(body: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(3)
            return allow_ann(body)

        slow.answers["connect"] = too_late
        proxies = {
            "down": {"endpoint": f"http://127.0.0.1:{port}/connect", "timeout": 1.0},
            "slow": slow.proxy("connect", timeout=0.3),
        }
        for proxy, outcome in (("down", "unavailable"), ("slow", "timeout")):
            async with running_gateway(proxies=proxies, connect_proxy=proxy) as gateway:
                before = await metric(
                    gateway, "tsunagu_gateway_proxy_calls_total", hook="connect", transport="http", outcome=outcome
                )
                events = Events()
                client = Client(gateway.ws_url, events=events, max_reconnect_delay=0.5)
                await client.connect()
                await eventually(lambda: len(events.errors) >= 2, timeout=10)  # noqa: B023
                error = events.errors[0].error
                assert isinstance(error, ReplyError) and error.code == 100 and error.temporary
                # Never let in: the SDK keeps retrying.
                assert events.connected == [] and client.state == ClientState.CONNECTING
                await client.disconnect()
                after = await metric(
                    gateway, "tsunagu_gateway_proxy_calls_total", hook="connect", transport="http", outcome=outcome
                )
                assert after >= before + 2


# subscribe


async def test_subscribe_hook_allows_with_data_refuses_or_falls_back() -> None:
    async with hook_backend() as backend:

        def decide(body: dict[str, Any]) -> dict[str, Any]:
            if body["channel"] == "app:secret":
                return {"error": {"code": 103, "message": "permission denied"}}
            return {"result": {"data": {"seats": 3}, "info": {"table": body["channel"]}}}

        backend.answers["subscribe"] = decide
        async with gateway_with(backend, namespaces=namespaces(subscribe_proxy="subscribe")) as gateway:
            # The token grants no channel: the backend decides alone.
            client = Client(gateway.ws_url, token=make_token("ann", []))
            await client.connect()
            inbox = Inbox()
            sub = client.new_subscription("app:table", events=inbox, data={"want": "seat"})
            await sub.subscribe()
            await sub.ready(timeout=5)
            assert inbox.subscribed[0].data == {"seats": 3}
            await publish_by_api(gateway, "app:table", {"n": 1})
            await eventually(lambda: len(inbox.publications) == 1)

            refused = Inbox()
            secret = client.new_subscription("app:secret", events=refused)
            await secret.subscribe()
            await eventually(lambda: secret.state == SubscriptionState.UNSUBSCRIBED and bool(refused.unsubscribed))
            assert refused.unsubscribed[0].code == 103
            await client.disconnect()
        [allowed, _] = backend.received("subscribe")
        assert allowed["user"] == "ann" and allowed["data"] == {"want": "seat"}


async def test_subscribe_hook_down_refuses_unless_the_proxy_falls_back_on_permissions() -> None:
    port = free_port()
    down = {"endpoint": f"http://127.0.0.1:{port}/subscribe", "timeout": 0.5}
    for fallback, subscribed in (("refuse", False), ("permissions", True)):
        async with running_gateway(
            proxies={"down": {**down, "fallback": fallback}}, namespaces=namespaces(subscribe_proxy="down")
        ) as gateway:
            client = Client(gateway.ws_url, token=make_token("ann", ["app:*"]))
            await client.connect()
            inbox = Inbox()
            sub = client.new_subscription("app:room", events=inbox)
            await sub.subscribe()
            if subscribed:
                await sub.ready(timeout=5)
            else:
                await eventually(lambda: bool(inbox.errors))  # noqa: B023
                error = inbox.errors[0].error
                assert isinstance(error, ReplyError) and error.code == 100 and error.temporary
                assert sub.state == SubscriptionState.SUBSCRIBING
            await client.disconnect()


# publish and rpc


async def test_publish_hook_rewrites_or_refuses() -> None:
    async with hook_backend() as backend:

        def moderate(body: dict[str, Any]) -> dict[str, Any]:
            text = body["data"]["text"]
            if "spam" in text:
                return {"error": {"code": 4400, "message": "looks like spam"}}
            return {"result": {"data": {"text": text.upper(), "by": body["user"]}, "tags": {"lang": "en"}}}

        backend.answers["publish"] = moderate
        async with gateway_with(backend, namespaces=namespaces(publish_proxy="publish")) as gateway:
            client = Client(gateway.ws_url, token=make_token("ann", ["app:*"]))
            await client.connect()
            inbox = Inbox()
            sub = client.new_subscription("app:chat", events=inbox)
            await sub.subscribe()
            await sub.ready(timeout=5)
            await sub.publish({"text": "hello"})
            await eventually(lambda: len(inbox.publications) == 1)
            publication = inbox.publications[0]
            assert publication.data == {"text": "HELLO", "by": "ann"} and publication.tags == {"lang": "en"}
            with pytest.raises(ReplyError) as refused:
                await sub.publish({"text": "buy spam"})
            assert refused.value.code == 4400 and "spam" in refused.value.message
            history = await sub.history(limit=10)
            assert [p.data for p in history.publications] == [{"text": "HELLO", "by": "ann"}]
            await client.disconnect()


async def test_rpc_hook_answers_methods_without_a_route() -> None:
    async with hook_backend() as backend:

        def calc(body: dict[str, Any]) -> dict[str, Any]:
            if body["method"] != "sum":
                return {"error": {"code": 104, "message": "method not found"}}
            return {"result": {"data": {"sum": sum(body["data"]["terms"]), "for": body["user"]}}}

        backend.answers["rpc"] = calc
        async with gateway_with(backend, rpc_proxy="rpc") as gateway:
            client = Client(gateway.ws_url, token=make_token("ann", []))
            await client.connect()
            answer = await client.rpc("sum", {"terms": [1, 2, 3]})
            assert answer.data == {"sum": 6, "for": "ann"}
            with pytest.raises(ReplyError) as unknown:
                await client.rpc("nope", {})
            assert unknown.value.code == 104
            await client.disconnect()


# refresh and sub_refresh


async def test_refresh_hook_extends_a_connection_and_ends_it_when_told() -> None:
    async with hook_backend() as backend:
        backend.answers["connect"] = lambda body: {"result": {"user": "ann", "expire_at": int(time.time()) + 1}}
        connects_seen: list[int] = []

        def refresh(body: dict[str, Any]) -> dict[str, Any]:
            connects_seen.append(len(backend.received("connect")))
            if len(connects_seen) > 2:
                return {"result": {"expired": True}}
            return {"result": {"expire_at": int(time.time()) + 1, "info": {"refreshed": len(connects_seen)}}}

        backend.answers["refresh"] = refresh
        async with gateway_with(
            backend, proxies={"refresh": backend.proxy("refresh")}, connect_proxy="connect", refresh_proxy="refresh"
        ) as gateway:
            events = Events()
            client = Client(gateway.ws_url, events=events)
            await client.connect()
            await client.ready(timeout=5)
            # Extended twice server side (the SDK is never asked for a token), then told it expired: closed
            # with 3005, and the SDK connects again (through the connect hook).
            await eventually(lambda: len(events.connected) >= 2, timeout=15)
            await client.disconnect()
        assert connects_seen[:3] == [1, 1, 1]
        assert backend.received("refresh")[0]["user"] == "ann"


async def test_sub_refresh_hook_extends_a_subscription_until_it_says_expired() -> None:
    async with hook_backend() as backend:
        backend.answers["subscribe"] = lambda body: {"result": {"expire_at": int(time.time()) + 1}}
        refreshed: list[dict[str, Any]] = []

        def sub_refresh(body: dict[str, Any]) -> dict[str, Any]:
            refreshed.append(body)
            if len(refreshed) >= 2:
                return {"result": {"expired": True}}
            return {"result": {"expire_at": int(time.time()) + 1}}

        backend.answers["sub_refresh"] = sub_refresh
        async with gateway_with(
            backend,
            proxies={"sub_refresh": backend.proxy("sub_refresh")},
            namespaces=namespaces(subscribe_proxy="subscribe", sub_refresh_proxy="sub_refresh"),
        ) as gateway:
            client = Client(gateway.ws_url, token=make_token("ann", []))
            await client.connect()
            inbox = Inbox()
            sub = client.new_subscription("app:ticker", events=inbox)
            await sub.subscribe()
            await sub.ready(timeout=5)
            await eventually(lambda: len(refreshed) >= 2, timeout=10)
            # Told it expired: the subscription ends (the SDK resubscribes, through the subscribe hook).
            await eventually(lambda: len(backend.received("subscribe")) >= 2, timeout=10)
            await client.disconnect()
        assert refreshed[0]["channel"] == "app:ticker" and refreshed[0]["user"] == "ann"


def test_settings_refuse_a_hook_naming_an_unknown_proxy() -> None:
    from pydantic import ValidationError
    from tsunagu_ws_gateway.config import GatewaySettings

    with pytest.raises(ValidationError, match="does not define"):
        GatewaySettings(connect_proxy="nowhere")
    with pytest.raises(ValidationError, match="only subscribe and publish"):
        GatewaySettings(proxies={"c": {"endpoint": "http://app/c", "fallback": "permissions"}}, connect_proxy="c")
    assert json.dumps(GatewaySettings().proxies) == "{}"
