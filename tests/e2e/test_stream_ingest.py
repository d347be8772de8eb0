"""stream-ingest and a gateway as processes on real Kafka and Redis, read by the stock centrifuge-python SDK."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import jwt
from centrifuge import Client
from confluent_kafka import Producer
from tsunagu_core.bus.kafka import KafkaBus
from tsunagu_core.testing import KAFKA_BOOTSTRAP
from tsunagu_core.testing_clients import Inbox, subscribed

SECRET = "e2e-ingest-secret-long-enough-for-hs256"


def token(user: str) -> str:
    return jwt.encode({"sub": user, "channels": ["stream:*"], "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def produce(producer: Producer, topic: str, numbers: range, key: str = "EURUSD") -> None:
    for n in numbers:
        producer.produce(topic, key=key, value=json.dumps({"n": n}).encode())
    producer.flush(10)


async def produce_slowly(producer: Producer, topic: str, numbers: range, pause: float) -> None:
    for n in numbers:
        producer.produce(topic, key="EURUSD", value=json.dumps({"n": n}).encode())
        producer.poll(0)
        await asyncio.sleep(pause)
    await asyncio.to_thread(producer.flush, 10)


async def new_topic_and_env(real_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A 3-partition topic of the test's own, and the environment of stream-ingest replicas relaying it
    (one consumer group)."""
    unique = uuid.uuid4().hex[:10]
    topic = f"prices.e2e.{unique}"
    bus = KafkaBus(KAFKA_BOOTSTRAP, partitions=3)
    await bus.start()
    await bus.ensure_topics([topic])
    await bus.close()
    return topic, {
        **real_env,
        "TSUNAGU_INGEST_MAPPINGS": json.dumps([{"topic": topic}]),
        "TSUNAGU_INGEST_CONSUMER_GROUP": f"stream-ingest-e2e-{unique}",
    }


async def test_records_reach_stock_clients_in_order_once_across_a_crash(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    topic, ingest_env = await new_topic_and_env(real_env)
    gateway = start_service(["serve", "ws-gateway"], {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET})
    ingest = start_service(["serve", "stream-ingest"], ingest_env)
    await asyncio.to_thread(gateway.wait_ready)
    await asyncio.to_thread(ingest.wait_ready)

    url = f"ws://127.0.0.1:{gateway.port}/connection/websocket"
    channel = f"stream:{topic}.EURUSD"
    ann = Client(url, token=token("ann"))
    await ann.connect()
    inbox = Inbox()
    await subscribed(ann, channel, inbox)

    producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "enable.idempotence": True})
    await asyncio.to_thread(produce, producer, topic, range(50))
    await inbox.wait_for(50)
    assert inbox.data == [{"n": n} for n in range(50)]

    # A late subscriber gets the current value from the channel's history.
    bob = Client(url, token=token("bob"))
    await bob.connect()
    late = await subscribed(bob, channel)
    last = await late.history(limit=1, reverse=True)
    assert [p.data for p in last.publications] == [{"n": 49}]

    # stream-ingest crashes mid-stream (no clean commit) and comes back: nothing twice, nothing lost.
    feeding = asyncio.create_task(produce_slowly(producer, topic, range(50, 150), pause=0.01))
    await inbox.wait_for(60)
    ingest.process.kill()
    await asyncio.to_thread(ingest.process.wait)
    restarted = start_service(["serve", "stream-ingest"], ingest_env, port=ingest.port)
    await asyncio.to_thread(restarted.wait_ready)
    await feeding
    await inbox.wait_for(150, timeout=45)
    await asyncio.sleep(0.5)
    assert inbox.data == [{"n": n} for n in range(150)]

    async with httpx.AsyncClient(timeout=5) as http:
        metrics = (await http.get(restarted.base + "/metrics")).text
    assert f'tsunagu_ingest_records_total{{mapping="{topic}",outcome="published"}}' in metrics
    await ann.disconnect()
    await bob.disconnect()


def published(metrics: str, topic: str) -> float:
    """Records a stream-ingest replica has published for `topic`'s mapping (its /metrics)."""
    prefix = f'tsunagu_ingest_records_total{{mapping="{topic}",outcome="published"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


async def test_two_replicas_share_the_partitions_and_the_survivor_takes_over(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    """Two stream-ingest replicas in one consumer group on a 3-partition topic; one is killed -9 mid-stream:
    the other takes its partitions, and every key's channel gets every record once, in order."""
    topic, ingest_env = await new_topic_and_env(real_env)
    gateway = start_service(["serve", "ws-gateway"], {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET})
    replicas = [start_service(["serve", "stream-ingest"], ingest_env) for _ in range(2)]
    await asyncio.to_thread(gateway.wait_ready)
    for replica in replicas:
        await asyncio.to_thread(replica.wait_ready)

    keys = [f"K{i}" for i in range(6)]
    client = Client(f"ws://127.0.0.1:{gateway.port}/connection/websocket", token=token("ann"))
    await client.connect()
    inboxes = {key: Inbox() for key in keys}
    for key, inbox in inboxes.items():
        await subscribed(client, f"stream:{topic}.{key}", inbox)

    producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "enable.idempotence": True})

    def produce_round(n: int) -> None:
        # key K<i> always on partition i % 3: every partition carries two keys
        for index, key in enumerate(keys):
            producer.produce(topic, key=key, value=json.dumps({"n": n}).encode(), partition=index % 3)
        producer.poll(0)

    async def rounds(numbers: range, pause: float) -> None:
        for n in numbers:
            produce_round(n)
            await asyncio.sleep(pause)
        await asyncio.to_thread(producer.flush, 10)

    # Both replicas consume (once the group has split the 3 partitions between them) before one dies.
    first = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            await rounds(range(first, first + 10), 0.02)
            first += 10
            counts = [published((await http.get(r.base + "/metrics")).text, topic) for r in replicas]
            if all(count > 0 for count in counts):
                break
            assert loop.time() < deadline, f"records published per replica: {counts}"
    total = first + 60
    feeding = asyncio.create_task(rounds(range(first, total), pause=0.02))
    await asyncio.sleep(0.3)
    replicas[0].process.kill()  # no clean commit: the survivor re-reads what it had not committed
    await asyncio.to_thread(replicas[0].process.wait)
    await feeding
    for inbox in inboxes.values():
        await inbox.wait_for(total, timeout=45)
    await asyncio.sleep(0.5)
    for key, inbox in inboxes.items():
        assert inbox.data == [{"n": n} for n in range(total)], f"{key}: order kept, nothing lost or twice"
    await client.disconnect()
