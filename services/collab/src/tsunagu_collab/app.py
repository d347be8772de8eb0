"""collab application factory."""

from fastapi import FastAPI
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_collab.config import CollabSettings

SERVICE = "collab"
NEEDS = ("bus",)


def create_app(runtime: Runtime, settings: CollabSettings) -> FastAPI:
    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS)
    app.state.settings = settings
    return app
