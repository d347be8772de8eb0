"""JSON-RPC 2.0 at /rpc: the sans-I/O codec, then a real gateway driven by the stock `jsonrpc-websocket`
client and by raw frames for what stock clients never send (batches, malformed input)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import jsonrpc_base
import orjson
import pytest
import websockets
from jsonrpc_websocket import Server
from tsunagu_core.broker import Publication
from tsunagu_ws_gateway.protocol import jsonrpc

from .conftest import API_KEY, make_token, running_gateway

# the codec


def test_decode_answers_malformed_input_with_the_standard_codes() -> None:
    assert isinstance(jsonrpc.decode(b"{not json", 10), jsonrpc.RpcError)
    assert jsonrpc.decode(b"{not json", 10).code == jsonrpc.PARSE_ERROR  # type: ignore[union-attr]
    assert jsonrpc.decode(b"[]", 10).code == jsonrpc.INVALID_REQUEST  # type: ignore[union-attr]
    assert jsonrpc.decode(b"[1, 2, 3]", 2).code == jsonrpc.INVALID_REQUEST  # type: ignore[union-attr]
    message = jsonrpc.decode(
        b'[1, {"jsonrpc": "1.0", "id": 7, "method": "x"}, {"jsonrpc": "2.0", "id": [1], "method": "x"},'
        b' {"jsonrpc": "2.0", "id": 8, "method": ""}, {"jsonrpc": "2.0", "id": 9, "method": "x", "params": 3},'
        b' {"jsonrpc": "2.0", "method": "ping"}, {"jsonrpc": "2.0", "id": "a", "method": "go", "params": [1]}]',
        10,
    )
    assert isinstance(message, jsonrpc.Message) and message.batch
    invalid = message.entries[:5]
    assert all(isinstance(e, jsonrpc.Invalid) and e.error.code == jsonrpc.INVALID_REQUEST for e in invalid)
    assert [getattr(e, "id", None) for e in invalid] == [None, 7, None, 8, 9]
    notification, request = message.entries[5], message.entries[6]
    assert isinstance(notification, jsonrpc.Request) and notification.notification
    assert isinstance(request, jsonrpc.Request) and request.id == "a" and request.params == [1]
    for garbage in (b"", b"\xff\xfe", b"null", b'"x"', b"12", b"{}" * 3):
        decoded = jsonrpc.decode(garbage, 10)  # never raises
        assert isinstance(decoded, jsonrpc.RpcError | jsonrpc.Message)


def test_params_by_name_or_position_and_error_mapping() -> None:
    request = jsonrpc.Request("history", ["chat:x", 5], 1)
    assert jsonrpc.params_of(request, ("channel", "limit"), 1) == {"channel": "chat:x", "limit": 5}
    assert jsonrpc.params_of(jsonrpc.Request("history", {"channel": "c"}, 1), ("channel", "limit"), 1) == {
        "channel": "c"
    }
    for bad in (jsonrpc.Request("history", [1, 2, 3], 1), jsonrpc.Request("history", {"chan": "c"}, 1)):
        error = jsonrpc.params_of(bad, ("channel", "limit"), 1)
        assert isinstance(error, jsonrpc.RpcError) and error.code == jsonrpc.INVALID_PARAMS
    assert jsonrpc.gateway_error(103, "permission denied") == jsonrpc.RpcError(
        -32003, "permission denied", {"code": 103}
    )
    assert jsonrpc.gateway_error(441, "bad signature").code == -32041
    frame = jsonrpc.publication_notification("chat:a", Publication(offset=3, data=b'{"n": 1}'))
    assert orjson.loads(frame) == {
        "jsonrpc": "2.0",
        "method": "subscription",
        "params": {"subscription": "chat:a", "result": {"channel": "chat:a", "offset": 3, "data": {"n": 1}}},
    }


# a real gateway


async def _api_publish(base: str, channel: str, data: Any) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{base}/api/publish", json={"channel": channel, "data": data}, headers={"X-API-Key": API_KEY}
        )
        assert "result" in response.json(), response.text


async def test_stock_client_subscribes_publishes_reads_history_and_gets_errors() -> None:
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    async with running_gateway() as gw:
        url = f"ws://127.0.0.1:{gw.port}/rpc?token={make_token('ann', ['chat:*'])}"
        server = Server(url)
        received: list[dict[str, Any]] = []

        def on_subscription(subscription: str, result: dict[str, Any]) -> None:
            received.append({"subscription": subscription, **result})

        server.subscription = on_subscription
        await server.ws_connect()
        try:
            assert await server.subscribe(channel=channel) == channel
            for n in range(3):
                result = await server.publish(channel, {"n": n})
                assert result["offset"] == n + 1
            await _api_publish(gw.http_url, channel, {"n": 3})
            async with asyncio.timeout(5):
                while len(received) < 4:
                    await asyncio.sleep(0.01)
            assert [r["data"] for r in received] == [{"n": n} for n in range(4)]
            assert [r["offset"] for r in received] == [1, 2, 3, 4]
            assert {r["subscription"] for r in received} == {channel}
            history = await server.history(channel=channel, limit=2)
            assert [p["data"] for p in history["publications"]] == [{"n": 0}, {"n": 1}]

            with pytest.raises(jsonrpc_base.ProtocolError) as denied:
                await server.subscribe(channel="chat:dialog#zed,yan")
            assert denied.value.args[0] == -32003 and "permission denied" in denied.value.args[1]
            with pytest.raises(jsonrpc_base.ProtocolError) as unknown:
                await server.nonsense()
            assert unknown.value.args[0] == jsonrpc.METHOD_NOT_FOUND
            with pytest.raises(jsonrpc_base.ProtocolError) as invalid:
                await server.publish(channel=channel)
            assert invalid.value.args[0] == jsonrpc.INVALID_PARAMS

            assert await server.unsubscribe(channel) is True
            await _api_publish(gw.http_url, channel, {"n": 4})
            await asyncio.sleep(0.1)
            assert len(received) == 4
        finally:
            await server.close()


async def test_raw_frames_auth_batches_and_malformed_input() -> None:
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    async with (
        running_gateway(max_channels_per_client=2) as gw,
        websockets.connect(f"ws://127.0.0.1:{gw.port}/rpc") as ws,
    ):

        async def call(message: Any) -> Any:
            await ws.send(message if isinstance(message, str | bytes) else orjson.dumps(message).decode())
            return orjson.loads(await asyncio.wait_for(ws.recv(), 5))

        answer = await call("{oops")
        assert answer["error"]["code"] == jsonrpc.PARSE_ERROR and answer["id"] is None
        answer = await call({"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {"channel": channel}})
        assert answer["error"]["code"] == -32001  # unauthorized: not authenticated yet
        answer = await call({"jsonrpc": "2.0", "id": 2, "method": "auth", "params": {"token": "junk"}})
        assert answer["error"]["code"] == -32001 and "invalid token" in answer["error"]["message"]
        token = make_token("bob", ["chat:*"])
        answer = await call({"jsonrpc": "2.0", "id": 3, "method": "auth", "params": [token]})
        assert answer["result"]["user"] == "bob"

        batch = [
            {"jsonrpc": "2.0", "id": 10, "method": "subscribe", "params": [channel]},
            {"jsonrpc": "2.0", "id": 11, "method": "publish", "params": {"channel": channel, "data": "hi"}},
            {"jsonrpc": "2.0", "method": "publish", "params": {"channel": channel, "data": "quiet"}},
            {"jsonrpc": "2.0", "id": 12, "method": "missing"},
            {"jsonrpc": "2.0", "id": 13, "method": "subscribe", "params": [f"{channel}-2"]},
            {"jsonrpc": "2.0", "id": 14, "method": "subscribe", "params": [f"{channel}-3"]},
            "junk",
        ]
        responses = await call(batch)
        by_id = {r["id"]: r for r in responses}
        assert len(responses) == 6  # the notification gets no response
        assert by_id[10]["result"] == channel and by_id[11]["result"]["offset"] == 1
        assert by_id[12]["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
        assert by_id[14]["error"]["code"] == -32006  # 106 limit exceeded: max_channels_per_client
        assert by_id[None]["error"]["code"] == jsonrpc.INVALID_REQUEST
        # The publications of the batch follow its response.
        notes = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
        assert [n["params"]["result"]["data"] for n in notes] == ["hi", "quiet"]

        await ws.send("x" * 70_000)  # larger than max_frame_bytes
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_query_token_that_is_invalid_closes_with_3500() -> None:
    async with running_gateway() as gw, websockets.connect(f"ws://127.0.0.1:{gw.port}/rpc?token=bogus") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3500
