from fastapi.testclient import TestClient
from tsunagu_collab.app import create_app
from tsunagu_collab.config import CollabSettings
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), CollabSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "collab"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == set(("bus",))
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_port_comes_from_its_own_variable(monkeypatch) -> None:
    monkeypatch.setenv("TSUNAGU_COLLAB_PORT", "18083")
    assert CollabSettings().port == 18083
