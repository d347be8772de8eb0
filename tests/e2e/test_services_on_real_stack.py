"""Services as separate processes on real Redis and Kafka: readiness, retries, drain, bad config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def test_every_service_becomes_ready_on_the_real_stack(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    services = ["ws-gateway", "auth", "presence", "collab", "stream-ingest", "mqtt-bridge", "sim-engine", "audit-log"]
    running = [start_service(["serve", name], real_env) for name in services]
    for name, service in zip(services, running, strict=True):
        service.wait_healthy()
        body = service.wait_ready()
        assert body["service"] == name
        assert body["checks"] and all(state == "ok" for state in body["checks"].values()), body
        metrics = httpx.get(service.base + "/metrics").text
        assert "tsunagu_bus_published_total" in metrics
    for service in running:
        assert service.stop() == 0


def test_unreachable_dependency_shows_in_readiness_not_as_a_crash(start_service, real_env, pick_port) -> None:  # type: ignore[no-untyped-def]
    nowhere = f"redis://127.0.0.1:{pick_port()}/0"
    service = start_service(["serve", "presence"], {**real_env, "TSUNAGU_REDIS_URL": nowhere})
    service.wait_healthy()
    time.sleep(1.0)
    ready = service.readiness()
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready"
    assert body["checks"]["bus"] == "ok"
    assert "unreachable" in body["checks"]["broker"] and nowhere in body["checks"]["broker"]
    assert service.process.poll() is None, "the service must keep retrying, not exit"
    assert service.stop() == 0


def test_sigterm_drains_and_exits_cleanly(start_service, real_env) -> None:  # type: ignore[no-untyped-def]
    service = start_service(["serve", "ws-gateway"], real_env)
    service.wait_ready()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(30) == 0
    assert "draining" in service.output()


def tsunagu(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, with extra environment variables."""
    command = [sys.executable, "-m", "tsunagu", *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_bad_configuration_stops_with_one_clear_line() -> None:
    result = tsunagu("serve", "auth", env={"TSUNAGU_BUS": "kafak"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TSUNAGU_BUS='kafak'" in lines[0] and "'memory' or 'kafka'" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_port_variable_names_the_variable() -> None:
    result = tsunagu("serve", "collab", env={"TSUNAGU_COLLAB_PORT": "99999"})
    assert result.returncode == 2
    assert "TSUNAGU_COLLAB_PORT=" in result.stderr and "65535" in result.stderr


def test_run_serves_every_service_in_one_process(start_service, pick_port) -> None:  # type: ignore[no-untyped-def]
    ports = {
        "TSUNAGU_AUTH_PORT": pick_port(),
        "TSUNAGU_PRESENCE_PORT": pick_port(),
        "TSUNAGU_COLLAB_PORT": pick_port(),
        "TSUNAGU_INGEST_PORT": pick_port(),
        "TSUNAGU_MQTT_BRIDGE_PORT": pick_port(),
        "TSUNAGU_SIM_PORT": pick_port(),
        "TSUNAGU_AUDIT_PORT": pick_port(),
    }
    # Embedded mode needs no external server: force the memory engines whatever the environment says.
    env = {name: str(port) for name, port in ports.items()} | {
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_BROKER": "memory",
        "TSUNAGU_DATABASE": "memory",
    }
    platform = start_service(["run"], env)
    platform.wait_healthy()
    checks = platform.wait_ready()["checks"]
    assert {"bus", "broker"} <= set(checks) and set(checks.values()) == {"ok"}, checks
    for port in ports.values():
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    assert platform.stop() == 0


async def test_run_mode_accepts_tokens_from_tsunagu_token(start_service, pick_port) -> None:  # type: ignore[no-untyped-def]
    """The newcomer's path: `tsunagu run`, then `tsunagu token`, then a stock SDK connects and publishes."""
    from centrifuge import Client

    ports = {name: str(pick_port()) for name in ("AUTH", "PRESENCE", "COLLAB", "INGEST", "MQTT_BRIDGE", "SIM", "AUDIT")}
    env = {f"TSUNAGU_{name}_PORT": port for name, port in ports.items()} | {
        "TSUNAGU_BUS": "memory",
        "TSUNAGU_BROKER": "memory",
    }
    for name in ("TSUNAGU_GATEWAY_TOKEN_HMAC_SECRET", "TSUNAGU_GATEWAY_API_KEY"):
        env[name] = ""
    platform = start_service(["run"], env)
    platform.wait_healthy()
    issued = await asyncio.to_thread(tsunagu, "token", "--user", "alice", "--channels", "chat:*", env=env)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    client = Client(f"ws://127.0.0.1:{platform.port}/connection/websocket", token=token)
    await client.connect()
    result = await client.publish("chat:welcome", {"text": "hello"})
    assert result is not None
    history = await client.history("chat:welcome", limit=5)
    assert [p.data for p in history.publications] == [{"text": "hello"}]
    await client.disconnect()
    assert platform.stop() == 0
