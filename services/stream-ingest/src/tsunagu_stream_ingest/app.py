"""stream-ingest application factory: the relay's consumers, the shutdown flush, the HTTP answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from tsunagu_core.bus import BatchPolicy
from tsunagu_core.lifecycle import Runtime, consumer_hook, create_service_app, internal_api
from tsunagu_core.proxies import parse_networks
from tsunagu_core.tls import ServerTls

from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_stream_ingest.demo_feed import DemoTicker, demo_mapping
from tsunagu_stream_ingest.hl7_feed import Hl7Feed, MllpListener
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

    def topics() -> list[str]:
        if runtime.settings.bus != "kafka" and any(m.is_pattern for m in relay.mappings):
            log.warning("topic patterns need the Kafka bus; the memory bus takes them as literal names")
        return relay.topics

    consumers = consumer_hook(
        runtime,
        needs=NEEDS,
        topics=topics,
        group=settings.consumer_group,
        batch_handler=relay.handle_batch,
        consumers=settings.consumers,
        batch=BatchPolicy(max_messages=settings.batch_size),
        name="stream-ingest-consumers",
    )

    @asynccontextmanager
    async def relaying() -> AsyncIterator[None]:
        if not relay.mappings:
            log.warning("no mappings configured (TSUNAGU_INGEST_MAPPINGS): nothing is relayed")
            yield
            return
        try:
            # Leaving it lets the batches in hand finish and commits what was handled.
            async with consumers():
                yield
        finally:
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

    # HL7 v2 over MLLP (hl7_feed.py): a dependency, so /readyz says whether the port listens.
    needs: tuple[str, ...] = NEEDS
    listener: MllpListener | None = None
    # MLLP over TLS with the service's server certificate; a rotated one is loaded into the live context.
    mllp_tls = ServerTls.from_settings(runtime.settings) if settings.mllp_port and settings.mllp_tls else None
    if settings.mllp_port:
        feed = Hl7Feed(
            runtime.bus,
            runtime.broker,
            history_size=settings.mllp_history_size,
            history_ttl=settings.mllp_history_ttl,
            max_bytes=settings.mllp_max_message_bytes,
        )
        listener = MllpListener(
            feed,
            settings.mllp_host,
            settings.mllp_port,
            idle_timeout=settings.mllp_idle_timeout,
            senders=parse_networks(settings.mllp_senders, "TSUNAGU_INGEST_MLLP_SENDERS"),
            before_start=lambda: runtime.wait_ready(NEEDS),
            ssl_context=mllp_tls.context if mllp_tls is not None else None,
        )
        runtime.add_dependency("hl7-mllp", listener)
        needs = (*NEEDS, "hl7-mllp")

    @asynccontextmanager
    async def mllp() -> AsyncIterator[None]:
        watcher = None
        if mllp_tls is not None:
            interval = runtime.settings.server_tls_reload_interval
            watcher = asyncio.create_task(mllp_tls.watch(interval), name="stream-ingest-mllp-tls")
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if listener is not None:
                await listener.close()  # before the bus and broker close

    app = create_service_app(
        service=SERVICE, runtime=runtime, needs=needs, hooks=[relaying, demo_quotes, mllp], **internal_api(runtime)
    )
    app.state.settings = settings
    app.state.relay = relay
    app.state.mllp = listener
    app.state.mllp_tls = mllp_tls

    @app.get("/v1/mappings", tags=["stream-ingest"])
    async def mappings() -> dict[str, Any]:
        """The configured topic-to-channel mappings and the consumer group."""
        return {
            "group": settings.consumer_group,
            "mappings": [m.model_dump() | {"name": m.label} for m in relay.mappings],
        }

    return app
