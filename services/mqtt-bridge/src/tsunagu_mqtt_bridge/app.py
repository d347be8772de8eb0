"""mqtt-bridge application factory."""

from fastapi import FastAPI
from tsunagu_core.lifecycle import Runtime, create_service_app

from tsunagu_mqtt_bridge.config import MqttBridgeSettings

SERVICE = "mqtt-bridge"
NEEDS = ("bus", "broker")


def create_app(runtime: Runtime, settings: MqttBridgeSettings) -> FastAPI:
    app = create_service_app(service=SERVICE, runtime=runtime, needs=NEEDS)
    app.state.settings = settings
    return app
