"""One channel, every protocol: publications made through the server API on a gateway running on
real Redis and Kafka reach a centrifuge-python client, a JSON-RPC client (`rpc-websockets`), a
graphql-ws client and a `@stomp/stompjs` client, all in order; the permission denied path gives
each protocol's own error. And records produced to a Kafka topic reach the same clients (plus the npm
`centrifuge` SDK) through stream-ingest, in order."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from tsunagu_core.testing_clients import subscribed

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
JS_DIR = Path(__file__).parent / "js"
COUNT = 5


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["chat:*", "stream:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[Any] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)


async def _start(script: str, url: str, user: str, channel: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        "node", script, url, token(user), channel, str(COUNT),
        cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    assert line.strip() == b"ready", line.decode() + (await process.stderr.read()).decode()  # type: ignore[union-attr]
    return process


async def _summary(process: asyncio.subprocess.Process) -> dict[str, Any]:
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    summary: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return summary


async def test_one_channel_reaches_every_protocol_in_order(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    env = {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": "e2e"}
    gateway = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"chat:adapters-{uuid.uuid4().hex[:8]}"
    ws = f"ws://127.0.0.1:{gateway.port}"

    native = Client(f"{ws}/connection/websocket", token=token("ann"))
    await native.connect()
    inbox = Inbox()
    await subscribed(native, channel, inbox)
    clients = await asyncio.gather(
        _start("jsonrpc_client.mjs", f"{ws}/rpc", "rpc-user", channel),
        _start("graphql_client.mjs", f"{ws}/graphql", "gql-user", channel),
        _start("stomp_client.mjs", f"{ws}/stomp", "stomp-user", channel),
    )
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=gateway.base) as http:
        for n in range(COUNT):
            response = await http.post(
                "/api/publish", json={"channel": channel, "data": {"n": n}}, headers={"X-API-Key": "e2e"}
            )
            assert "result" in response.json(), response.text
    rpc, gql, stomp = [await _summary(process) for process in clients]
    elapsed = time.monotonic() - started
    async with asyncio.timeout(10):
        while len(inbox.data) < COUNT:
            await asyncio.sleep(0.02)
    await native.disconnect()

    expected = [{"n": n} for n in range(COUNT)]
    assert inbox.data == expected
    for summary in (rpc, gql, stomp):
        assert [item["data"] for item in summary["received"]] == expected
        assert [item["offset"] for item in summary["received"]] == list(range(1, COUNT + 1))
    assert {item["subscription"] for item in rpc["received"]} == {channel}
    assert {item["subscription"] for item in stomp["received"]} == {"sub-0"}
    assert {item["contentType"] for item in stomp["received"]} == {"application/json"}
    # Permission denied, each in its protocol's way.
    assert rpc["denied"] == -32003
    assert gql["denied"] == 103
    assert stomp["user"] == "stomp-user" and "permission denied" in stomp["denied"]
    assert elapsed < 15


async def test_kafka_records_reach_every_protocol_in_order(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    from confluent_kafka import Producer
    from tsunagu_core.bus.kafka import KafkaBus
    from tsunagu_core.testing import KAFKA_BOOTSTRAP

    unique = uuid.uuid4().hex[:10]
    topic = f"scores.e2e.{unique}"
    bus = KafkaBus(KAFKA_BOOTSTRAP, partitions=3)
    await bus.start()
    await bus.ensure_topics([topic])
    await bus.close()
    # Presence on in `stream` too: the GraphQL client script tells it is subscribed by seeing itself there.
    namespaces = {
        "chat": {"presence": True, "join_leave": True},
        "stream": {"allow_publish": "none", "history_size": 10, "history_ttl": 300, "presence": True},
    }
    gateway_env = {"TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_NAMESPACES": json.dumps(namespaces)}
    gateway = start_service(["serve", "ws-gateway"], {**real_env, **gateway_env})
    ingest = start_service(
        ["serve", "stream-ingest"],
        {
            **real_env,
            "TSUNAGU_INGEST_MAPPINGS": json.dumps([{"topic": topic}]),
            "TSUNAGU_INGEST_CONSUMER_GROUP": f"stream-ingest-adapters-{unique}",
        },
    )
    await asyncio.to_thread(gateway.wait_ready)
    await asyncio.to_thread(ingest.wait_ready)
    channel = f"stream:{topic}.match-7"
    ws = f"ws://127.0.0.1:{gateway.port}"
    clients = await asyncio.gather(
        _start("centrifuge_subscriber.mjs", f"{ws}/connection/websocket", "js-user", channel),
        _start("jsonrpc_client.mjs", f"{ws}/rpc", "rpc-user", channel),
        _start("graphql_client.mjs", f"{ws}/graphql", "gql-user", channel),
        _start("stomp_client.mjs", f"{ws}/stomp", "stomp-user", channel),
    )
    producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "enable.idempotence": True})
    for n in range(COUNT):
        producer.produce(topic, key="match-7", value=json.dumps({"n": n}).encode())
    await asyncio.to_thread(producer.flush, 10)
    summaries = [await _summary(process) for process in clients]
    expected = [{"n": n} for n in range(COUNT)]
    for summary in summaries:
        assert [item["data"] for item in summary["received"]] == expected, summary
        assert [item["offset"] for item in summary["received"]] == list(range(1, COUNT + 1)), summary
