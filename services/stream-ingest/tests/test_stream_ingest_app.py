from fastapi.testclient import TestClient
from tsunagu_core.config import CoreSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_stream_ingest.app import create_app
from tsunagu_stream_ingest.config import IngestSettings


def test_health_readiness_and_metrics_on_embedded_engines() -> None:
    app = create_app(Runtime(CoreSettings()), IngestSettings())
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok", "service": "stream-ingest"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == set(("bus", "broker"))
        assert "tsunagu_bus_published_total" in client.get("/metrics").text


def test_port_comes_from_its_own_variable(monkeypatch) -> None:
    monkeypatch.setenv("TSUNAGU_INGEST_PORT", "18084")
    assert IngestSettings().port == 18084
