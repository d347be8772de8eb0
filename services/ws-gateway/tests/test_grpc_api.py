"""The server API over gRPC, called by a plain grpcio client generated from Centrifugo's api.proto, across
two gateway replicas: the cluster-wide commands reach a connection on the other replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from centrifuge import (
    Client,
)
from tsunagu_core.broker import MemoryBroker
from tsunagu_core.testing import eventually, free_port
from tsunagu_core.testing_clients import grpc_stubs

from .conftest import API_KEY, RunningGateway, make_token, running_gateway
from .sdk_events import Events, Inbox

PROTO_DIR = Path(__file__).resolve().parents[3] / "proto" / "centrifugal" / "centrifugo"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    with grpc_stubs(PROTO_DIR, "api", tmp_path_factory.mktemp("api_stubs")) as modules:
        yield modules


@contextlib.asynccontextmanager
async def two_replicas() -> AsyncIterator[tuple[RunningGateway, RunningGateway, int]]:
    """Two gateways on one broker; the first serves the gRPC API on the returned port."""
    broker = MemoryBroker()
    port = free_port()
    async with running_gateway(broker=broker, grpc_api_port=port) as first, running_gateway(broker=broker) as second:
        yield first, second, port


KEY = (("authorization", f"apikey {API_KEY}"),)


async def test_grpc_api_publishes_reads_and_reaches_the_other_replica(stubs: Any) -> None:
    pb, pb_grpc = stubs
    async with two_replicas() as (_, second, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        api = pb_grpc.CentrifugoApiStub(channel)
        events = Events()
        client = Client(second.ws_url, events=events, token=make_token("ann", ["chat:*"]))
        await client.connect()
        inbox = Inbox()
        sub = client.new_subscription("chat:grpc", events=inbox)
        await sub.subscribe()
        await sub.ready(timeout=5)

        published = await api.Publish(
            pb.PublishRequest(channel="chat:grpc", data=b'{"text":"over grpc"}', tags={"k": "v"}), metadata=KEY
        )
        assert not published.HasField("error") and published.result.offset == 1 and published.result.epoch
        await eventually(lambda: len(inbox.publications) == 1)
        assert inbox.publications[0].data == {"text": "over grpc"} and inbox.publications[0].tags == {"k": "v"}

        history = await api.History(pb.HistoryRequest(channel="chat:grpc", limit=10), metadata=KEY)
        assert [p.data for p in history.result.publications] == [b'{"text":"over grpc"}']
        presence = await api.Presence(pb.PresenceRequest(channel="chat:grpc"), metadata=KEY)
        assert [info.user for info in presence.result.presence.values()] == ["ann"]
        stats = await api.PresenceStats(pb.PresenceStatsRequest(channel="chat:grpc"), metadata=KEY)
        assert (stats.result.num_clients, stats.result.num_users) == (1, 1)
        broadcast = await api.Broadcast(
            pb.BroadcastRequest(channels=["chat:grpc", "chat:other"], data=b'{"n":2}'), metadata=KEY
        )
        assert [r.result.offset for r in broadcast.result.responses] == [2, 1]
        batch = await api.Batch(
            pb.BatchRequest(
                commands=[pb.Command(history=pb.HistoryRequest(channel="chat:grpc", limit=1, reverse=True))]
            ),
            metadata=KEY,
        )
        assert [p.data for p in batch.replies[0].history.publications] == [b'{"n":2}']
        # A namespace error answers in the message, as the HTTP API does.
        refused = await api.History(pb.HistoryRequest(channel="nowhere:x"), metadata=KEY)
        assert refused.error.code == 102

        # Cluster-wide: subscribe, unsubscribe and disconnect reach ann on the other replica.
        await api.Subscribe(pb.SubscribeRequest(user="ann", channel="chat:pushed"), metadata=KEY)
        await eventually(lambda: [s.channel for s in events.server_subscribed] == ["chat:pushed"])
        await api.Unsubscribe(pb.UnsubscribeRequest(user="ann", channel="chat:grpc"), metadata=KEY)
        await eventually(lambda: bool(inbox.unsubscribed))
        await api.Disconnect(
            pb.DisconnectRequest(user="ann", disconnect=pb.Disconnect(code=4777, reason="bye from grpc")), metadata=KEY
        )
        await eventually(lambda: bool(events.disconnected))
        assert (events.disconnected[0].code, events.disconnected[0].reason) == (4777, "bye from grpc")

        info = await api.Info(pb.InfoRequest(), metadata=KEY)
        assert len(info.result.nodes) >= 1 and all(node.uid for node in info.result.nodes)


async def test_grpc_api_refuses_calls_without_the_key_and_payloads_that_are_not_json(stubs: Any) -> None:
    pb, pb_grpc = stubs
    async with two_replicas() as (_, _, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        api = pb_grpc.CentrifugoApiStub(channel)
        for metadata in ((), (("authorization", "apikey wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api.Publish(pb.PublishRequest(channel="chat:x", data=b"{}"), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = await api.Publish(pb.PublishRequest(channel="chat:x", data=b"\xff not json"), metadata=KEY)
        assert answer.error.code == 107
        answer = await asyncio.wait_for(api.Publish(pb.PublishRequest(channel="chat:x"), metadata=KEY), 5)
        assert answer.error.code == 107  # data is required
        with pytest.raises(grpc.aio.AioRpcError) as pro_only:
            await api.GetUserStatus(pb.GetUserStatusRequest(users=["ann"]), metadata=KEY)
        assert pro_only.value.code() == grpc.StatusCode.UNIMPLEMENTED
