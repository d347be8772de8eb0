"""GraphQL at /graphql: graphql-transport-ws frames over WebSocket (close codes included) and HTTP POST."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest
import websockets

from .conftest import API_KEY, make_token, running_gateway

PROTOCOL = [websockets.Subprotocol("graphql-transport-ws")]


async def _recv(ws: websockets.ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    return message


async def _closed_with(ws: websockets.ClientConnection) -> int:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:  # what was sent before the close is read first
                await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def test_subscription_queries_mutations_and_errors_over_websocket() -> None:
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    async with (
        running_gateway() as gw,
        websockets.connect(f"ws://127.0.0.1:{gw.port}/graphql", subprotocols=PROTOCOL) as ws,
    ):
        token = make_token("ann", ["chat:*"])
        await ws.send(orjson.dumps({"type": "connection_init", "payload": {"token": token}}).decode())
        ack = await _recv(ws)
        assert ack["type"] == "connection_ack" and ack["payload"]["user"] == "ann"
        query = "subscription ($c: String!) { channel(name: $c) { channel offset data } }"
        subscribe = {"id": "s", "type": "subscribe", "payload": {"query": query, "variables": {"c": channel}}}
        await ws.send(orjson.dumps(subscribe).decode())
        await asyncio.sleep(0.2)  # the subscription is live once its resolver has subscribed
        mutation = "mutation ($c: String!, $d: JSON!) { publish(channel: $c, data: $d) { offset } }"
        for n in range(2):
            payload = {"query": mutation, "variables": {"c": channel, "d": {"n": n}}}
            await ws.send(orjson.dumps({"id": f"m{n}", "type": "subscribe", "payload": payload}).decode())
        async with httpx.AsyncClient() as http:
            body = {"channel": channel, "data": {"n": 2}}
            await http.post(f"{gw.http_url}/api/publish", json=body, headers={"X-API-Key": API_KEY})
        nexts: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while len(nexts) < 3:
                message = await _recv(ws)
                if message["type"] == "next" and message["id"] == "s":
                    nexts.append(message["payload"]["data"]["channel"])
        assert nexts == [{"channel": channel, "offset": n + 1, "data": {"n": n}} for n in range(3)]

        denied = {"query": query, "variables": {"c": "chat:dialog#zed,yan"}}
        await ws.send(orjson.dumps({"id": "d", "type": "subscribe", "payload": denied}).decode())
        async with asyncio.timeout(5):
            while True:
                message = await _recv(ws)
                if message.get("id") == "d":
                    break
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["message"] == "permission denied" and errors[0]["extensions"]["code"] == 103

        # 4409: an operation id that is in use.
        await ws.send(orjson.dumps(subscribe).decode())
        assert await _closed_with(ws) == 4409


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([{"type": "connection_init", "payload": {"token": "junk"}}], 4403),
        ([{"type": "subscribe", "id": "1", "payload": {"query": "{ __typename }"}}], 4401),
        ([{"type": "connection_init", "payload": {"token": "T"}}, {"type": "connection_init", "payload": {}}], 4429),
        ([{"type": "what"}], 4400),
        ([], 4408),
    ],
)
async def test_graphql_transport_ws_close_codes(messages: list[dict[str, Any]], code: int) -> None:
    async with (
        running_gateway(connect_timeout=0.5) as gw,
        websockets.connect(f"ws://127.0.0.1:{gw.port}/graphql", subprotocols=PROTOCOL) as ws,
    ):
        for message in messages:
            if message.get("payload", {}).get("token") == "T":
                message = {**message, "payload": {"token": make_token("t", ["chat:*"])}}
            await ws.send(orjson.dumps(message).decode())
        assert await _closed_with(ws) == code


async def test_http_post_with_bearer_token() -> None:
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    async with running_gateway() as gw, httpx.AsyncClient(base_url=gw.http_url) as http:
        headers = {"Authorization": f"Bearer {make_token('bob', ['chat:*'])}"}
        mutation = {"query": f'mutation {{ publish(channel: "{channel}", data: {{n: 1}}) {{ offset epoch }} }}'}
        response = await http.post("/graphql", json=mutation, headers=headers)
        assert response.status_code == 200 and response.json()["data"]["publish"]["offset"] == 1
        query = {"query": f'{{ history(channel: "{channel}", limit: 5) {{ publications {{ offset data }} offset }} }}'}
        response = await http.post("/graphql", json=query, headers=headers)
        assert response.json()["data"]["history"] == {"publications": [{"offset": 1, "data": {"n": 1}}], "offset": 1}
        denied = {"query": '{ history(channel: "chat:dialog#zed,yan") { offset } }'}
        response = await http.post("/graphql", json=denied, headers=headers)
        assert response.json()["errors"][0]["extensions"]["code"] == 103

        response = await http.post("/graphql", json=query)
        assert response.status_code == 401 and "Bearer" in response.json()["detail"]
        response = await http.post("/graphql", json=query, headers={"Authorization": "Bearer junk"})
        assert response.status_code == 401 and "invalid token" in response.json()["detail"]
