import asyncio

from fastapi.testclient import TestClient
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_stream_ingest.app import create_app
from tsunagu_stream_ingest.config import IngestSettings


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), IngestSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "stream-ingest"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == set(("bus", "broker"))
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_port_comes_from_its_own_variable(monkeypatch) -> None:
    monkeypatch.setenv("TSUNAGU_INGEST_PORT", "18084")
    assert IngestSettings().port == 18084


async def test_the_app_relays_while_running_and_flushes_held_values_on_stop() -> None:
    import json

    import httpx
    from tsunagu_stream_ingest.mappings import IngestMapping

    runtime = Runtime(CoreSettings())
    settings = IngestSettings(mappings=[IngestMapping(topic="app.prices", max_rate=0.5)])
    app = create_app(runtime, settings)
    channel = "stream:app.prices.EURUSD"
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            described = (await client.get("/v1/mappings")).json()
        assert described["group"] == "stream-ingest"
        assert described["mappings"][0]["topic"] == "app.prices"

        async def published() -> int:
            return (await runtime.broker.history(channel, limit=0)).position.offset

        await runtime.bus.publish("app.prices", json.dumps({"n": 0}).encode(), key="EURUSD")
        async with asyncio.timeout(5):
            while await published() < 1:
                await asyncio.sleep(0.01)
        for n in (1, 2):
            await runtime.bus.publish("app.prices", json.dumps({"n": n}).encode(), key="EURUSD")
        async with asyncio.timeout(5):
            while app.state.relay.held == 0:
                await asyncio.sleep(0.01)
        # One every 2 s: the first went at once, the last is held.
        assert [json.loads(p.data) for p in (await runtime.broker.history(channel)).publications] == [{"n": 0}]
        broker = runtime.broker
    # Stopping published the held value before the broker closed.
    assert [json.loads(p.data) for p in (await broker.history(channel)).publications] == [{"n": 0}, {"n": 2}]


async def test_the_demo_feed_reaches_its_channels_through_the_relay() -> None:
    import json

    runtime = Runtime(CoreSettings())
    settings = IngestSettings(demo_feed=True, demo_feed_symbols=["AAA", "BBB"], demo_feed_rate=20)
    app = create_app(runtime, settings)
    assert [m.topic for m in app.state.relay.mappings] == ["demo.ticker"]
    async with app.router.lifespan_context(app):
        async with asyncio.timeout(5):
            while (await runtime.broker.history("stream:demo.ticker.BBB", limit=0)).position.offset < 2:
                await asyncio.sleep(0.05)
        quotes = [json.loads(p.data) for p in (await runtime.broker.history("stream:demo.ticker.AAA")).publications]
    assert quotes and all(q["symbol"] == "AAA" and q["price"] > 0 for q in quotes)
    # Conflated to at most DEMO_MAX_RATE a second although it writes 20.
    assert len(quotes) <= 8


def test_no_demo_feed_unless_asked() -> None:
    app = create_app(Runtime(CoreSettings()), IngestSettings())
    assert app.state.relay.mappings == []
