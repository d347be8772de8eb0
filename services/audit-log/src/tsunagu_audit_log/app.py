"""audit-log application factory."""

from fastapi import FastAPI
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_audit_log.config import AuditSettings

SERVICE = "audit-log"
NEEDS = ("bus",)


def create_app(runtime: Runtime, settings: AuditSettings) -> FastAPI:
    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS)
    app.state.settings = settings
    return app
