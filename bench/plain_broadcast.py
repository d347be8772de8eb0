"""The baseline of the broadcast benchmark: a plain python-websockets server that speaks just enough
of the protocol (connect, subscribe, publish) and fans out with a per-subscriber `await send()` loop,
encoding each publication once. What a hand-written gateway looks like before any of our work."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from functools import partial

from websockets.asyncio.server import ServerConnection, serve

dumps = partial(json.dumps, separators=(",", ":"))
subscribers: dict[str, set[ServerConnection]] = defaultdict(set)
offsets: dict[str, int] = defaultdict(int)


async def handle(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            text = message if isinstance(message, str) else message.decode()
            for line in text.split("\n"):
                command = json.loads(line)
                command_id = command.get("id", 0)
                if "connect" in command:
                    await ws.send(dumps({"id": command_id, "connect": {"client": str(id(ws))}}))
                elif "subscribe" in command:
                    subscribers[command["subscribe"]["channel"]].add(ws)
                    await ws.send(dumps({"id": command_id, "subscribe": {}}))
                elif "publish" in command:
                    channel = command["publish"]["channel"]
                    offsets[channel] += 1
                    pub = {"data": command["publish"]["data"], "offset": offsets[channel]}
                    frame = dumps({"push": {"channel": channel, "pub": pub}})
                    for subscriber in list(subscribers[channel]):
                        try:
                            await subscriber.send(frame)
                        except Exception:
                            subscribers[channel].discard(subscriber)
                    await ws.send(dumps({"id": command_id, "publish": {}}))
    finally:
        for channel_subscribers in subscribers.values():
            channel_subscribers.discard(ws)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    async with serve(handle, "127.0.0.1", args.port, max_queue=None, ping_interval=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
