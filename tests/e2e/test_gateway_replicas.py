"""Two gateway processes on real Redis and Kafka, driven by the stock centrifuge-python SDK."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
from centrifuge import (
    Client,
    ClientEventHandler,
    DisconnectedContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscribedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)
from tsunagu_core import topics
from tsunagu_core.bus import BusMessage
from tsunagu_core.bus.kafka import KafkaBus
from tsunagu_core.envelope import envelope_of, payload_of
from tsunagu_core.testing import KAFKA_BOOTSTRAP
from tsunagu_core.testing_clients import subscribed
from tsunagu_core.wire.events_pb2 import GatewayEvent

SECRET = "e2e-secret-long-enough-for-hs256-tokens"


def token(user: str) -> str:
    claims = {"sub": user, "channels": ["chat:*"], "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Inbox(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.data: list[Any] = []
        self.subscribed: list[SubscribedContext] = []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.data.append(ctx.pub.data)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.data) < count:
                await asyncio.sleep(0.02)


def gateway_env(real_env: dict[str, str]) -> dict[str, str]:
    return {**real_env, "TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET": SECRET, "TSUNAGU_GATEWAY_API_KEY": "e2e"}


async def test_replicas_share_channels_and_recover_across_a_restart(start_service, real_env, pick_port) -> None:  # type: ignore[no-untyped-def]
    env = gateway_env(real_env)
    first_port = pick_port()
    first = start_service(["serve", "ws-gateway"], env, port=first_port)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(first.wait_ready)
    await asyncio.to_thread(second.wait_ready)
    channel = f"chat:{uuid.uuid4().hex[:8]}"

    ann = Client(f"ws://127.0.0.1:{first.port}/connection/websocket", token=token("ann"), max_reconnect_delay=0.5)
    bob = Client(f"ws://127.0.0.1:{second.port}/connection/websocket", token=token("bob"))
    await ann.connect()
    await bob.connect()
    ann_inbox, bob_inbox = Inbox(), Inbox()
    await subscribed(ann, channel, ann_inbox, recoverable=True)
    bob_sub = await subscribed(bob, channel, bob_inbox)

    for n in range(5):
        await bob_sub.publish({"n": n})
    await ann_inbox.wait_for(5)
    await bob_inbox.wait_for(5)
    assert ann_inbox.data == bob_inbox.data == [{"n": n} for n in range(5)]

    # Ann's gateway goes away; Bob keeps publishing on the other replica; Ann's gateway comes back.
    assert await asyncio.to_thread(first.stop) == 0
    for n in range(5, 10):
        await bob_sub.publish({"n": n})
    restarted = start_service(["serve", "ws-gateway"], env, port=first_port)
    await asyncio.to_thread(restarted.wait_ready)
    await ann_inbox.wait_for(10)
    await bob_sub.publish({"n": 10})
    await ann_inbox.wait_for(11)
    assert ann_inbox.data == [{"n": n} for n in range(11)], "lost or doubled across the restart"
    assert ann_inbox.subscribed[-1].recovered
    await ann.disconnect()
    await bob.disconnect()


async def test_connections_are_announced_on_kafka(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    user = f"user-{uuid.uuid4().hex[:8]}"
    seen: list[GatewayEvent] = []
    bus = KafkaBus(KAFKA_BOOTSTRAP, client_id="e2e-events")
    await bus.start()

    async def collect(message: BusMessage) -> None:
        event = payload_of(envelope_of(message), GatewayEvent)
        if event.user_id == user:
            assert message.key == user.encode()
            seen.append(event)

    consumer = await bus.consume([topics.GATEWAY_EVENTS], f"e2e-{uuid.uuid4().hex[:6]}", collect)
    client = Client(f"ws://127.0.0.1:{gateway.port}/connection/websocket", token=token(user))
    await client.connect()
    subscription = client.new_subscription("chat:events")
    await subscription.subscribe()
    await subscription.ready()
    await client.disconnect()
    deadline = time.monotonic() + 30
    while len(seen) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await consumer.stop()
    await bus.close()
    kinds = [event.kind for event in seen]
    assert len(kinds) == 4, f"events seen: {kinds}; gateway said: {gateway.stop()} {gateway.output()}"
    assert kinds[:2] == [GatewayEvent.CONNECTED, GatewayEvent.SUBSCRIBED]
    assert set(kinds[2:]) == {GatewayEvent.UNSUBSCRIBED, GatewayEvent.DISCONNECTED}
    assert all(event.channel == "chat:events" for event in seen if event.kind == GatewayEvent.SUBSCRIBED)


JS_DIR = Path(__file__).parent / "js"


async def test_stock_javascript_sdk_publishes_and_recovers(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    gateway = start_service(["serve", "ws-gateway"], gateway_env(real_env))
    await asyncio.to_thread(gateway.wait_ready)
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        "node",
        "native_client.mjs",
        f"ws://127.0.0.1:{gateway.port}/connection/websocket",
        token("ann"),
        channel,
        f"http://127.0.0.1:{gateway.port}/api",
        "e2e",
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert [item["data"]["n"] for item in summary["received"]] == list(range(7))
    assert [item["offset"] for item in summary["received"]] == list(range(1, 8))
    assert summary["historyOffsets"] == [1, 2, 3]
    assert summary["subscribedEvents"][-1] == {"recovered": True, "wasRecovering": True}
    assert summary["forbidden"] == 102  # no `secret` namespace


async def test_revocation_on_kafka_logs_out_on_every_replica_within_a_second(
    start_service, real_env, pick_port
) -> None:  # type: ignore[no-untyped-def]
    import websockets
    from tsunagu_core.envelope import publish_event
    from tsunagu_core.wire.events_pb2 import Revocation

    env = gateway_env(real_env)
    first_port = pick_port()
    replicas = [
        start_service(["serve", "ws-gateway"], env, port=first_port),
        start_service(["serve", "ws-gateway"], env),
    ]
    for replica in replicas:
        await asyncio.to_thread(replica.wait_ready)
    session = f"sid-{uuid.uuid4().hex[:8]}"
    claims = {
        "sub": "mallory",
        "sid": session,
        "channels": ["chat:*"],
        "iat": int(time.time()) - 5,
        "exp": int(time.time()) + 600,
    }
    stolen = jwt.encode(claims, SECRET, algorithm="HS256")

    async def connect(port: int) -> websockets.ClientConnection:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/connection/websocket")
        await ws.send(json.dumps({"id": 1, "connect": {"token": stolen}}))
        reply = await asyncio.wait_for(ws.recv(), 5)
        assert '"connect"' in str(reply), reply
        return ws

    async def close_code(ws: websockets.ClientConnection) -> int:
        try:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code

    # Each replica's revocation consumer joins its own group in the background after readiness.
    await asyncio.sleep(3)
    sockets = [await connect(replica.port) for replica in replicas]
    bus = KafkaBus(KAFKA_BOOTSTRAP, client_id="e2e-auth")
    await bus.start()
    revocation = Revocation(scope=Revocation.SESSION, value=session, reason="e2e", actor="admin")
    await publish_event(bus, topics.AUTH_REVOCATIONS, "auth.revocation", revocation, key="mallory", source="e2e")
    published = time.monotonic()
    codes = await asyncio.gather(*(close_code(ws) for ws in sockets))
    elapsed = time.monotonic() - published
    await bus.close()
    assert codes == [3500, 3500]
    # One second is the promise (measured in bench/); on two shared cores the test allows five, which still
    # catches a revocation that does not travel.
    print(f"\nrevocation on Kafka -> both replicas closed the session: {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0, f"replicas took {elapsed:.2f}s to disconnect the revoked session"

    # A restarted replica rebuilds the list from the topic and still refuses the token.
    assert await asyncio.to_thread(replicas[0].stop) == 0
    restarted = start_service(["serve", "ws-gateway"], env, port=first_port)
    await asyncio.to_thread(restarted.wait_ready)
    await asyncio.sleep(3)
    ws = await websockets.connect(f"ws://127.0.0.1:{first_port}/connection/websocket")
    await ws.send(json.dumps({"id": 1, "connect": {"token": stolen}}))
    assert await close_code(ws) == 3500


class ServerSide(ClientEventHandler):
    """A client's view of what the server does to it: server-side subscriptions and the disconnect."""

    def __init__(self) -> None:
        self.subscribed: list[str] = []
        self.publications: list[tuple[str, Any]] = []
        self.disconnected: list[tuple[int, str]] = []

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.subscribed.append(ctx.channel)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.publications.append((ctx.channel, ctx.pub.data))

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.disconnected.append((ctx.code, ctx.reason))


class Unsubscribed(Inbox):
    def __init__(self) -> None:
        super().__init__()
        self.unsubscribed: list[int] = []

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.unsubscribed.append(ctx.code)


async def eventually(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_the_server_api_of_one_replica_acts_on_a_connection_of_the_other(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    """subscribe, unsubscribe and disconnect sent to the second gateway reach ann on the first (Redis)."""
    env = gateway_env(real_env)
    first = start_service(["serve", "ws-gateway"], env)
    second = start_service(["serve", "ws-gateway"], env)
    await asyncio.gather(asyncio.to_thread(first.wait_ready), asyncio.to_thread(second.wait_ready))
    user = f"ann-{uuid.uuid4().hex[:6]}"
    room, pushed = f"chat:{uuid.uuid4().hex[:8]}", f"chat:{uuid.uuid4().hex[:8]}"
    events = ServerSide()
    ann = Client(f"ws://127.0.0.1:{first.port}/connection/websocket", token=token(user), events=events)
    await ann.connect()
    inbox = Unsubscribed()
    await subscribed(ann, room, inbox)
    api = second.base + "/api"

    async def call(method: str, body: dict[str, Any]) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            answer = (await http.post(f"{api}/{method}", headers={"X-API-Key": "e2e"}, json=body)).json()
        assert "result" in answer, answer

    await call("subscribe", {"user": user, "channel": pushed})
    await eventually(lambda: pushed in events.subscribed, "the server-side subscription never reached ann")
    await call("publish", {"channel": pushed, "data": {"to": "ann"}})
    await eventually(lambda: events.publications == [(pushed, {"to": "ann"})], f"got {events.publications}")

    await call("unsubscribe", {"user": user, "channel": room})
    await eventually(lambda: inbox.unsubscribed == [2000], f"unsubscribe pushes: {inbox.unsubscribed}")

    await call("disconnect", {"user": user, "disconnect": {"code": 4501, "reason": "moved"}})
    await eventually(lambda: events.disconnected, "ann was never disconnected")
    assert events.disconnected[0] == (4501, "moved")  # 4500-4999: the SDK does not reconnect
    await ann.disconnect()


async def test_stock_javascript_sdk_positioning_cache_recovery_and_tags_filter(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    namespaces = {
        "chat": {"presence": True, "join_leave": True},
        "ticks": {"recovery": False, "allow_positioning": True, "allow_subscribe": "authenticated"},
        "scores": {"recovery_mode": "cache", "history_size": 1, "allow_subscribe": "authenticated"},
        "quotes": {"allow_tags_filter": True, "allow_subscribe": "authenticated"},
    }
    env = {**gateway_env(real_env), "TSUNAGU_GATEWAY_NAMESPACES": json.dumps(namespaces)}
    gateway = start_service(["serve", "ws-gateway"], env)
    await asyncio.to_thread(gateway.wait_ready)
    process = await asyncio.create_subprocess_exec(
        "node",
        "stream_features.mjs",
        f"ws://127.0.0.1:{gateway.port}/connection/websocket",
        token("ann"),
        uuid.uuid4().hex[:8],
        f"http://127.0.0.1:{gateway.port}/api",
        "e2e",
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stdout.decode() + stderr.decode()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    positioned = summary["subscribed"]["positioned"][0]
    assert positioned == {"positioned": True, "recoverable": False, "recovered": False, "offset": 1}
    # Cache recovery: the latest state on the first subscribe, and only the latest after the reconnect.
    assert [item["data"]["score"] for item in summary["received"]["cache"]] == ["1-0", "2-1"]
    assert all(event["recovered"] for event in summary["subscribed"]["cache"])
    assert [item["tags"] for item in summary["received"]["filtered"]] == [{"ticker": "AAPL"}] * 2


PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "centrifugal" / "centrifugo"


async def test_grpc_api_disconnects_a_user_connected_to_the_other_replica(
    start_service, real_env, pick_port, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import grpc
    from tsunagu_core.testing_clients import grpc_stubs

    grpc_port = pick_port()
    env = gateway_env(real_env)
    first = start_service(["serve", "ws-gateway"], {**env, "TSUNAGU_GATEWAY_GRPC_API_PORT": str(grpc_port)})
    second = start_service(["serve", "ws-gateway"], env)
    for replica in (first, second):
        await asyncio.to_thread(replica.wait_ready)
    user = f"grpc-{uuid.uuid4().hex[:8]}"
    channel = f"chat:{user}"
    disconnected: asyncio.Future[DisconnectedContext] = asyncio.get_running_loop().create_future()

    class Watch(ClientEventHandler):
        async def on_disconnected(self, ctx: DisconnectedContext) -> None:
            if not disconnected.done():
                disconnected.set_result(ctx)

    client = Client(f"ws://127.0.0.1:{second.port}/connection/websocket", events=Watch(), token=token(user))
    await client.connect()
    inbox = Inbox()
    sub = client.new_subscription(channel, events=inbox)
    await sub.subscribe()
    await sub.ready(timeout=10)
    with grpc_stubs(PROTO_DIR, "api", tmp_path) as (pb, pb_grpc):
        key = (("authorization", "apikey e2e"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as grpc_channel:
            api = pb_grpc.CentrifugoApiStub(grpc_channel)
            published = await api.Publish(pb.PublishRequest(channel=channel, data=b'{"via":"grpc"}'), metadata=key)
            assert not published.HasField("error"), published
            await inbox.wait_for(1)
            assert inbox.data == [{"via": "grpc"}]
            history = await api.History(pb.HistoryRequest(channel=channel, limit=10), metadata=key)
            assert [p.data for p in history.result.publications] == [b'{"via":"grpc"}']
            answer = await api.Disconnect(
                pb.DisconnectRequest(user=user, disconnect=pb.Disconnect(code=4601, reason="from the other replica")),
                metadata=key,
            )
            assert not answer.HasField("error"), answer
            ctx = await asyncio.wait_for(disconnected, 10)
            assert (ctx.code, ctx.reason) == (4601, "from the other replica")
            # Both replicas, once each has announced itself to the other (a loaded machine can take a while).
            async with asyncio.timeout(20):
                while len((await api.Info(pb.InfoRequest(), metadata=key)).result.nodes) < 2:
                    await asyncio.sleep(0.5)
