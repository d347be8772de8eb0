from fastapi.testclient import TestClient
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_sim_engine.app import create_app
from tsunagu_sim_engine.config import SimSettings


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), SimSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "sim-engine"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"bus", "broker", "sim-engine-store"}
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_port_comes_from_its_own_variable(monkeypatch) -> None:
    monkeypatch.setenv("TSUNAGU_SIM_PORT", "18086")
    assert SimSettings().port == 18086


def test_configured_rooms_exist_after_start_and_bad_ones_stop_it() -> None:
    import time

    import pytest
    from tsunagu_core.config import ConfigError

    settings = SimSettings(rooms=[{"room": "world", "kind": "avatar", "tick_hz": 10}])
    with TestClient(create_app(Runtime(CoreSettings()), settings)) as client:
        deadline = time.monotonic() + 5
        while (room := client.get("/v1/rooms/world")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert room.status_code == 200 and room.json()["kind"] == "avatar"
    with pytest.raises(ConfigError, match="TSUNAGU_SIM_ROOMS: kind is one of"):
        create_app(Runtime(CoreSettings()), SimSettings(rooms=[{"room": "x", "kind": "nope"}]))
