"""stream-ingest application factory."""

from fastapi import FastAPI
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_stream_ingest.config import IngestSettings

SERVICE = "stream-ingest"
NEEDS = ("bus", "broker")


def create_app(runtime: Runtime, settings: IngestSettings) -> FastAPI:
    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS)
    app.state.settings = settings
    return app
