"""Socket.IO on two gateway replicas over real Redis: stock socket.io-client sockets exchange events
with acks, one moves to the other replica when its gateway is killed and recovers what it missed
exactly once (`socket.recovered`), and a native-protocol client sees the same stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from tsunagu_core.testing_clients import subscribed

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
JS = Path(__file__).parent / "js"


def token(user: str, channels: list[str]) -> str:
    return jwt.encode({"sub": user, "channels": channels, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[Any] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)


async def test_socketio_clients_across_replicas_recover_and_share_the_native_stream(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    env = {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET}
    first = start_service(["serve", "ws-gateway"], env)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(first.wait_ready)
    await asyncio.to_thread(second.wait_ready)
    room = f"r{uuid.uuid4().hex[:8]}"
    channel = f"sio:{room}"

    native = Client(f"ws://127.0.0.1:{second.port}/connection/websocket", token=token("nat", [channel]))
    inbox = Inbox()
    await native.connect()
    await subscribed(native, channel, inbox)

    node = await asyncio.create_subprocess_exec(
        "node", "socketio_client.mjs", f"http://127.0.0.1:{first.port}", f"http://127.0.0.1:{second.port}",
        token("ann", ["sio:*"]), token("bob", [channel]), room,
        cwd=JS, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert node.stdout is not None
    try:
        line = await asyncio.wait_for(node.stdout.readline(), 20)
        assert json.loads(line) == {"step": "ready"}, line
        first.process.kill()  # no goodbye: ann's gateway is gone
        line = await asyncio.wait_for(node.stdout.readline(), 25)
        result = json.loads(line)
    finally:
        if node.returncode is None:
            node.kill()
        await node.wait()
        await native.disconnect()
    assert result["ok"], result
    assert result["got"]["a"] == [0, 1, 2, 3, 4, 5, 6]  # in order, the missed ones exactly once
    assert result["got"]["b"] == [0, 1, 2, 3, 4, 5, 6]
    assert result["recovered"] is True
    assert [ack["offset"] for ack in result["acks"]] == [1, 2, 3, 4, 5, 6, 7]
    assert "permission denied" in result["denied"]["error"]
    async with asyncio.timeout(5):
        while len(inbox.data) < 7:
            await asyncio.sleep(0.02)
    assert inbox.data == [{"event": "chat", "args": [n]} for n in range(7)]
