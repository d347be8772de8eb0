"""presence application factory."""

from fastapi import FastAPI
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_presence.config import PresenceSettings

SERVICE = "presence"
NEEDS = ("bus", "broker")


def create_app(runtime: Runtime, settings: PresenceSettings) -> FastAPI:
    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS)
    app.state.settings = settings
    return app
