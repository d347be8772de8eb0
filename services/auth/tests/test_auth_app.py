from fastapi.testclient import TestClient
from tsunagu_auth.app import create_app
from tsunagu_auth.config import AuthSettings
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), AuthSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "auth"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {
            "bus",
            "broker",
            "revocations",
            "login-limits",
            "auth-nonces",
            "auth-connections",
        }
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_port_comes_from_its_own_variable(monkeypatch) -> None:
    monkeypatch.setenv("TSUNAGU_AUTH_PORT", "18081")
    assert AuthSettings().port == 18081
