"""auth application factory."""

from fastapi import FastAPI
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_auth.config import AuthSettings

SERVICE = "auth"
NEEDS = ("bus", "broker")


def create_app(runtime: Runtime, settings: AuthSettings) -> FastAPI:
    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS)
    app.state.settings = settings
    return app
