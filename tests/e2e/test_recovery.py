"""A subscriber whose gateway or Redis dies gets every publication once, in order, recovered from history.

Two gateway processes share Redis; stock SDK subscribers (centrifuge-python and npm centrifuge) sit on
the first, publications go in through the second's server API at a steady rate, and the first is killed
with SIGKILL: no drain, no goodbye. The SDKs reconnect by themselves (their own backoff) and resubscribe
with their last offset and epoch. What they missed must come from the channel's history (the `chat:`
namespace keeps 100 publications), whichever replica they land on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from centrifuge import Client, PublicationContext, SubscribedContext, SubscriptionEventHandler
from tsunagu_core.testing_storm import FailoverProxy

from tsunagu.stack.redis import PrivateRedis

SECRET = "e2e-secret-long-enough-for-hs256-tokens"
API_KEY = "e2e"
JS_DIR = Path(__file__).parent / "js"
RATE = 25.0  # publications per second, as a chat room or a ticker sends them


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def gateway_env(real_env: dict[str, str], redis_url: str | None = None) -> dict[str, str]:
    env = {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": API_KEY}
    if redis_url is not None:
        env["TSUNAGU_REDIS_URL"] = redis_url
    return env


@dataclass
class PythonSubscriber(SubscriptionEventHandler):
    received: list[int] = field(default_factory=list)
    subscribed: list[SubscribedContext] = field(default_factory=list)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.received.append(ctx.pub.data["n"])

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)


class JsSubscriber:
    """recovering_subscriber.mjs: the npm SDK in a Node process of its own."""

    def __init__(self, url: str, channel: str, count: int, timeout: float) -> None:
        self.args = ["node", "recovering_subscriber.mjs", url, token("jo"), channel, str(count), str(int(timeout))]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 20)
        assert line.strip() == b"ready", line + (await self.process.stderr.read() if self.process.stderr else b"")

    async def summary(self) -> dict[str, Any]:
        assert self.process is not None
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), 120)
        lines = stdout.decode().strip().splitlines()
        assert lines, stderr.decode()
        result: dict[str, Any] = json.loads(lines[-1])
        return result


async def publish_steadily(api: str, channel: str, count: int, on_published: Any = None, rate: float = RATE) -> None:
    """`count` publications at `rate` per second through the server API, each retried until it is accepted
    (its idempotency key makes a retry after a lost answer harmless)."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=5) as http:
        for n in range(count):
            body = {"channel": channel, "data": {"n": n}, "idempotency_key": f"{channel}-{n}"}
            deadline = time.monotonic() + 30
            while True:
                try:
                    answer = (await http.post(api + "/publish", headers={"X-API-Key": API_KEY}, json=body)).json()
                    if "result" in answer:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"publication {n} never accepted"
                await asyncio.sleep(0.05)
            if on_published is not None:
                await on_published(n)
            await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))


def assert_recovered(name: str, received: list[int], count: int, recovered: list[bool]) -> None:
    assert received == list(range(count)), (
        f"{name}: {count - len(set(received))} lost, {len(received) - len(set(received))} doubled,"
        f" in order: {received == sorted(received)}; first missing: {sorted(set(range(count)) - set(received))[:5]}"
    )
    assert len(recovered) >= 2 and recovered[-1], f"{name}: subscribed events (recovered?) {recovered}"


def assert_js_recovered(summary: dict[str, Any], count: int) -> None:
    received = [r["n"] for r in summary["received"]]
    assert_recovered("npm centrifuge", received, count, [s["recovered"] for s in summary["subscribed"]])


@contextlib.asynccontextmanager
async def python_subscriber(url: str, channel: str) -> AsyncIterator[PythonSubscriber]:
    # The SDK's own reconnect backoff, only capped lower than its 20 s default so a test does not wait long.
    client = Client(url, token=token("ann"), max_reconnect_delay=1.0)
    inbox = PythonSubscriber()
    await client.connect()
    subscription = client.new_subscription(channel, inbox, recoverable=True, positioned=True)
    await subscription.subscribe()
    await subscription.ready(timeout=10)
    try:
        yield inbox
    finally:
        await client.disconnect()


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_subscribers_of_a_killed_gateway_recover_everything_when_it_restarts(  # type: ignore[no-untyped-def]
    start_service, real_env, pick_port
) -> None:
    """The case of issue 31: the gateway comes back on its port while publications flow through the other.
    It has to be back within the history's window (100 publications at 25/s: 4 s), SDK backoff included: it
    listens before it imports (a reconnecting SDK waits in the backlog instead of backing off), imports only
    itself, and its bytecode is compiled at install (about 1.5 s to be back, where Centrifugo takes 0.1 s)."""
    env = gateway_env(real_env)
    port = pick_port()
    first = start_service(["serve", "ws-gateway"], env, port=port)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.gather(asyncio.to_thread(first.wait_ready), asyncio.to_thread(second.wait_ready))
    channel, count = f"chat:{uuid.uuid4().hex[:8]}", 300
    url = f"ws://127.0.0.1:{port}/connection/websocket"
    js = JsSubscriber(url, channel, count, timeout=60)
    await js.start()
    restarted: list[Any] = []

    async def kill_at_the_hundredth(n: int) -> None:
        if n == 100:
            first.process.send_signal(signal.SIGKILL)
            first.process.wait()
            restarted.append(start_service(["serve", "ws-gateway"], env, port=port))

    async with python_subscriber(url, channel) as inbox:
        await publish_steadily(second.base + "/api", channel, count, kill_at_the_hundredth)
        await wait_for(lambda: len(inbox.received) >= count, 20, f"python got {len(inbox.received)} of {count}")
        js_summary = await js.summary()
    assert_recovered("centrifuge-python", inbox.received, count, [s.recovered for s in inbox.subscribed])
    assert all(s.was_recovering for s in inbox.subscribed[1:])
    assert_js_recovered(js_summary, count)
    assert [r["offset"] for r in js_summary["received"]] == list(range(1, count + 1))
    assert restarted[0].process.poll() is None


async def test_subscribers_of_a_killed_gateway_recover_on_the_other_replica(  # type: ignore[no-untyped-def]
    start_service, real_env
) -> None:
    env = gateway_env(real_env)
    first = start_service(["serve", "ws-gateway"], env)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.gather(asyncio.to_thread(first.wait_ready), asyncio.to_thread(second.wait_ready))
    proxy = FailoverProxy([first.port, second.port])
    await proxy.start()
    channel, count = f"chat:{uuid.uuid4().hex[:8]}", 150
    url = f"ws://127.0.0.1:{proxy.port}/connection/websocket"
    js = JsSubscriber(url, channel, count, timeout=60)
    await js.start()

    async def kill_the_first(n: int) -> None:
        if n == 50:
            first.process.send_signal(signal.SIGKILL)

    try:
        async with python_subscriber(url, channel) as inbox:
            await publish_steadily(second.base + "/api", channel, count, kill_the_first)
            await wait_for(lambda: len(inbox.received) >= count, 20, f"python got {len(inbox.received)} of {count}")
            js_summary = await js.summary()
    finally:
        await proxy.close()
    assert_recovered("centrifuge-python", inbox.received, count, [s.recovered for s in inbox.subscribed])
    assert_js_recovered(js_summary, count)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own (the shared stack's must not be killed), with AOF fsynced on every
    write so that a SIGKILL loses nothing that was acknowledged."""
    from tsunagu_core.testing import require_stack

    require_stack("a private redis-server")
    with PrivateRedis(tmp_path / "redis", appendonly=True, config=["appendfsync always"]) as server:
        yield server


async def test_subscribers_recover_everything_across_a_redis_restart(  # type: ignore[no-untyped-def]
    start_service, real_env, private_redis
) -> None:
    """Redis is killed and restarted with its append-only file: the history and the epoch survive, the
    gateways reconnect their fan-out, tell subscribers to resubscribe (unsubscribe push 2500), and the SDKs
    recover what was published around the outage; the publisher retries what Redis refused meanwhile."""
    env = gateway_env(real_env, private_redis.url)
    first = start_service(["serve", "ws-gateway"], env)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.gather(asyncio.to_thread(first.wait_ready), asyncio.to_thread(second.wait_ready))
    channel, count = f"chat:{uuid.uuid4().hex[:8]}", 120
    url = f"ws://127.0.0.1:{first.port}/connection/websocket"
    js = JsSubscriber(url, channel, count, timeout=60)
    await js.start()

    async def restart_redis(n: int) -> None:
        if n == 40:
            private_redis.kill()
            await asyncio.sleep(1.0)
            private_redis.start()

    async with python_subscriber(url, channel) as inbox:
        await publish_steadily(second.base + "/api", channel, count, restart_redis)
        await wait_for(lambda: len(inbox.received) >= count, 30, f"python got {len(inbox.received)} of {count}")
        js_summary = await js.summary()
    assert_recovered("centrifuge-python", inbox.received, count, [s.recovered for s in inbox.subscribed])
    assert_js_recovered(js_summary, count)


async def test_stock_javascript_sdk_with_120_subscriptions_before_connect(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    """centrifuge-js sends connect and every subscription made before it in one frame."""
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    prefix = f"chat:{uuid.uuid4().hex[:6]}-feed"
    process = await asyncio.create_subprocess_exec(
        "node",
        "many_subscriptions.mjs",
        f"ws://127.0.0.1:{gateway.port}/connection/websocket",
        token("ann"),
        prefix,
        "120",
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    summary = json.loads(stdout.decode().strip().splitlines()[-1]) if stdout.strip() else {"stderr": stderr.decode()}
    assert summary.get("subscribed") == 120 and not summary.get("errors"), summary
