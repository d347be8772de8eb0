"""Limits that stock SDKs run into: many subscriptions in the connect frame, the command rate, and a
gateway with no key to verify tokens."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from tsunagu_core.config import ConfigError, load_settings
from tsunagu_ws_gateway.config import GatewaySettings
from websockets.exceptions import ConnectionClosed


async def replies(ws: websockets.ClientConnection, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            message = await ws.recv()
            got += [json.loads(line) for line in str(message).splitlines() if line.strip() and line != "{}"]
    return got


async def test_connect_with_120_subscriptions_in_one_frame_subscribes_all(gateway, token) -> None:  # type: ignore[no-untyped-def]
    """What centrifuge-js sends for subscriptions made before connect(): one frame, connect first."""
    commands = [{"id": 1, "connect": {"token": token("ann", ["feed:*", "*"])}}]
    commands += [{"id": 2 + n, "subscribe": {"channel": f"feed{n}"}} for n in range(120)]
    async with websockets.connect(gateway.ws_url) as ws:
        await ws.send("\n".join(json.dumps(c) for c in commands))
        got = await replies(ws, 121)
    assert [r["id"] for r in got] == list(range(1, 122))
    assert all("subscribe" in r for r in got[1:]), [r for r in got if "error" in r][:3]


async def test_commands_past_the_frame_limit_get_error_111_and_the_connection_stays(  # type: ignore[no-untyped-def]
    start_gateway, token
) -> None:
    settings = {"max_commands_per_frame": 10, "max_channels_per_client": 8}
    async with start_gateway(**settings) as gw, websockets.connect(gw.ws_url) as ws:
        commands = [{"id": 1, "connect": {"token": token("ann", ["*"])}}]
        commands += [{"id": 2 + n, "subscribe": {"channel": f"news{n}"}} for n in range(14)]
        await ws.send("\n".join(json.dumps(c) for c in commands))
        got = await replies(ws, 15)
        assert all("subscribe" in r for r in got[1:9])
        assert got[9]["error"]["code"] == 106  # the 9th subscription: over the channel limit
        assert [r["error"]["code"] for r in got[10:]] == [111] * 5
        assert "more than 10 commands in one frame" in got[10]["error"]["message"]
        await ws.send(json.dumps({"id": 99, "presence_stats": {"channel": "news0"}}))
        (after,) = await replies(ws, 1)
        assert after["id"] == 99  # still connected: answered (here with an error: no presence in news)


async def test_over_the_command_rate_gets_111_then_3013_when_the_client_keeps_on(  # type: ignore[no-untyped-def]
    start_gateway, token
) -> None:
    async with start_gateway(commands_per_second=5) as gw, websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token("ann", ["*"])}}))
        await replies(ws, 1)
        await ws.send("\n".join(json.dumps({"id": 2 + n, "ping": {}}) for n in range(12)))
        got = await replies(ws, 12)
        codes = [r.get("error", {}).get("code") for r in got]
        assert codes.count(None) == 9 and codes[9:] == [111, 111, 111]  # burst 10: connect + 9 pings
        await ws.send("\n".join(json.dumps({"id": 100 + n, "ping": {}}) for n in range(20)))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3013


def test_a_frame_limit_below_the_channel_limit_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_GATEWAY_MAX_COMMANDS_PER_FRAME", "100")
    with pytest.raises(ConfigError, match="TSUNAGU_GATEWAY_MAX_COMMANDS_PER_FRAME=100 must exceed"):
        load_settings(GatewaySettings)


async def test_a_gateway_without_a_token_key_says_so(start_gateway, token, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("WARNING")
    async with start_gateway(token_hmac_secret="") as gw:
        assert any("no key verifies tokens" in r.getMessage() for r in caplog.records)
        async with httpx.AsyncClient() as http:
            ready = (await http.get(gw.http_url + "/readyz")).json()
        assert "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET" in ready["warnings"]["tokens"]
        async with websockets.connect(gw.ws_url) as ws:
            await ws.send(json.dumps({"id": 1, "connect": {"token": token("ann")}}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            3500,
            "invalid token: the gateway has no key to verify tokens",
        )


def shed_count(metrics: str) -> float:
    """Connects shed by this process, every protocol (the counter is the process's, not one gateway's)."""
    prefix = "tsunagu_gateway_connects_shed_total{"
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


async def test_connects_over_the_node_rate_are_shed_with_3013_and_the_sdk_comes_back(  # type: ignore[no-untyped-def]
    start_gateway, token
) -> None:
    """A reconnect storm: connects past the bucket are closed with 3013 before their token is looked at,
    and the stock SDK takes 3013 as "reconnect later": it backs off and gets in once the bucket refills."""
    from centrifuge import Client

    async with start_gateway(connect_rate=0.5, connect_burst=2) as gw, httpx.AsyncClient(base_url=gw.http_url) as api:
        shed_before = shed_count((await api.get("/metrics")).text)
        admitted = [await websockets.connect(gw.ws_url) for _ in range(2)]
        for ws in admitted:
            await ws.send(json.dumps({"id": 1, "connect": {"token": token("ann", ["*"])}}))
            assert "connect" in (await replies(ws, 1))[0]
        async with websockets.connect(gw.ws_url) as shed:
            # A bad token: had the credential been checked, this would be 3500 (do not reconnect).
            await shed.send(json.dumps({"id": 1, "connect": {"token": "not-a-token"}}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(shed.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 3013 and "too many connects" in closed.value.rcvd.reason
        assert shed_count((await api.get("/metrics")).text) == shed_before + 1

        # Empty the bucket, then let the SDK in: it is shed at least once and reconnects on its own.
        while await _connect_once(gw.ws_url, token("ann", ["*"])):
            pass
        shed_before = shed_count((await api.get("/metrics")).text)
        client = Client(gw.ws_url, token=token("bob", ["*"]), min_reconnect_delay=0.1)
        await client.connect()
        await client.ready(timeout=10)
        assert shed_count((await api.get("/metrics")).text) > shed_before, "the SDK was never shed"
        await client.disconnect()
        for ws in admitted:
            await ws.close()


async def _connect_once(url: str, token: str) -> bool:
    """True if the gateway let this connect in."""
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        try:
            return "connect" in (await replies(ws, 1))[0]
        except ConnectionClosed:
            return False
