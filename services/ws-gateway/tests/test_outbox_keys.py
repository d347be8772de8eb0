"""The offline outbox's `$publish`: a resend after a lost reply is applied once even long after a live
client's idempotency key would be forgotten."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets


async def call(ws: websockets.ClientConnection, command_id: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps({"id": command_id, method: body}))
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if reply.get("id") == command_id:
            return reply


async def test_an_outbox_key_outlives_a_live_clients_key(start_gateway, token) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(idempotency_ttl=0.5, outbox_idempotency_ttl=60) as gw, websockets.connect(gw.ws_url) as ws:
        await call(ws, 1, "connect", {"token": token("ann", ["chat:*"])})
        outbox = {"channel": "chat:keys", "data": {"text": "hi"}, "idempotency_key": "entry-1"}
        first = await call(ws, 2, "rpc", {"method": "$publish", "data": outbox})
        live = {"channel": "chat:keys", "data": {"text": "live"}, "idempotency_key": "live-1"}
        live_first = await call(ws, 3, "publish", live)
        await asyncio.sleep(1.0)  # past the live key's time, well within the outbox's
        again = await call(ws, 4, "rpc", {"method": "$publish", "data": outbox})
        assert again["rpc"]["data"] == first["rpc"]["data"], "the resent outbox entry was applied twice"
        live_again = await call(ws, 5, "publish", live)
        assert live_again["publish"]["offset"] > live_first["publish"]["offset"], "a live key is forgotten as before"
