"""What every Bus engine promises (memory and Kafka run the same tests)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Sequence

from tsunagu_core.bus import (
    DEAD_LETTER_SUFFIX,
    BatchPolicy,
    Bus,
    BusMessage,
    Outgoing,
    Rejected,
    RetryPolicy,
)


def group() -> str:
    return f"test-group-{uuid.uuid4().hex[:8]}"


async def wait_for_count(items: list[BusMessage], count: int, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while len(items) < count:
            await asyncio.sleep(0.02)


async def publish_keyed(bus: Bus, topic: str, count: int, keys: int = 4) -> list[tuple[str, int]]:
    sent = []
    for i in range(count):
        key = f"user-{i % keys}"
        await bus.publish(topic, f"{key}:{i}".encode(), key=key, headers={"x-seq": str(i)})
        sent.append((key, i))
    return sent


def by_key(messages: list[BusMessage]) -> dict[str, list[int]]:
    ordered: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        key, seq = message.value.decode().split(":")
        ordered[key].append(int(seq))
    return ordered


async def test_group_receives_every_event_in_key_order_with_headers(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    received: list[BusMessage] = []

    async def handle(message: BusMessage) -> None:
        received.append(message)

    consumer = await bus.consume([topic], group(), handle)
    sent = await publish_keyed(bus, topic, 40)
    await wait_for_count(received, 40)
    await consumer.stop()
    assert sorted(m.value for m in received) == sorted(f"{k}:{i}".encode() for k, i in sent)
    for key, seqs in by_key(received).items():
        assert seqs == sorted(seqs), f"events of {key} out of order: {seqs}"
    first = next(m for m in received if m.value == b"user-0:0")
    assert first.key == b"user-0" and first.headers["x-seq"] == "0"


async def test_restarted_consumer_resumes_after_its_committed_offset(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    name = group()
    first_run: list[BusMessage] = []
    enough = asyncio.Event()

    async def handle_first(message: BusMessage) -> None:
        first_run.append(message)
        if len(first_run) >= 15:
            enough.set()

    consumer = await bus.consume([topic], name, handle_first)
    await publish_keyed(bus, topic, 15)
    async with asyncio.timeout(30):
        await enough.wait()
    await consumer.stop()
    handled_before_stop = list(first_run)
    await publish_keyed(bus, topic, 45)  # values 0..44 again under the same keys: tell runs apart by order

    second_run: list[BusMessage] = []

    async def handle_second(message: BusMessage) -> None:
        second_run.append(message)

    consumer = await bus.consume([topic], name, handle_second)
    await wait_for_count(second_run, 45)
    await asyncio.sleep(0.5)
    await consumer.stop()
    positions_first = {(m.partition, m.offset) for m in handled_before_stop}
    positions_second = {(m.partition, m.offset) for m in second_run}
    assert not positions_first & positions_second, "events handled before the stop were delivered again"
    assert len(positions_first | positions_second) == 60, "events were lost across the restart"
    assert len(second_run) == 45


async def test_failing_handler_is_retried_without_losing_order(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    attempts: dict[bytes, int] = defaultdict(int)
    done: list[BusMessage] = []

    async def flaky(message: BusMessage) -> None:
        attempts[message.value] += 1
        if message.value == b"k:1" and attempts[message.value] < 3:
            raise RuntimeError("database hiccup")
        done.append(message)

    consumer = await bus.consume([topic], group(), flaky, retry=RetryPolicy(max_attempts=5, first_backoff=0.01))
    for i in range(4):
        await bus.publish(topic, f"k:{i}".encode(), key="k")
    await wait_for_count(done, 4)
    await consumer.stop()
    assert [m.value for m in done] == [b"k:0", b"k:1", b"k:2", b"k:3"]
    assert attempts[b"k:1"] == 3


async def test_poison_event_goes_to_dead_letter_topic_and_the_stream_goes_on(bus: Bus, topic: str) -> None:
    dead_topic = topic + DEAD_LETTER_SUFFIX
    await bus.ensure_topics([topic, dead_topic])
    done: list[BusMessage] = []
    dead: list[BusMessage] = []

    async def strict(message: BusMessage) -> None:
        if message.value == b"poison":
            raise ValueError("cannot decode")
        done.append(message)

    async def collect_dead(message: BusMessage) -> None:
        dead.append(message)

    consumer = await bus.consume([topic], group(), strict, retry=RetryPolicy(max_attempts=2, first_backoff=0.01))
    dead_consumer = await bus.consume([dead_topic], group(), collect_dead)
    for value in (b"a", b"poison", b"b"):
        await bus.publish(topic, value, key="same-partition")
    await wait_for_count(done, 2)
    await wait_for_count(dead, 1)
    await consumer.stop()
    await dead_consumer.stop()
    assert [m.value for m in done] == [b"a", b"b"]
    assert dead[0].value == b"poison"
    assert "cannot decode" in dead[0].headers["tsunagu-dlq-error"]
    assert dead[0].headers["tsunagu-dlq-origin"].startswith(topic + "/")


async def test_each_group_gets_every_event(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    seen: dict[str, list[BusMessage]] = {"audit": [], "presence": []}
    consumers = []
    for name, bucket in seen.items():

        async def handle(message: BusMessage, bucket: list[BusMessage] = bucket) -> None:
            bucket.append(message)

        consumers.append(await bus.consume([topic], f"{name}-{uuid.uuid4().hex[:6]}", handle))
    await publish_keyed(bus, topic, 10)
    for bucket in seen.values():
        await wait_for_count(bucket, 10)
    for consumer in consumers:
        await consumer.stop()
    assert sorted(m.value for m in seen["audit"]) == sorted(m.value for m in seen["presence"])


async def test_members_of_one_group_split_the_events(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    name = group()
    buckets: list[list[BusMessage]] = [[], []]
    consumers = []
    for bucket in buckets:

        async def handle(message: BusMessage, bucket: list[BusMessage] = bucket) -> None:
            bucket.append(message)

        consumers.append(await bus.consume([topic], name, handle))
    await asyncio.sleep(0.5)
    await publish_keyed(bus, topic, 60, keys=12)
    async with asyncio.timeout(30):
        while sum(len(b) for b in buckets) < 60:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    for consumer in consumers:
        await consumer.stop()
    values = [m.value for b in buckets for m in b]
    assert len(values) == len(set(values)) == 60


async def test_trace_context_rides_in_the_headers(bus: Bus, topic: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    await bus.ensure_topics([topic])
    received: list[BusMessage] = []

    async def handle(message: BusMessage) -> None:
        received.append(message)

    consumer = await bus.consume([topic], group(), handle)
    with TracerProvider().get_tracer("test").start_as_current_span("publish") as span:
        await bus.publish(topic, b"traced", key="k")
        trace_id = f"{span.get_span_context().trace_id:032x}"
    await wait_for_count(received, 1)
    await consumer.stop()
    assert trace_id in received[0].headers["traceparent"]


async def test_kafka_consumer_lag_is_exported(topic: str) -> None:
    """A consumer slower than its producer shows the events behind it in tsunagu_bus_consumer_lag, and 0
    once it has caught up."""
    from prometheus_client import REGISTRY
    from tsunagu_core.bus.kafka import KafkaBus
    from tsunagu_core.testing import KAFKA_BOOTSTRAP, require_stack

    require_stack("the Kafka bus")
    bus = KafkaBus(KAFKA_BOOTSTRAP, client_id="lag-test", partitions=1, stats_interval=0.2)
    await bus.start()
    await bus.ensure_topics([topic])
    seen: list[BusMessage] = []

    async def slow(message: BusMessage) -> None:
        seen.append(message)
        await asyncio.sleep(0.1)

    name = group()
    subscription = await bus.consume([topic], name, slow)
    try:

        def lag() -> float | None:
            return REGISTRY.get_sample_value("tsunagu_bus_consumer_lag", {"topic": topic, "group": name})

        await publish_keyed(bus, topic, 40, keys=1)
        highest = 0.0
        async with asyncio.timeout(20):
            while len(seen) < 40:
                highest = max(highest, lag() or 0)
                await asyncio.sleep(0.05)
        assert highest >= 5, f"lag never showed the backlog (max {highest})"
        async with asyncio.timeout(10):
            while lag() != 0:
                await asyncio.sleep(0.1)
    finally:
        await subscription.stop()
        await bus.close()


# batch consumers and producers


async def test_batches_keep_key_order_lose_nothing_and_commit_when_done(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    name = group()
    await bus.publish_many([Outgoing(topic, f"user-{i % 5}:{i}".encode(), key=f"user-{i % 5}") for i in range(300)])
    received: list[BusMessage] = []
    sizes: list[int] = []

    async def handle(messages: Sequence[BusMessage]) -> None:
        assert len({m.partition for m in messages}) == 1, "a batch mixes partitions"
        sizes.append(len(messages))
        received.extend(messages)

    consumer = await bus.consume_batches([topic], name, handle, batch=BatchPolicy(max_messages=50))
    await wait_for_count(received, 300)
    await consumer.stop()
    assert sorted(m.value for m in received) == sorted(f"user-{i % 5}:{i}".encode() for i in range(300))
    for key, seqs in by_key(received).items():
        assert seqs == sorted(seqs), f"events of {key} out of order"
    assert max(sizes) > 1 and max(sizes) <= 50

    await publish_keyed(bus, topic, 10, keys=2)
    again: list[BusMessage] = []

    async def handle_again(messages: Sequence[BusMessage]) -> None:
        again.extend(messages)

    consumer = await bus.consume_batches([topic], name, handle_again)
    await wait_for_count(again, 10)
    await asyncio.sleep(0.5)
    await consumer.stop()
    assert len(again) == 10, "events of committed batches were delivered again"


async def test_rejected_events_of_a_batch_go_to_dead_letters_and_the_rest_is_delivered(bus: Bus, topic: str) -> None:
    dead_topic = topic + DEAD_LETTER_SUFFIX
    await bus.ensure_topics([topic, dead_topic])
    done: list[BusMessage] = []
    dead: list[BusMessage] = []

    async def strict(messages: Sequence[BusMessage]) -> list[Rejected]:
        rejected = [Rejected(m, "not JSON") for m in messages if m.value == b"poison"]
        done.extend(m for m in messages if m.value != b"poison")
        return rejected

    async def collect_dead(message: BusMessage) -> None:
        dead.append(message)

    await bus.publish_many([Outgoing(topic, v, key="k") for v in (b"a", b"poison", b"b", b"c")])
    consumer = await bus.consume_batches([topic], group(), strict)
    dead_consumer = await bus.consume([dead_topic], group(), collect_dead)
    await wait_for_count(done, 3)
    await wait_for_count(dead, 1)
    await consumer.stop()
    await dead_consumer.stop()
    assert [m.value for m in done] == [b"a", b"b", b"c"]
    assert dead[0].value == b"poison" and dead[0].headers["tsunagu-dlq-error"] == "not JSON"


async def test_a_failing_batch_is_retried_then_only_its_poison_event_is_dead_lettered(bus: Bus, topic: str) -> None:
    dead_topic = topic + DEAD_LETTER_SUFFIX
    await bus.ensure_topics([topic, dead_topic])
    done: list[bytes] = []
    dead: list[BusMessage] = []
    calls: list[int] = []

    async def all_or_nothing(messages: Sequence[BusMessage]) -> None:
        calls.append(len(messages))
        if any(m.value == b"poison" for m in messages):
            raise ValueError("cannot decode")
        done.extend(m.value for m in messages)

    async def collect_dead(message: BusMessage) -> None:
        dead.append(message)

    await bus.publish_many([Outgoing(topic, v, key="k") for v in (b"a", b"poison", b"b")])
    await asyncio.sleep(0.2)  # one batch holds all three (they are fetched together)
    retry = RetryPolicy(max_attempts=2, first_backoff=0.01)
    consumer = await bus.consume_batches([topic], group(), all_or_nothing, retry=retry)
    dead_consumer = await bus.consume([dead_topic], group(), collect_dead)
    await wait_for_count(dead, 1)
    async with asyncio.timeout(30):
        while len(done) < 2:
            await asyncio.sleep(0.02)
    await consumer.stop()
    await dead_consumer.stop()
    assert sorted(done) == [b"a", b"b"], "the healthy events of the failed batch were not delivered once each"
    assert dead[0].value == b"poison" and "cannot decode" in dead[0].headers["tsunagu-dlq-error"]


async def test_a_slow_partition_does_not_stall_the_others(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    release = asyncio.Event()
    handled: list[BusMessage] = []
    slow_key = b"user-0"
    slow_partition: list[int] = []

    async def handle(messages: Sequence[BusMessage]) -> None:
        if messages[0].partition in slow_partition:
            await release.wait()
        elif any(m.key == slow_key for m in messages):
            slow_partition.append(messages[0].partition)
            await release.wait()
        handled.extend(messages)

    consumer = await bus.consume_batches([topic], group(), handle)
    await bus.publish(topic, b"slow", key=slow_key)
    async with asyncio.timeout(30):
        while not slow_partition:
            await asyncio.sleep(0.02)
    deliveries = await bus.publish_many(
        [Outgoing(topic, f"user-{i}:{i}".encode(), key=f"user-{i}") for i in range(1, 60)]
    )
    elsewhere = sum(1 for d in deliveries if d.partition != slow_partition[0])
    assert elsewhere > 0
    await wait_for_count(handled, elsewhere)  # every other partition moved on while one was stuck
    assert all(m.partition != slow_partition[0] for m in handled)
    release.set()
    await wait_for_count(handled, 60)
    await consumer.stop()


async def test_a_new_group_from_latest_skips_what_the_topic_held_before_it(bus: Bus, topic: str) -> None:
    await bus.ensure_topics([topic])
    for i in range(10):
        await bus.publish(topic, f"old:{i}".encode(), key=f"k{i}")
    received: list[BusMessage] = []

    async def handle(messages: Sequence[BusMessage]) -> None:
        received.extend(messages)

    consumer = await bus.consume_batches([topic], group(), handle, from_latest=True)
    try:
        # Kafka places a new group at the end when partitions are assigned: probe until the consumer reads.
        async with asyncio.timeout(30):
            while not received:
                await bus.publish(topic, b"probe", key="probe")
                await asyncio.sleep(0.2)
        for i in range(10):
            await bus.publish(topic, f"new:{i}".encode(), key=f"k{i}")
        async with asyncio.timeout(30):
            while sum(m.value.startswith(b"new:") for m in received) < 10:
                await asyncio.sleep(0.02)
    finally:
        await consumer.stop()
    assert not [m.value for m in received if m.value.startswith(b"old:")]
