"""A subscribe that reads history ahead of the fan-out: with Redis the publish script appends to history
and publishes in one step, but the pub/sub message can reach this node after a subscriber's history read
(a busy node in a reconnect storm). The subscriber recovers the publication from history; the late
fan-out copy must not reach it a second time (Centrifugo skips offsets a subscriber already has)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import websockets
from tsunagu_core.broker import Publication

from .conftest import API_KEY, make_token, running_gateway


class LateFanOut:
    """Stands between the broker and the node: holds the fan-out of `channel` until `release`."""

    def __init__(self, node: Any, channel: str) -> None:
        self.node = node
        self.channel = channel
        self.held: list[Publication] = []
        self.holding = False

    async def on_publication(self, channel: str, publication: Publication) -> None:
        if self.holding and channel == self.channel:
            self.held.append(publication)
            return
        await self.node.on_publication(channel, publication)

    async def release(self) -> None:
        self.holding = False
        for publication in self.held:
            await self.node.on_publication(self.channel, publication)
        self.held.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)


async def frames(ws: websockets.ClientConnection, timeout: float = 0.5) -> list[dict[str, Any]]:
    """What arrives within `timeout` (pings left out)."""
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                got += [
                    json.loads(line) for line in str(await ws.recv()).splitlines() if line.strip() not in ("", "{}")
                ]
    except TimeoutError:
        return got


def ns(items: list[dict[str, Any]]) -> list[int]:
    """The `n` of every publication in these frames, replies' recovered ones included, in arrival order."""
    found = []
    for item in items:
        for pub in item.get("subscribe", {}).get("publications", []):
            found.append(pub["data"]["n"])
        if "pub" in item.get("push", {}):
            found.append(item["push"]["pub"]["data"]["n"])
    return found


async def test_a_publication_recovered_from_history_is_not_delivered_again_when_its_fan_out_comes_late() -> None:
    channel = "feed:lag"
    async with (
        running_gateway(namespaces={"feed": {}}) as gw,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as api,
    ):
        node = gw.broker.handler  # type: ignore[attr-defined]
        late = LateFanOut(node, channel)
        gw.broker.set_handler(late)

        async def publish(n: int) -> None:
            body = {"channel": channel, "data": {"n": n}}
            assert "result" in (await api.post("/api/publish", headers={"X-API-Key": API_KEY}, json=body)).json()

        url = f"ws://127.0.0.1:{gw.port}/connection/websocket"
        token = make_token("ann", ["feed:*"])
        async with websockets.connect(url) as first, websockets.connect(url) as second:
            subscribe = {"channel": channel, "recoverable": True}
            await first.send(json.dumps({"id": 1, "connect": {"token": token}}) + "\n"
                             + json.dumps({"id": 2, "subscribe": subscribe}))  # fmt: skip
            subscribed = next(f for f in await frames(first) if "subscribe" in f)["subscribe"]
            await publish(0)
            assert ns(await frames(first)) == [0]
            # 1 and 2 are in history; their fan-out has not reached the node yet.
            late.holding = True
            await publish(1)
            await publish(2)
            recover = {"channel": channel, "recover": True, "offset": 1, "epoch": subscribed["epoch"]}
            await second.send(json.dumps({"id": 1, "connect": {"token": token}}) + "\n"
                              + json.dumps({"id": 2, "subscribe": recover}))  # fmt: skip
            reply = await frames(second)
            assert [f["subscribe"].get("recovered") for f in reply if "subscribe" in f] == [True]
            await late.release()
            await publish(3)
            await publish(4)
            assert ns(reply + await frames(second)) == [1, 2, 3, 4], "the late fan-out was delivered again"
            assert ns(await frames(first)) == [1, 2, 3, 4]  # a subscriber from before gets everything once
