"""The composition root's table of services: the only module that imports service packages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from tsunagu_audit_log.app import create_app as audit_log_app
from tsunagu_audit_log.config import AuditSettings
from tsunagu_auth.app import create_app as auth_app
from tsunagu_auth.config import AuthSettings
from tsunagu_collab.app import create_app as collab_app
from tsunagu_collab.config import CollabSettings
from tsunagu_core.config import ServiceSettings
from tsunagu_core.lifecycle import Runtime
from tsunagu_mqtt_bridge.app import create_app as mqtt_bridge_app
from tsunagu_mqtt_bridge.config import MqttBridgeSettings
from tsunagu_presence.app import create_app as presence_app
from tsunagu_presence.config import PresenceSettings
from tsunagu_sim_engine.app import create_app as sim_engine_app
from tsunagu_sim_engine.config import SimSettings
from tsunagu_stream_ingest.app import create_app as stream_ingest_app
from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_ws_gateway.app import create_app as ws_gateway_app
from tsunagu_ws_gateway.config import GatewaySettings


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    settings: type[ServiceSettings]
    # Each factory takes its own settings subclass, hence Any.
    factory: Callable[[Runtime, Any], FastAPI]


# In the order `tsunagu run` starts them; the gateway first so its port answers soonest.
SERVICES: dict[str, ServiceEntry] = {
    entry.name: entry
    for entry in (
        ServiceEntry("ws-gateway", GatewaySettings, ws_gateway_app),
        ServiceEntry("auth", AuthSettings, auth_app),
        ServiceEntry("presence", PresenceSettings, presence_app),
        ServiceEntry("collab", CollabSettings, collab_app),
        ServiceEntry("stream-ingest", IngestSettings, stream_ingest_app),
        ServiceEntry("mqtt-bridge", MqttBridgeSettings, mqtt_bridge_app),
        ServiceEntry("sim-engine", SimSettings, sim_engine_app),
        ServiceEntry("audit-log", AuditSettings, audit_log_app),
    )
}
