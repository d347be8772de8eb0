"""stream-ingest application factory: the relay's consumers, the shutdown flush, the HTTP answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from tsunagu_core.bus import Subscription
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_stream_ingest.demo_feed import DemoTicker, demo_mapping
from tsunagu_stream_ingest.ingest import Relay

SERVICE = "stream-ingest"
NEEDS = ("bus", "broker")

log = logging.getLogger("tsunagu.stream_ingest")


def create_app(runtime: Runtime, settings: IngestSettings) -> FastAPI:
    ticker: DemoTicker | None = None
    if settings.demo_feed:
        ticker = DemoTicker(runtime.bus, settings.demo_feed_topic, settings.demo_feed_symbols, settings.demo_feed_rate)
        if all(m.topic != settings.demo_feed_topic for m in settings.mappings):
            with_demo = [*settings.mappings, demo_mapping(settings.demo_feed_topic)]
            settings = settings.model_copy(update={"mappings": with_demo})
    relay = Relay(settings, runtime.bus, runtime.broker)

    async def consume() -> list[Subscription]:
        await runtime.wait_ready(NEEDS)
        if runtime.settings.bus != "kafka" and any(m.is_pattern for m in relay.mappings):
            log.warning("topic patterns need the Kafka bus; the memory bus takes them as literal names")
        subscriptions: list[Subscription] = []
        try:
            for _ in range(settings.consumers):
                subscriptions.append(await runtime.bus.consume(relay.topics, settings.consumer_group, relay.handle))
        except BaseException:
            for subscription in subscriptions:
                await subscription.stop()
            raise
        log.info("relaying %s in group %s", ", ".join(relay.topics), settings.consumer_group)
        return subscriptions

    @asynccontextmanager
    async def relaying() -> AsyncIterator[None]:
        if not relay.mappings:
            log.warning("no mappings configured (TSUNAGU_INGEST_MAPPINGS): nothing is relayed")
            yield
            return
        consumer = asyncio.create_task(consume(), name="stream-ingest-consumers")
        try:
            yield
        finally:
            if consumer.done() and not consumer.cancelled() and consumer.exception() is None:
                # Stopping a consumer lets the record in hand finish and commits what was handled.
                for subscription in consumer.result():
                    await subscription.stop()
            else:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await consumer
            try:
                async with asyncio.timeout(settings.shutdown_flush):
                    flushed = await relay.flush()
                if flushed:
                    log.info("published %d values held by conflation", flushed)
            except TimeoutError:
                log.error("values held by conflation were not all published within %.1fs", settings.shutdown_flush)

    @asynccontextmanager
    async def demo_quotes() -> AsyncIterator[None]:
        if ticker is None:
            yield
            return

        async def write_when_ready() -> None:
            await runtime.wait_ready(NEEDS)
            log.info("demo feed: %d symbols on %s", len(ticker.prices), ticker.topic)
            await ticker.run()

        task = asyncio.create_task(write_when_ready(), name="stream-ingest-demo-feed")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS, hooks=[relaying, demo_quotes])
    app.state.settings = settings
    app.state.relay = relay

    @app.get("/v1/mappings", tags=["stream-ingest"])
    async def mappings() -> dict[str, Any]:
        """The configured topic-to-channel mappings and the consumer group."""
        return {
            "group": settings.consumer_group,
            "mappings": [m.model_dump() | {"name": m.label} for m in relay.mappings],
        }

    return app
