"""Attacks on mqtt-bridge's RPC endpoint: a device request in any user's name without the platform's
credential is refused before it reaches MQTT; an oversized body gets 413; the service stays up."""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient
from tsunagu_core.config import ConfigError, CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_mqtt_bridge.app import create_app
from tsunagu_mqtt_bridge.config import MqttBridgeSettings

TOKEN = "bridge-internal-token"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bridge(**core: object) -> TestClient:
    settings = CoreSettings(mqtt_url=f"mqtt://127.0.0.1:{closed_port()}", internal_token=TOKEN, **core)
    return TestClient(create_app(Runtime(settings), MqttBridgeSettings()))


def test_a_forged_device_request_is_refused() -> None:
    forged = {"method": "mqtt.request", "user": "admin", "client": "x", "data": {"topic": "plant/valve/open"}}
    with bridge() as client:
        for headers in ({}, {"authorization": "Bearer guessed"}):
            answer = client.post("/mqtt.request", json=forged, headers=headers)
            assert answer.status_code == 401, answer.text
        # the gateway's call gets through to the handler (here: a bad topic, answered 400)
        platform = {"authorization": f"Bearer {TOKEN}"}
        bad = {"user": "ann", "client": "c", "data": {"topic": "a/+/b"}}
        assert client.post("/mqtt.request", json=bad, headers=platform).status_code == 400
        assert client.get("/healthz").status_code == 200


def test_an_oversized_request_gets_413() -> None:
    with bridge(http_max_body_bytes=4096) as client:
        # a small payload in a large body: what is refused is the body, before it is parsed
        body = {"user": "ann", "client": "c", "data": {"topic": "a/+/b", "payload": "x", "padding": "x" * 100_000}}
        answer = client.post("/mqtt.request", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 413 and answer.json()["error"] == "payload_too_large"
        assert client.get("/healthz").status_code == 200


def test_production_refuses_an_open_bridge_api() -> None:
    with pytest.raises(ConfigError, match="mqtt-bridge: TSUNAGU_ENV=production"):
        create_app(Runtime(CoreSettings(env="production")), MqttBridgeSettings())
