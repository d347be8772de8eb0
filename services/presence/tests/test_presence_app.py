import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from tsunagu_core import topics
from tsunagu_core.broker import ClientInfo
from tsunagu_core.config import CoreSettings
from tsunagu_core.envelope import publish_event
from tsunagu_core.lifecycle import Runtime
from tsunagu_core.testing import REDIS_URL, require_stack
from tsunagu_core.wire.events_pb2 import GatewayEvent
from tsunagu_presence.app import create_app
from tsunagu_presence.config import PresenceSettings
from tsunagu_presence.store import RedisPresenceStore


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings(bus="memory", broker="memory")), PresenceSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "presence"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"bus", "broker", "presence-store"}
        metrics = client.get("/metrics").text
        for name in ("tsunagu_presence_online_users", "tsunagu_presence_dead_nodes_total", "tsunagu_presence_sweep"):
            assert name in metrics


def test_port_comes_from_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_PRESENCE_PORT", "18082")
    monkeypatch.setenv("TSUNAGU_PRESENCE_DEAD_AFTER", "6")
    assert PresenceSettings().port == 18082
    assert PresenceSettings().dead_after == 6.0


@pytest.fixture(params=["memory", "redis"])
def client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    prefix = f"test-presence-app-{uuid.uuid4().hex[:10]}"
    if request.param == "redis":
        require_stack("the Redis presence store")
        core = CoreSettings(bus="memory", broker="redis", redis_url=REDIS_URL)
    else:
        core = CoreSettings(bus="memory", broker="memory")
    runtime = Runtime(core)
    app = create_app(runtime, PresenceSettings(key_prefix=prefix))
    with TestClient(app) as test_client:
        deadline = time.monotonic() + 10
        while test_client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield test_client
        store = app.state.tracker.store
        if isinstance(store, RedisPresenceStore):
            redis = store.redis

            async def clean() -> None:
                keys = [key async for key in redis.scan_iter(f"{prefix}*")]
                if keys:
                    await redis.delete(*keys)

            test_client.portal.call(clean)


def send(client: TestClient, kind: int, client_id: str, user: str, channel: str = "") -> None:
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    event = GatewayEvent(kind=kind, node="gw-a@1", client_id=client_id, user_id=user, session_id="sid", channel=channel)  # type: ignore[arg-type]

    async def publish() -> None:
        await publish_event(runtime.bus, topics.GATEWAY_EVENTS, "gateway.x", event, key=user, source="test")

    client.portal.call(publish)


def wait_online(client: TestClient, user: str, online: bool) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while True:
        body: dict[str, object] = client.get(f"/v1/users/{user}/online").json()
        if body["online"] is online or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def test_user_online_follows_gateway_events(client: TestClient) -> None:
    user = f"ann-{uuid.uuid4().hex[:6]}"
    assert client.get(f"/v1/users/{user}/online").json() == {"user": user, "online": False, "connections": []}
    before = int(time.time() * 1000)
    send(client, GatewayEvent.CONNECTED, "c1", user)
    body = wait_online(client, user, True)
    assert body["online"] is True, body
    [connection] = body["connections"]  # type: ignore[misc]
    assert connection["client"] == "c1" and connection["node"] == "gw-a@1" and connection["session"] == "sid"
    assert before <= connection["since"] <= int(time.time() * 1000)
    send(client, GatewayEvent.DISCONNECTED, "c1", user)
    assert wait_online(client, user, False) == {"user": user, "online": False, "connections": []}


def test_channel_presence_answers_like_the_gateway(client: TestClient) -> None:
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    channel = f"chat:room/{uuid.uuid4().hex[:6]}"
    info = ClientInfo(user="ann", client="c1", conn_info=b'{"name":"Ann"}')

    async def join() -> None:
        await runtime.broker.add_presence(channel, "c1", info, ttl=30)
        await runtime.broker.add_presence(channel, "c2", ClientInfo(user="ann", client="c2"), ttl=30)

    client.portal.call(join)
    assert client.get(f"/v1/channels/{channel}/presence").json() == {
        "presence": {
            "c1": {"user": "ann", "client": "c1", "conn_info": {"name": "Ann"}},
            "c2": {"user": "ann", "client": "c2"},
        }
    }
    assert client.get(f"/v1/channels/{channel}/presence-stats").json() == {"num_clients": 2, "num_users": 1}

    async def leave() -> None:
        await runtime.broker.remove_presence(channel, "c1")
        await runtime.broker.remove_presence(channel, "c2")

    client.portal.call(leave)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/users/a%20b/online",
        "/v1/users/" + "x" * 256 + "/online",
        "/v1/channels/bad%09name/presence",
        "/v1/channels/%20/presence-stats",
    ],
)
def test_bad_names_get_a_clear_400(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"] == "bad_request" and "printable" in body["message"]
