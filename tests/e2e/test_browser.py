"""The demo web app in real Chromium against `tsunagu run` on the real stack (Kafka, Redis, PostgreSQL,
Mosquitto): chat survives going offline and a reload, the editor converges, the board ticks, the world moves.
The chat's offline outbox is also driven through a proxy that loses replies (js/lossy_proxy.mjs): a lost
acknowledgement, a crashed tab and two tabs flushing at once still deliver every message once, in order.
Screenshots of each view land in tests/e2e/artifacts/ (CI keeps them)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from tsunagu_core.testing_clients import MqttDevice

ACCESS_TOKEN_TTL = 20


@pytest.fixture(scope="module")
def chromium() -> str:
    from tsunagu_core.testing import require_stack

    from tsunagu.browser import find_chromium

    require_stack("the browser tests")
    found = find_chromium()
    if found is None:
        pytest.fail("no Chromium: run `python -m tsunagu.browser` (make test does) or set TSUNAGU_CHROMIUM")
    return found


@pytest.fixture(scope="module")
def platform(chromium: str, start_module_service: Any, pick_port: Any) -> Iterator[dict[str, Any]]:
    """`tsunagu run` on the real engines, in a PostgreSQL schema of its own, with names no other run uses."""
    from tsunagu_core.testing import KAFKA_BOOTSTRAP, POSTGRES_DSN, REDIS_URL

    run = uuid.uuid4().hex[:8]
    schema = f"browser_{run}"
    asyncio.run(_sql(POSTGRES_DSN, f"CREATE SCHEMA {schema}"))
    room = f"e2e{run}"
    ports = {name: pick_port() for name in ("AUTH", "PRESENCE", "COLLAB", "INGEST", "MQTT_BRIDGE", "SIM", "AUDIT")}
    gateway_port, proxy_port = pick_port(), pick_port()
    env = {f"TSUNAGU_{name}_PORT": str(port) for name, port in ports.items()} | {
        "TSUNAGU_BUS": "kafka",
        "TSUNAGU_BROKER": "redis",
        "TSUNAGU_DATABASE": "postgres",
        "TSUNAGU_REDIS_URL": REDIS_URL,
        "TSUNAGU_KAFKA_BOOTSTRAP": KAFKA_BOOTSTRAP,
        "TSUNAGU_POSTGRES_DSN": f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}",
        # audit-log keeps its tables in a schema of its own choosing: this run's, not `public`
        "TSUNAGU_AUDIT_SCHEMA_NAME": schema,
        "TSUNAGU_NODE_NAME": f"browser-{run}",
        # short-lived access tokens, so the app's refresh before expiry happens during the tests
        "TSUNAGU_AUTH_ACCESS_TOKEN_TTL": str(ACCESS_TOKEN_TTL),
        # The gateway's origin, as `tsunagu run` allows by default, and the lossy proxy's in front of it.
        "TSUNAGU_AUTH_CORS_ORIGINS": json.dumps(
            [f"http://127.0.0.1:{gateway_port}", f"http://localhost:{gateway_port}", f"http://127.0.0.1:{proxy_port}"]
        ),
        "TSUNAGU_MQTT_BRIDGE_FILTERS": json.dumps([f"demo-{run}/#"]),
        "TSUNAGU_SIM_ROOMS": json.dumps(
            [
                {"room": room, "kind": "avatar", "tick_hz": 20},
                # A digital twin of one rover (test_a_twin_room_...): its telemetry and command topics.
                {"room": f"twin{run}", "kind": "twin", "tick_hz": 10, "params": {"devices": _twin_devices(run)}},
            ]
        ),
        "TSUNAGU_GATEWAY_WEB_DEMO": json.dumps(
            {
                "chat_rooms": [f"chat:{room}"],
                "editor_doc": room,
                "ticker_symbols": ["TSU", "NGU", "KFK"],
                "iot_channels": [f"mqtt:demo-{run}/telemetry"],
                "world_room": room,
                # A device agent of this run (test_the_device_view_...): its MQTT topics under the bridge's filter.
                "devices": [
                    {
                        "device": f"agent-{run}",
                        "command_topic": f"demo-{run}/agent/set",
                        "telemetry_topic": f"demo-{run}/agent/telemetry",
                        "ack_topic": f"demo-{run}/agent/acks",
                    }
                ],
            }
        ),
    }
    process = start_module_service(["run"], env, port=gateway_port)
    try:
        process.wait_healthy(90)
        process.wait_ready(60)
        yield {
            "base": process.base,
            "room": room,
            "run": run,
            "chromium": chromium,
            "proxy_port": proxy_port,
        }
    finally:
        process.stop()
        asyncio.run(_sql(POSTGRES_DSN, f"DROP SCHEMA {schema} CASCADE"))


def _twin_devices(run: str) -> dict[str, Any]:
    return {"rover": {"telemetry": f"demo-{run}/rover/telemetry", "command": f"demo-{run}/rover/set"}}


async def _sql(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def test_chat_messages_sent_offline_survive_a_reload_and_arrive_once_in_order(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("chat-offline", platform)
    assert result["stillOffline"] != "connected"
    assert result["bobSaw"] == result["sent"], "bob must see each of the 20 exactly once, in order"
    assert result["aliceSees"] == result["sent"]
    assert result["bobHistory"] == result["sent"], "history after a reload has no doubles either"


def _resent_once(publishes: list[dict[str, Any]], text: str, sent: list[str]) -> None:
    """On the wire: `text` was applied (the gateway answered an offset), its reply never reached the page,
    and the outbox resent it on a new connection with the same key, answered with the original offset;
    every other message went once, in order. Without that resend, "bob saw it once" would prove nothing."""
    attempts = [p for p in publishes if p["text"] == text]
    assert [p["fate"] for p in attempts] == ["reply lost", "delivered"], f"the outbox must resend it: {publishes}"
    lost, resent = attempts
    assert lost["offset"] > 0, "the gateway applied it before its reply was lost"
    assert resent["key"] == lost["key"], "the resend carries the same idempotency key"
    assert resent["connection"] != lost["connection"], "resent on a new connection"
    assert (resent["offset"], resent["epoch"]) == (lost["offset"], lost["epoch"]), "acknowledged as the original"
    assert [p["text"] for p in publishes if p is not lost] == sent, "every other message went once, in order"


async def test_a_message_whose_acknowledgement_was_lost_is_resent_and_still_arrives_once(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("outbox-lost-ack", platform, proxy_port=platform["proxy_port"])
    sent = result["sent"]
    assert result["bobSaw"] == sent, "bob sees the resent message once, in its place"
    assert result["bobHistory"] == sent
    assert result["aliceSees"] == sent
    _resent_once(result["publishes"], sent[1], sent)


async def test_a_message_in_flight_when_its_tab_crashed_is_resent_by_another_tab_once(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("outbox-crashed-tab", platform, proxy_port=platform["proxy_port"])
    sent = result["sent"]
    assert result["bobSaw"] == sent, "bob sees each message once, in order"
    assert result["bobHistory"] == sent
    assert result["twoSees"] == sent
    _resent_once(result["publishes"], sent[0], sent)


async def test_two_tabs_share_one_outbox_and_one_flushes_at_a_time(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("outbox-two-tabs", platform, proxy_port=platform["proxy_port"])
    one, two = result["sent"]["one"], result["sent"]["two"]
    seen = result["bobSaw"]
    assert sorted(seen) == sorted(one + two), "bob sees every message of both tabs once"
    assert [t for t in seen if t in one] == one and [t for t in seen if t in two] == two, "in order per tab"
    assert result["bobHistory"] == seen
    publishes = result["publishes"]
    assert result["inFlightWhileHeld"] == 1, f"both tabs sent while the first reply was held: {publishes}"
    keys = [p["key"] for p in publishes]
    assert len(keys) == len(set(keys)) == len(one) + len(two), f"a message was sent twice: {publishes}"
    assert sorted(p["text"] for p in publishes) == sorted(one + two)
    assert all(p["fate"] == "delivered" for p in publishes), publishes
    ordered = sorted(publishes, key=lambda p: p["sentAt"])
    for previous, following in itertools.pairwise(ordered):
        assert following["sentAt"] >= previous["repliedAt"], f"two publishes in flight at once: {previous}, {following}"
    locks = result["locks"]
    assert len(locks["held"]) == 1 and locks["waiting"], f"one tab flushes, the other waits for the lock: {locks}"
    assert locks["held"][0] not in locks["waiting"]


async def test_the_session_is_refreshed_before_the_token_expires_and_the_connection_stays(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("session", platform)
    assert result["refreshedBeforeExpiry"] and result["sameUser"] and result["newRefreshToken"]
    assert result["stateAfterExpiry"] == "connected"
    assert set(result["states"]) <= {"connected"}, f"the connection dropped: {result['states']}"


async def test_two_editors_typing_at_once_converge(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("editor", platform)
    assert result["alice"] == result["bob"]
    assert result["remoteCursors"] >= 1, "alice sees bob's cursor"


async def test_the_board_ticks_and_shows_device_telemetry(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    marker = f"reading-{platform['run']}"
    stop = threading.Event()
    device = threading.Thread(target=_device, args=(f"demo-{platform['run']}/telemetry", marker, stop), daemon=True)
    device.start()
    try:
        result = await scenario("board", platform, symbol="TSU", iot_marker=marker)
    finally:
        stop.set()
        device.join(5)
    assert result["first"] != result["second"]
    assert result["status"] == {"stream-ingest": "up", "mqtt-bridge": "up", "sim-engine": "up", "collab": "up"}


def _device(topic: str, marker: str, stop: threading.Event) -> None:
    """A paho-mqtt device publishing telemetry to Mosquitto until told to stop."""
    url = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")
    host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    n = 0
    while not stop.wait(0.5):
        n += 1
        client.publish(topic, json.dumps({"device": "sensor-1", "temperature": 20 + n % 5, "note": marker}), qos=1)
    client.loop_stop()
    client.disconnect()


async def test_the_world_shows_the_other_tab_moving(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("world", platform)
    assert {"alice", "bob"} <= set(result["joined"]), "each avatar joins when its user opens the world"
    assert result["after"]["x"] > result["before"]["x"]


async def test_a_twin_room_in_the_world_view_shows_devices_and_sends_a_command_once(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    """A paho-mqtt rover publishing telemetry through Mosquitto and mqtt-bridge; the World view of its twin
    room shows it live, and the command sent from the page's form reaches it once, with its receipt."""
    run = platform["run"]
    room = f"twin{run}"
    marker = f"m{run}"
    url = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")
    rover = await asyncio.to_thread(MqttDevice, int(url.rsplit(":", 1)[1].strip("/")), f"rover-{run}")
    await asyncio.to_thread(rover.subscribe, f"demo-{run}/rover/set")
    stop = asyncio.Event()

    async def telemetry() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"x": 20 + n % 10, "y": 30, "battery": 90, "note": marker}
            rover.client.publish(f"demo-{run}/rover/telemetry", json.dumps(body), qos=1)
            await asyncio.sleep(0.5)

    sender = asyncio.create_task(telemetry())
    try:
        result = await scenario("twin", platform, twinRoom=room, marker=marker)
    finally:
        stop.set()
        await sender
    assert 20 <= result["rover"]["x"] <= 30 and result["rover"]["y"] == 30
    await asyncio.sleep(1.0)
    commands = [json.loads(payload) for topic, payload in rover.received if topic == f"demo-{run}/rover/set"]
    rover.close()
    assert commands == [{"drive": marker}], "the device gets the command once"
    assert [line["state"] for line in result["receipt"]].count("delivered") == 1


async def test_the_device_view_commands_a_device_agent_over_webrtc_then_mqtt_once_each(platform, scenario) -> None:  # type: ignore[no-untyped-def]
    """The Device view and an aiortc device agent of this test on the real stack: telemetry and a command over
    the data channel, then, the channel dropped, over Kafka, mqtt-bridge and Mosquitto; the device carries out
    each command once, by the path the view showed."""
    from centrifuge import Client

    from tsunagu.cli import DEVELOPMENT_TOKEN_SECRET, hs256_token
    from tsunagu.device_agent import DeviceAgent

    run = platform["run"]
    device = f"agent-{run}"
    url = os.environ.get("TSUNAGU_MQTT_URL", "mqtt://127.0.0.1:1883")
    done: list[tuple[Any, str]] = []
    token = hs256_token({"sub": device, "exp": int(time.time()) + 600}, DEVELOPMENT_TOKEN_SECRET)
    client = Client(platform["base"].replace("http", "ws", 1) + "/connection/websocket", token=token)
    await client.connect()
    agent = DeviceAgent(
        client,
        device,
        ["alice"],
        lambda command_id, payload, path: done.append((payload, path)),
        ack_topic=f"demo-{run}/agent/acks",
        telemetry_topic=f"demo-{run}/agent/telemetry",
    )
    await agent.start()
    tasks = [asyncio.create_task(agent.run_mqtt(url, f"demo-{run}/agent/set", f"e2e-agent-{run}"))]
    await asyncio.wait_for(agent.mqtt_ready.wait(), 15)
    tasks.append(asyncio.create_task(agent.run_telemetry(lambda: {"battery": 80, "rpm": 1200}, 0.1, 0.5)))
    try:
        result = await scenario("rtc-device", platform, device=device, marker=run)
        await asyncio.sleep(1.0)  # nothing more arrives
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.close()
        await client.disconnect()
    assert result["fields"] == {"battery": "80", "rpm": "1200"}
    assert (result["first"]["path"], result["second"]["path"]) == ("webrtc", "mqtt")
    assert result["overMqtt"]["path"] == "mqtt"
    assert result["third"]["path"] == "webrtc", "called again, the data channel is back"
    assert done == [
        ({"speed": 1, "marker": run}, "webrtc"),
        ({"turn": 90, "marker": run}, "mqtt"),
        ({"stop": True, "marker": run}, "webrtc"),
    ], "each command once, by the path the view showed"
    assert agent.telemetry_sent["webrtc"] > 0 and agent.telemetry_sent["mqtt"] > 0


@pytest.mark.parametrize("transport", ["http_stream", "sse"])
async def test_the_app_told_to_use_an_emulation_transport_chats_over_it(platform, scenario, transport: str) -> None:  # type: ignore[no-untyped-def]
    """`?transport=http_stream|sse`: the stock SDK in the app connects over Centrifugo's emulation transports
    (a stream down, POST /emulation up) and chats with a WebSocket user both ways."""
    result = await scenario("transport", platform, transport=transport)
    assert result["transport"] == transport
