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
