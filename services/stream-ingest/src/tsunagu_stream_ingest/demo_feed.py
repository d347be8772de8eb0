"""A built-in price ticker for demos: random-walk quotes written to a topic on the bus, which the relay
then carries to `stream:<topic>.<symbol>` like any user topic (through Kafka when the bus is Kafka)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import orjson
from tsunagu_core.bus import Bus

from tsunagu_stream_ingest.mappings import IngestMapping

log = logging.getLogger("tsunagu.stream_ingest.demo")

# Conflated like a real ticker would be: a browser needs no more than a few frames a second.
DEMO_MAX_RATE = 4.0


def demo_mapping(topic: str) -> IngestMapping:
    return IngestMapping(topic=topic, name="demo-ticker", max_rate=DEMO_MAX_RATE)


class DemoTicker:
    def __init__(self, bus: Bus, topic: str, symbols: list[str], rate: float, seed: int | None = None) -> None:
        self.bus = bus
        self.topic = topic
        self.rate = rate
        self.random = random.Random(seed)
        self.prices = {symbol: 100.0 + 10 * index for index, symbol in enumerate(symbols)}

    def quote(self, symbol: str) -> bytes:
        price = self.prices[symbol] * (1 + self.random.gauss(0, 0.002))
        self.prices[symbol] = max(round(price, 2), 0.01)
        return orjson.dumps({"symbol": symbol, "price": self.prices[symbol], "ts": int(time.time() * 1000)})

    async def run(self) -> None:
        """Writes one quote per symbol every 1/rate seconds until cancelled; a bus error is logged and retried."""
        interval = 1.0 / self.rate
        while True:
            for symbol in self.prices:
                try:
                    await self.bus.publish(self.topic, self.quote(symbol), key=symbol)
                except Exception as exc:
                    log.warning("demo quote for %s not written: %s", symbol, exc)
            await asyncio.sleep(interval)
