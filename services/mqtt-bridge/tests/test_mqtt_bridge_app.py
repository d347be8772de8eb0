import socket

from fastapi.testclient import TestClient
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_mqtt_bridge.app import create_app
from tsunagu_mqtt_bridge.config import MqttBridgeSettings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_an_mqtt_broker_it_stays_up_and_readiness_says_why() -> None:
    core = CoreSettings(mqtt_url=f"mqtt://127.0.0.1:{_closed_port()}")
    app = create_app(Runtime(core), MqttBridgeSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "mqtt-bridge"}
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert set(checks) == {"bus", "broker", "mqtt"}
        assert checks["bus"] == checks["broker"] == "ok"
        assert checks["mqtt"] != "ok"
        assert "tsunagu_mqtt_connected" in client.get("/metrics").text
        # Bad RPC input is a clear 4xx even without a broker.
        assert client.post("/mqtt.nope", json={}).status_code == 404
        assert client.post("/mqtt.request", content=b"{").status_code == 400
        bad_topic = {"user": "ann", "client": "c", "data": {"topic": "a/+/b"}}
        assert client.post("/mqtt.request", json=bad_topic).json()["error"].startswith("wildcards")
        anonymous = {"user": "", "client": "c", "data": {"topic": "a/b"}}
        assert client.post("/mqtt.request", json=anonymous).status_code == 403


def test_port_comes_from_its_own_variable(monkeypatch) -> None:
    monkeypatch.setenv("TSUNAGU_MQTT_BRIDGE_PORT", "18085")
    assert MqttBridgeSettings().port == 18085
