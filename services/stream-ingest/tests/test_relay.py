"""The relay on the memory engines and on real Kafka + Redis: order, idempotency, conflation, dead letters."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import REGISTRY
from tsunagu_core.bus import BusMessage
from tsunagu_core.testing import eventually
from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_stream_ingest.ingest import Relay
from tsunagu_stream_ingest.mappings import IngestMapping

from .conftest import Engines


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def history_data(engines: Engines, channel: str) -> list[object]:
    result = await engines.broker.history(channel)
    return [json.loads(p.data) for p in result.publications]


async def test_records_are_relayed_in_order_conflated_and_poison_goes_to_the_dlq(engines: Engines, unique: str) -> None:
    plain, hot = f"ingest.test.{unique}", f"ingest.hot.{unique}"
    settings = IngestSettings(
        mappings=[IngestMapping(topic=plain, max_record_bytes=200), IngestMapping(topic=hot, max_rate=10)],
        consumer_group=f"ingest-test-{unique}",
    )
    await engines.bus.ensure_topics([plain, hot, plain + ".dlq"])
    relay = Relay(settings, engines.bus, engines.broker)
    dead: list[BusMessage] = []

    async def collect(message: BusMessage) -> None:
        dead.append(message)

    consumers = [
        await engines.bus.consume_batches(relay.topics, settings.consumer_group, relay.handle_batch),
        await engines.bus.consume([plain + ".dlq"], f"dlq-{unique}", collect),
    ]
    try:
        for n in range(20):
            await engines.bus.publish(plain, json.dumps({"n": n}).encode(), key="k1")
            if n == 5:
                await engines.bus.publish(plain, b"{not json", key="k1")
                await engines.bus.publish(plain, json.dumps({"pad": "x" * 300}).encode(), key="k1")
        await engines.bus.publish(plain, b'{"keyless": true}')
        for n in range(200):
            await engines.bus.publish(hot, json.dumps({"n": n}).encode(), key="EURUSD")

        await eventually(lambda: len(dead) == 2, timeout=20)
        assert {m.headers["tsunagu-dlq-origin"].rsplit("/", 1)[0] for m in dead} == {f"{plain}/{dead[0].partition}"}
        reasons = sorted(m.headers["tsunagu-dlq-error"] for m in dead)
        assert reasons[0].startswith("record of") and "exceeds max_record_bytes=200" in reasons[0]
        assert reasons[1].startswith("value is not JSON")
        assert dead[0].key == b"k1" and dead[0].headers["tsunagu-dlq-mapping"] == plain

        async def relayed(channel: str, count: int) -> list[object]:
            async with asyncio.timeout(20):
                while len(data := await history_data(engines, channel)) < count:
                    await asyncio.sleep(0.05)
            return data

        # The stream went on past the poison records, in order; history keeps the last 10.
        assert await relayed(f"stream:{plain}.k1", 10) == [{"n": n} for n in range(10, 20)]
        top = await engines.broker.history(f"stream:{plain}.k1", limit=0)
        assert top.position.offset == 20
        assert await relayed(f"stream:{plain}", 1) == [{"keyless": True}]

        # Conflation: far fewer publications than records, and the final value is never lost.
        async with asyncio.timeout(20):
            while (await history_data(engines, f"stream:{hot}.EURUSD"))[-1:] != [{"n": 199}]:
                await asyncio.sleep(0.05)
        hot_top = await engines.broker.history(f"stream:{hot}.EURUSD", limit=0)
        assert 1 <= hot_top.position.offset < 100  # one when the whole burst arrived in one batch
        assert metric("tsunagu_ingest_conflated_total", mapping=hot) >= 100
    finally:
        for consumer in consumers:
            await consumer.stop()


async def test_a_redelivered_record_is_not_shown_twice_even_after_a_restart(engines: Engines, unique: str) -> None:
    topic = f"ingest.redeliver.{unique}"
    settings = IngestSettings(mappings=[IngestMapping(topic=topic)])
    channel = f"stream:{topic}.k"

    def record(offset: int, partition: int = 0) -> BusMessage:
        return BusMessage(topic, partition, offset, b"k", json.dumps({"o": offset}).encode())

    first = Relay(settings, engines.bus, engines.broker)
    for offset in range(3):
        await first.handle_batch([record(offset)])
    await first.handle_batch([record(2)])
    # A restarted relay (nothing in memory) gets the uncommitted tail again, and the next ones.
    second = Relay(settings, engines.bus, engines.broker)
    for offset in range(1, 5):
        await second.handle_batch([record(offset)])
    assert await history_data(engines, channel) == [{"o": o} for o in range(5)]
    # The idempotency key alone also holds (another partition feeding the same channel).
    third = Relay(settings, engines.bus, engines.broker)
    await third.handle_batch([record(4, partition=1)])
    await third.handle_batch([record(4, partition=1)])
    assert len(await history_data(engines, channel)) == 6


async def test_a_topic_pattern_subscribes_to_every_matching_topic(engines: Engines, unique: str) -> None:
    if engines.name != "real":
        import pytest

        pytest.skip("topic patterns are a Kafka feature (the memory bus takes topics literally)")
    prefix = f"ingest.pattern.{unique}"
    await engines.bus.ensure_topics([f"{prefix}.a", f"{prefix}.b", "ingest.unrelated." + unique])
    pattern = "^" + prefix.replace(".", "\\.") + "\\..*"
    settings = IngestSettings(mappings=[IngestMapping(topic=pattern, name=f"pattern-{unique}", format="bytes")])
    relay = Relay(settings, engines.bus, engines.broker)
    consumer = await engines.bus.consume_batches(relay.topics, f"ingest-pattern-{unique}", relay.handle_batch)
    try:
        await engines.bus.publish(f"{prefix}.a", b"\x01\x02", key="x")
        await engines.bus.publish(f"{prefix}.b", b"\x03", key="y")
        await engines.bus.publish("ingest.unrelated." + unique, b"\x04", key="z")
        async with asyncio.timeout(20):
            while not (
                await history_data(engines, f"stream:{prefix}.a.x")
                and await history_data(engines, f"stream:{prefix}.b.y")
            ):
                await asyncio.sleep(0.05)
        assert await history_data(engines, f"stream:{prefix}.a.x") == [{"b64": "AQI="}]
        assert await history_data(engines, f"stream:{prefix}.b.y") == [{"b64": "Aw=="}]
        assert await history_data(engines, f"stream:ingest.unrelated.{unique}.z") == []
    finally:
        await consumer.stop()
