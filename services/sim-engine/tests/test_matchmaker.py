"""Matchmaking against the memory store and each real Redis engine: seats decide joins across replicas."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tsunagu_core.broker import MemoryBroker
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import REDIS_ENGINES, redis_engine_url, require_stack
from tsunagu_core.wire.events_pb2 import GatewayEvent
from tsunagu_sim_engine.app import create_app
from tsunagu_sim_engine.config import SimSettings
from tsunagu_sim_engine.engine import SimEngine
from tsunagu_sim_engine.matchmaker import MatchError, Matchmaker, MatchRequest, SeatWatcher
from tsunagu_sim_engine.store import MemoryRoomStore, RedisRoomStore, RoomStore


@pytest.fixture(params=["memory", *REDIS_ENGINES])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RoomStore]:
    if request.param == "memory":
        yield MemoryRoomStore()
        return
    require_stack(f"the {request.param} rooms store")
    redis_store = RedisRoomStore(redis_engine_url(request.param), f"tsunagu:test-mm:{uuid.uuid4().hex}")
    await redis_store.start()
    yield redis_store
    keys = [k async for k in redis_store.redis.scan_iter(match=f"*{redis_store.prefix}*", count=10000)]
    if keys:
        await redis_store.redis.delete(*keys)
    await redis_store.close()


def matchmakers(store: RoomStore, n: int, seat_ttl: float = 30.0) -> list[Matchmaker]:
    """`n` replicas sharing one store (the real deployment's shape)."""
    return [
        Matchmaker(SimEngine(MemoryBroker(), store, node=f"n{i}", max_rooms=100), store, seat_ttl) for i in range(n)
    ]


def ask(session: str, **filters: object) -> MatchRequest:
    return MatchRequest.parse({"kind": "avatar", "session": session, **filters})


async def test_two_join_one_room_other_filters_another_full_refuses(store: RoomStore) -> None:
    a, b = matchmakers(store, 2)
    first = await a.join_or_create(ask("s1", mode="duel", region="eu", max_clients=2))
    second = await b.join_or_create(ask("s2", mode="duel", region="eu", max_clients=2))
    assert second["room"] == first["room"] and second["clients"] == 2
    other = await b.join_or_create(ask("s3", mode="duel", region="us", max_clients=2))
    assert other["room"] != first["room"]
    # the filters are full: join-or-create makes a new room, joining the full one by name is refused
    fourth = await a.join_or_create(ask("s4", mode="duel", region="eu", max_clients=2))
    assert fourth["room"] not in (first["room"], other["room"])
    with pytest.raises(MatchError, match="is full") as refused:
        await a.join(first["room"], "s5")
    assert refused.value.error == "full"
    listing = {r["room"]: r["clients"] for r in await a.listing("avatar")}
    assert listing == {first["room"]: 2, other["room"]: 1, fourth["room"]: 1}


async def test_a_seat_comes_back_within_the_window_and_is_gone_after(store: RoomStore) -> None:
    (a,) = matchmakers(store, 1, seat_ttl=0.6)
    seat = await a.join_or_create(ask("keep", max_clients=1))
    # within the window the same session gets its seat back though the room is full
    again = await a.join(seat["room"], "keep")
    assert again["clients"] == 1
    with pytest.raises(MatchError, match="full"):
        await a.join(seat["room"], "stranger")
    await asyncio.sleep(0.9)
    assert (await a.listing())[0]["clients"] == 0
    taken = await a.join(seat["room"], "stranger")
    assert taken["clients"] == 1
    with pytest.raises(MatchError, match="full"):
        await a.join(seat["room"], "keep")


async def test_private_rooms_are_not_listed_nor_matched(store: RoomStore) -> None:
    (a,) = matchmakers(store, 1)
    private = await a.join_or_create(ask("p1", private=True))
    assert await a.listing() == []
    public = await a.join_or_create(ask("p2"))
    assert public["room"] != private["room"]
    assert (await a.join(private["room"], "p3"))["clients"] == 2


async def test_last_seat_raced_by_many_replicas_goes_to_one(store: RoomStore) -> None:
    replicas = matchmakers(store, 4)
    seat = await replicas[0].join_or_create(ask("x0", max_clients=2))
    results = await asyncio.gather(
        *(m.join(seat["room"], f"x{i + 1}") for i, m in enumerate(replicas)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1


def test_rest_answers_and_bad_input_is_a_clear_400() -> None:
    with TestClient(create_app(Runtime(CoreSettings()), SimSettings())) as client:
        body = {"kind": "avatar", "session": "r1", "max_clients": 1}
        first = client.post("/v1/matchmake/join-or-create", json=body)
        assert first.status_code == 200, first.text
        room = first.json()["room"]
        assert client.get(f"/v1/rooms/{room}").json()["match"]["max_clients"] == 1
        full = client.post("/v1/matchmake/join-or-create", json={"room": room, "session": "r2"})
        assert full.status_code == 409 and full.json()["error"] == "full"
        assert client.get("/v1/matchmake/rooms").json()["rooms"][0]["clients"] == 1
        for bad in ({"kind": "avatar"}, {"kind": "avatar", "session": "s", "max_clients": 0}, [1]):
            answer = client.post("/v1/matchmake/join-or-create", json=bad)
            assert answer.status_code == 400 and answer.json()["error"] == "bad_request", answer.text
        nokind = client.post("/v1/matchmake/join-or-create", json={"kind": "nope", "session": "s"})
        assert nokind.status_code == 400 and "kind is one of" in nokind.json()["message"]


def event(kind: int, client: str = "", **fields: object) -> GatewayEvent:
    return GatewayEvent(kind=kind, node="gw1@a", client_id=client, user_id=client, **fields)  # type: ignore[arg-type]


async def seated(store: RoomStore, seat_ttl: float, *sessions: str) -> tuple[Matchmaker, SeatWatcher, str]:
    """One room of two seats, each session's seat taken over its connection `c-<session>` on node gw1@a."""
    (a,) = matchmakers(store, 1, seat_ttl=seat_ttl)
    watcher = SeatWatcher(store, seat_ttl, node_silence=0.6)
    room = ""
    for session in sessions:
        await watcher.apply(event(GatewayEvent.CONNECTED, f"c-{session}"))
        room = (await a.join_or_create(ask(session, max_clients=2), client=f"c-{session}"))["room"]
    return a, watcher, room


async def clients(a: Matchmaker) -> int:
    return int((await a.listing())[0]["clients"])


async def test_a_connected_client_keeps_its_seat_while_its_gateway_beats(store: RoomStore) -> None:
    a, watcher, _ = await seated(store, 0.5, "ann", "bob")
    for _ in range(6):  # 1.2 s: more than twice the seat's ttl, no rooms.join asked again
        await watcher.apply(event(GatewayEvent.NODE_HEARTBEAT))
        await asyncio.sleep(0.2)
    assert await clients(a) == 2
    # the gateway falls silent (killed -9): the seats last seat_ttl + node_silence, then they are gone
    await asyncio.sleep(0.6)
    assert await clients(a) == 2
    await asyncio.sleep(0.8)
    assert await clients(a) == 0


async def test_leaving_on_purpose_frees_the_seat_and_a_lost_connection_keeps_the_window(store: RoomStore) -> None:
    a, watcher, room = await seated(store, 0.8, "ann", "bob")
    # the connection's end unsubscribes with its code: not a leave, DISCONNECTED decides
    ending = event(GatewayEvent.UNSUBSCRIBED, "c-ann", channel=f"sim:{room}", code=3000)
    await watcher.apply(ending)
    await watcher.apply(event(GatewayEvent.UNSUBSCRIBED, "c-ann", channel=f"sim:{room}.input"))
    assert await clients(a) == 2
    await watcher.apply(event(GatewayEvent.UNSUBSCRIBED, "c-ann", channel=f"sim:{room}"))  # her own
    assert await clients(a) == 1
    lost = event(GatewayEvent.DISCONNECTED, "c-bob", code=3000, reason="connection closed")
    await watcher.apply(lost)
    assert await clients(a) == 1  # held for the window
    await watcher.apply(event(GatewayEvent.NODE_HEARTBEAT))  # no longer his connection's: not extended
    await asyncio.sleep(1.0)
    assert await clients(a) == 0


async def test_a_clean_close_or_a_final_disconnect_frees_at_once(store: RoomStore) -> None:
    a, watcher, _ = await seated(store, 30.0, "ann", "bob")
    await watcher.apply(event(GatewayEvent.DISCONNECTED, "c-ann", code=3000, client_closed=True))
    assert await clients(a) == 1
    await watcher.apply(event(GatewayEvent.DISCONNECTED, "c-bob", code=3503, reason="force disconnect"))
    assert await clients(a) == 0


async def test_a_seat_taken_back_elsewhere_is_not_freed_by_the_old_connection(store: RoomStore) -> None:
    a, watcher, room = await seated(store, 30.0, "ann", "bob")
    # Bob reconnected (new client id, another gateway) before the old connection's end was processed
    await a.join(room, "bob", client="c-bob-2")
    await watcher.apply(event(GatewayEvent.DISCONNECTED, "c-bob", code=3000, client_closed=True))
    await watcher.apply(event(GatewayEvent.UNSUBSCRIBED, "c-bob", channel=f"sim:{room}"))
    assert await clients(a) == 2
    with pytest.raises(MatchError, match="full"):
        await a.join(room, "cid")
    await watcher.apply(event(GatewayEvent.UNSUBSCRIBED, "c-bob-2", channel=f"sim:{room}"))
    assert await clients(a) == 1


async def test_a_locked_room_takes_no_one_new_but_its_seats_come_back(store: RoomStore) -> None:
    a, b = matchmakers(store, 2)
    seat = await a.join_or_create(ask("ann:tab1", max_clients=3))
    room = seat["room"]
    with pytest.raises(MatchError, match="only the creator") as refused:
        await b.set_lock(room, True, by="bob")
    assert refused.value.status == 403
    locked = await b.set_lock(room, True, by="ann")
    assert locked["locked"] is True and (await store.spec(room) or {})["match"]["locked"] is True
    with pytest.raises(MatchError, match="is locked") as shut:
        await b.join(room, "bob")
    assert shut.value.status == 423
    assert (await b.join(room, "ann:tab1"))["clients"] == 1  # her own seat, the reconnection path
    other = await b.join_or_create(ask("bob", max_clients=3))  # a locked room is not matched
    assert other["room"] != room
    assert (await a.set_lock(room, False, by="root", admins=frozenset({"root"})))["locked"] is False
    assert (await b.join(room, "dan"))["clients"] == 2
    with pytest.raises(MatchError) as missing:
        await a.set_lock("nope", True, by=None)
    assert missing.value.status == 404


def test_lock_over_rest_and_rpc() -> None:
    settings = SimSettings(room_admins=["root"])
    with TestClient(create_app(Runtime(CoreSettings()), settings)) as client:

        def rpc(method: str, user: str, data: dict[str, object]) -> Any:
            return client.post(f"/v1/rpc/{method}", json={"method": method, "user": user, "client": "c", "data": data})

        room = rpc("rooms.join_or_create", "ann", {"kind": "avatar"}).json()["room"]
        refused = rpc("rooms.lock", "bob", {"room": room})
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
        assert rpc("rooms.lock", "ann", {"room": room}).json()["locked"] is True
        shut = rpc("rooms.join", "bob", {"room": room})
        assert shut.status_code == 423 and shut.json()["error"] == "locked"
        assert rpc("rooms.unlock", "root", {"room": room}).json()["locked"] is False
        assert client.post(f"/v1/matchmake/rooms/{room}/lock").json()["locked"] is True
        assert client.get(f"/v1/rooms/{room}").json()["match"]["locked"] is True
        assert client.post(f"/v1/matchmake/rooms/{room}/unlock").json()["locked"] is False
        assert rpc("rooms.lock", "ann", {"room": "../x"}).status_code == 400
        assert client.post("/v1/matchmake/rooms/nope/lock").status_code == 404


async def test_replicas_racing_to_create_for_the_same_filters_make_one_room(store: RoomStore) -> None:
    replicas = matchmakers(store, 4)
    for rounds in range(3):  # the race is decided anew each time the last room fills up
        seats = await asyncio.gather(
            *(m.join_or_create(ask(f"r{rounds}-{i}", mode="race", max_clients=4)) for i, m in enumerate(replicas))
        )
        assert len({seat["room"] for seat in seats}) == 1, [seat["room"] for seat in seats]
    listing = await replicas[0].listing()
    assert sorted(r["clients"] for r in listing) == [4, 4, 4]
