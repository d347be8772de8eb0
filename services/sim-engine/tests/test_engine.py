import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tsunagu_core import topics
from tsunagu_core.broker import ClientInfo, MemoryBroker, Publication
from tsunagu_core.bus import MemoryBus
from tsunagu_core.config import CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import REDIS_ENGINES, eventually, redis_engine_url, require_stack
from tsunagu_core.wire.events_pb2 import SimInput
from tsunagu_sim_engine.app import create_app
from tsunagu_sim_engine.codec import decode
from tsunagu_sim_engine.config import SimSettings
from tsunagu_sim_engine.engine import SimEngine
from tsunagu_sim_engine.room import RoomSpec
from tsunagu_sim_engine.store import MemoryRoomStore, RedisRoomStore, RoomStore


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def on_publication(self, channel: str, publication: Publication) -> None:
        self.seen.append((channel, publication.data))

    async def on_presence(self, channel: str, join: bool, info: ClientInfo) -> None:
        return None

    async def on_resubscribed(self) -> None:
        return None

    def frames(self, channel: str) -> list[dict[str, Any]]:
        return [decode(data) for c, data in self.seen if c == channel]


@pytest.fixture(params=["memory", *REDIS_ENGINES])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RoomStore]:
    if request.param == "memory":
        yield MemoryRoomStore()
        return
    require_stack(f"the {request.param} rooms store")
    redis_store = RedisRoomStore(redis_engine_url(request.param), f"tsunagu:test-sim:{uuid.uuid4().hex}")
    await redis_store.start()
    yield redis_store
    keys = [k async for k in redis_store.redis.scan_iter(match=f"*{redis_store.prefix}*", count=10000)]
    if keys:
        await redis_store.redis.delete(*keys)
    await redis_store.close()


def avatar_spec(room: str, hz: int = 50) -> RoomSpec:
    return RoomSpec.parse({"room": room, "kind": "avatar", "tick_hz": hz, "params": {"max_speed": 100}})


async def send(bus: MemoryBus, room: str, user: str, body: dict[str, Any], seq: int = 0) -> None:
    event = SimInput(room=room, user_id=user, client_id="c-" + user, client_seq=seq, input=json.dumps(body).encode())
    await publish_event(bus, topics.SIM_INPUTS, "sim.input", event, key=room, source="test")


async def test_inputs_from_the_bus_move_avatars_and_refusals_reach_the_sender() -> None:
    bus, broker, recorder = MemoryBus(), MemoryBroker(), Recorder()
    broker.set_handler(recorder)
    for channel in ("sim:lobby", "replies:sim#alice", "replies:sim#eve"):
        await broker.subscribe(channel)
    engine = SimEngine(broker, MemoryRoomStore(), node="a")
    consumer = await bus.consume([topics.SIM_INPUTS], "sim-test", engine.handle)
    try:
        assert await engine.create(avatar_spec("lobby"))
        assert not await engine.create(avatar_spec("lobby"))
        await send(bus, "lobby", "alice", {"p": [1, 2, 0]}, seq=1)
        await send(bus, "lobby", "alice", {"p": [1000, 0, 0]}, seq=2)
        await send(bus, "nowhere", "eve", {"p": [0, 0]}, seq=1)

        def alice_seen() -> bool:
            return any(f["e"].get("alice") == [100, 200, 0, 0] for f in recorder.frames("sim:lobby"))

        await eventually(alice_seen, 3)
        await eventually(lambda: bool(recorder.frames("replies:sim#eve")), 3)
        refusal = recorder.frames("replies:sim#alice")[0]
        assert (refusal["reason"], refusal["client_seq"], refusal["room"]) == ("out_of_range", 2, "lobby")
        assert recorder.frames("replies:sim#eve")[0]["reason"] == "unknown_room"
        await eventually(lambda: any(f["type"] == "keyframe" for f in recorder.frames("sim:lobby")), 3)
    finally:
        await consumer.stop()
        await engine.close()


async def test_a_new_owner_resumes_from_the_snapshot_losing_at_most_k_ticks(store: RoomStore) -> None:
    k = 10
    # The lease is renewed with each snapshot, every k ticks: 2 s keeps it while a loaded machine ticks slowly.
    lease_ttl = 2.0
    first = SimEngine(MemoryBroker(), store, node="first", snapshot_every=k, lease_ttl=lease_ttl)
    second = SimEngine(MemoryBroker(), store, node="second", snapshot_every=k, lease_ttl=lease_ttl)
    assert await first.create(avatar_spec("arena"))
    room = first.rooms["arena"].room
    for step in range(30):
        room.submit(_input("alice", {"p": [step * 0.1, 0, 0]}, seq=step + 1))
        await asyncio.sleep(0.02)
    # The replica dies: no last snapshot, no release; the lease runs out.
    died_at = room.tick
    died_state = room.state()["e"]
    first.rooms.pop("arena").task.cancel()
    await second.scan()
    assert "arena" not in second.rooms  # the lease is still live
    deadline = asyncio.get_running_loop().time() + lease_ttl + 5
    while "arena" not in second.rooms and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        await second.scan()
    resumed = second.rooms["arena"].room
    assert died_at - k <= resumed.tick <= died_at, (died_at, resumed.tick)
    assert resumed.state()["e"]["alice"][0] >= died_state["alice"][0] - 100 * 0.1 * k
    # A redelivered input the old owner applied before its snapshot is not applied again.
    assert resumed.seqs.get("alice/c-alice", 0) >= 1
    await second.close()


async def test_the_replica_that_gets_the_inputs_takes_the_room_over(store: RoomStore) -> None:
    bus = MemoryBus()
    first = SimEngine(MemoryBroker(), store, node="first", snapshot_every=5, lease_ttl=5)
    second = SimEngine(MemoryBroker(), store, node="second", snapshot_every=5, lease_ttl=5)
    assert await first.create(avatar_spec("hall"))
    await asyncio.sleep(0.2)
    consumer = await bus.consume([topics.SIM_INPUTS], f"g-{uuid.uuid4().hex}", second.handle)
    try:
        await send(bus, "hall", "bob", {"p": [3, 3]}, seq=1)
        await eventually(lambda: "hall" in second.rooms, 3)
        assert await store.owner("hall") == "second"
        await first.scan()
        assert "hall" not in first.rooms
        await eventually(lambda: "bob" in second.rooms["hall"].room.state()["e"], 3)
        assert second.rooms["hall"].room.tick >= 10  # resumed, not restarted at 0
        # Deleting the room stops it everywhere at the next scan.
        assert await first.delete("hall")
        await asyncio.sleep(0.2)  # the owner keeps ticking until its scan: its snapshots must not come back
        await second.scan()
        assert second.rooms == {}
        assert await store.snapshot("hall") is None and await store.spec("hall") is None
    finally:
        await consumer.stop()
        await first.close()
        await second.close()


def _input(user: str, body: dict[str, Any], seq: int) -> Any:
    from tsunagu_sim_engine.room import PendingInput

    return PendingInput(user, "c-" + user, seq, json.dumps(body).encode())


def test_rooms_http_api_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), SimSettings(snapshot_every=5))
    with TestClient(app) as client:
        created = client.post("/v1/rooms", json={"room": "r1", "kind": "avatar", "tick_hz": 30})
        assert created.status_code == 201, created.text
        assert created.json()["running_here"] is True
        assert client.post("/v1/rooms", json={"room": "r1", "kind": "avatar"}).status_code == 409
        bad = client.post("/v1/rooms", json={"room": "r2", "kind": "avatar", "tick_hz": 100})
        assert bad.status_code == 400 and "tick_hz" in bad.json()["message"]
        assert client.post("/v1/rooms", content=b"{nope").json()["error"] == "bad_request"
        assert client.post("/v1/rooms", json={"room": "r3", "kind": "chess"}).status_code == 400
        listed = client.get("/v1/rooms").json()
        assert [r["room"] for r in listed["rooms"]] == ["r1"] and "physics" in listed["kinds"]
        assert client.get("/v1/rooms/r1").json()["kind"] == "avatar"
        state = client.get("/v1/rooms/r1/state").json()
        assert state["source"] == "live" and state["e"] == {}
        assert client.get("/v1/rooms/none").status_code == 404
        assert client.get("/v1/rooms/bad%20name").status_code == 400
        assert client.delete("/v1/rooms/r1").json() == {"room": "r1", "deleted": True}
        assert client.delete("/v1/rooms/r1").status_code == 404
        metrics = client.get("/metrics").text
        for name in ("tsunagu_sim_tick_seconds", "tsunagu_sim_tick_overruns_total", "tsunagu_sim_entities"):
            assert name in metrics
