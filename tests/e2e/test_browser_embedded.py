"""`make run` on a machine with nothing installed: `tsunagu run` with no TSUNAGU_* variable at all (memory
engines, the embedded MQTT broker, the demo device), every service ready, and the Board in real Chromium
showing the device's telemetry and its answer to a command; a locked login says so and for how long; a
chat message from the server API shows who (the server) and when."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

SERVICE_PORTS = ("AUTH", "PRESENCE", "COLLAB", "INGEST", "MQTT_BRIDGE", "SIM", "AUDIT")
LOGIN_MAX_FAILURES = 2


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium: required under `make test` (TSUNAGU_TEST_STACK=1, which installs it), else optional."""
    from tsunagu_core.testing import REAL_STACK

    from tsunagu.browser import find_chromium

    found = find_chromium()
    if found is None:
        if REAL_STACK:
            pytest.fail("no Chromium: run `python -m tsunagu.browser` (make test does) or set TSUNAGU_CHROMIUM")
        pytest.skip("no Chromium: run `python -m tsunagu.browser` or set TSUNAGU_CHROMIUM")
    return found


@pytest.fixture(scope="module")
def embedded(start_module_service: Any, pick_port: Any) -> Iterator[dict[str, Any]]:
    ports = {name: pick_port() for name in SERVICE_PORTS}
    env = {f"TSUNAGU_{name}_PORT": str(port) for name, port in ports.items()} | {
        "TSUNAGU_RUN_MQTT_PORT": "0",
        "TSUNAGU_AUTH_LOGIN_MAX_FAILURES": str(LOGIN_MAX_FAILURES),
    }
    started = time.monotonic()
    process = start_module_service(["run"], env, inherit_tsunagu=False)
    try:
        process.wait_healthy(30)
        urls = [process.base] + [f"http://127.0.0.1:{port}" for port in ports.values()]
        waiting = _wait_all_ready(urls, deadline=started + 30)
        assert not waiting, f"not ready 30 s after start: {waiting}\n{process.output()[-4000:]}"
        yield {"base": process.base, "room": "lobby", "process": process}
    finally:
        process.stop()


def _wait_all_ready(urls: list[str], deadline: float) -> dict[str, str]:
    """Polls every /readyz until all are 200 or the deadline passes; what was still not ready, and why."""
    waiting = {url: "no answer" for url in urls}
    while waiting and time.monotonic() < deadline:
        for url in list(waiting):
            try:
                response = httpx.get(url + "/readyz", timeout=2)
            except httpx.HTTPError as exc:
                waiting[url] = repr(exc)
                continue
            if response.status_code == 200:
                del waiting[url]
            else:
                waiting[url] = response.text
        time.sleep(0.2)
    return waiting


def test_run_with_nothing_configured_is_ready_with_its_own_mqtt_broker(embedded) -> None:  # type: ignore[no-untyped-def]
    output = embedded["process"].output()
    assert "bus=memory broker=memory database=memory" in output
    assert "(embedded, MQTT 5" in output and "demo-thermostat" in output
    # Every development secret in effect is named with the variable that replaces it.
    for variable in ("TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET", "TSUNAGU_GATEWAY_API_KEY", "TSUNAGU_AUTH_ADMIN_API_KEY"):
        assert f"(set {variable})" in output, variable
    bridge = httpx.get(embedded["base"] + "/web/services", timeout=5).json()["mqtt-bridge"]
    assert bridge == {"state": "up"}


async def test_the_board_shows_the_demo_device_and_its_answer_to_a_command(embedded, browser, scenario) -> None:  # type: ignore[no-untyped-def]
    result = await scenario("device", {**embedded, "chromium": browser}, setpoint=23.5)
    assert result["telemetry"] >= 1
    assert result["answered"]["state"] == "ok", result["answered"]
    assert result["answered"]["text"].startswith("demo-thermostat answered in ")
    assert "setpoint 23.5 °C" in result["answered"]["text"]
    assert "setpoint 23.5 °C" in result["state"], "the state channel shows what the device did"
    assert not result["banner"], "nothing is missing"
    assert set(result["status"].values()) == {"up"}, result["status"]
    assert "MQTT connection lost" not in embedded["process"].output(), "the bridge kept its broker connection"


async def test_the_device_view_drives_the_demo_rover_over_webrtc_then_over_mqtt(embedded, browser, scenario) -> None:  # type: ignore[no-untyped-def]
    """`make run`'s demo rover (a device agent in run mode): the Device view calls it, sees its telemetry and
    has a command acknowledged over the data channel; with the channel dropped, both go on over MQTT."""
    result = await scenario("rtc-device", {**embedded, "chromium": browser}, device="demo-rover", marker="m1")
    assert result["overChannel"]["path"] == "webrtc"
    assert {"x", "y", "heading", "speed", "battery"} <= set(result["fields"]), result["fields"]
    assert result["first"]["path"] == "webrtc", result["first"]
    assert "MQTT" in result["pathText"], "the view says which path is in use"
    assert result["overMqtt"]["path"] == "mqtt" and result["overMqtt"]["seq"] > result["overChannel"]["seq"]
    assert result["second"]["path"] == "mqtt", result["second"]
    assert result["third"]["path"] == "webrtc", "called again, the data channel is back"


async def test_a_locked_login_says_it_is_locked_and_for_how_long(embedded, browser, scenario) -> None:  # type: ignore[no-untyped-def]
    user = f"mallory-{time.monotonic_ns()}"
    platform = {**embedded, "chromium": browser}
    result = await scenario("login-locked", platform, user=user, max_failures=LOGIN_MAX_FAILURES)
    *failed, locked = result["messages"]
    assert all(message.startswith("Login failed") for message in failed), failed
    assert "not reachable" not in locked
    assert locked.startswith(f"Too many failed logins: {user} is locked for "), locked
    # auth locks for its 300 s window: "4 min 5x s", counted down from Retry-After
    assert " min " in locked and "(until " in locked, locked


async def test_a_chat_message_from_the_server_api_shows_its_author_and_time(embedded, browser, scenario) -> None:  # type: ignore[no-untyped-def]
    from tsunagu.cli import DEVELOPMENT_API_KEY

    platform = {**embedded, "chromium": browser}
    result = await scenario("chat-server", platform, api_key=DEVELOPMENT_API_KEY)
    assert result["shown"]["user"] == "server" and result["shown"]["server"] is True
    assert re.fullmatch(r"\d{1,2}:\d{2}( [AP]M)?", result["shown"]["time"]), result["shown"]


async def test_an_admin_ends_one_of_bobs_sessions_in_the_console(embedded, browser, scenario) -> None:  # type: ignore[no-untyped-def]
    """The issue's console story: the admin logs in with a TOTP code, sees bob's two sessions, ends one;
    that tab is logged out, bob's other browser is told, and the live audit feed shows both and verifies."""
    import pyotp

    from tsunagu.cli import DEVELOPMENT_ADMIN, DEVELOPMENT_ADMIN_PASSWORD, DEVELOPMENT_ADMIN_TOTP_SECRET

    admin = {
        "user": DEVELOPMENT_ADMIN,
        "password": DEVELOPMENT_ADMIN_PASSWORD,
        "otp": pyotp.TOTP(DEVELOPMENT_ADMIN_TOTP_SECRET).now(),
    }
    result = await scenario("console", {**embedded, "chromium": browser}, admin=admin)
    assert result["asked"].startswith("Enter the code from your authenticator app"), result["asked"]
    assert result["whoami"] == f"{DEVELOPMENT_ADMIN} (acr 2)"
    sessions = {row["id"]: row for row in result["before"]}
    for sid in (result["laptopSid"], result["phoneSid"]):
        assert sessions[sid]["connections"] >= 1 and sessions[sid]["gateways"], sessions[sid]
        assert sessions[sid]["device"] == "Headless Chrome on Linux", sessions[sid]
    assert result["laptopMessage"].startswith("Your session was ended (token revoked"), result["laptopMessage"]
    assert result["phoneNotice"].startswith("A session of yours was ended: Headless Chrome on Linux from 127.0.0.1")
    assert f"(by {DEVELOPMENT_ADMIN}: ended in the console)" in result["phoneNotice"], result["phoneNotice"]
    assert result["verified"].startswith("chain: verified ("), result["verified"]
    assert "bob" in {client["user"] for client in result["presence"]["presence"].values()}, result["presence"]
    ended = [i for i in result["feed"] if i["action"] == "auth.revoke"]
    assert ended and ended[0]["actor"] == DEVELOPMENT_ADMIN and ended[0]["subject"] == "bob"


def _children(pid: int) -> list[int]:
    """The process's children, whichever of its threads started them."""
    children = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/children") as listing:
            children += [int(child) for child in listing.read().split()]
    return children


# Last: it breaks this module's platform.
async def test_the_board_names_the_missing_broker_when_the_embedded_one_is_gone(embedded, browser, scenario) -> None:  # type: ignore[no-untyped-def]
    """The embedded broker (the platform's own child process) dies: the Board says mqtt-bridge runs but
    cannot reach the MQTT broker, and why, rather than that mqtt-bridge is not running."""
    process = embedded["process"].process
    brokers = _children(process.pid)
    assert len(brokers) == 1, f"one child process, the broker: {brokers}"
    os.kill(brokers[0], signal.SIGKILL)
    result = await scenario("missing-broker", {**embedded, "chromium": browser})
    assert result["status"] == "waiting"
    assert result["banner"].startswith("mqtt-bridge runs but cannot reach the MQTT broker ("), result["banner"]
    assert "not running" not in result["banner"]
