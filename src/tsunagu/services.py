"""The composition root's table of services: the only module that imports service packages.

Each entry names its settings class and app factory by module path and imports them only when asked:
`tsunagu --help` or `tsunagu token` load no service, and `tsunagu serve auth` loads auth alone. A
gateway that is killed and restarted is back as soon as its own imports are done, which is what
bounds how much a reconnecting client must recover.
"""

from __future__ import annotations

import importlib

# Not `typing.TYPE_CHECKING`: importing typing alone costs this CLI's start-up a tenth of Python's own.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from fastapi import FastAPI
    from tsunagu_core.config import ServiceSettings
    from tsunagu_core.lifecycle import Runtime


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class ServiceEntry:
    """A service by name, with its settings class and app factory imported on first use (a plain class:
    even `dataclasses` costs a CLI start-up more than the rest of this module)."""

    __slots__ = ("env_prefix", "event_loop", "factory_path", "name", "port", "settings_path")

    def __init__(
        self, name: str, settings_path: str, factory_path: str, env_prefix: str, port: int, event_loop: str
    ) -> None:
        self.name = name
        # What `tsunagu serve` runs it on unless TSUNAGU_EVENT_LOOP says otherwise.
        self.event_loop = event_loop
        self.settings_path = settings_path
        self.factory_path = factory_path
        # What the settings class says too (tests/stack checks they agree): known here without importing it,
        # so `tsunagu serve` can listen before the service is loaded.
        self.env_prefix = env_prefix
        self.port = port

    @property
    def settings(self) -> type[ServiceSettings]:
        settings: type[ServiceSettings] = _load(self.settings_path)
        return settings

    @property
    def factory(self) -> Callable[[Runtime, Any], FastAPI]:
        # Each factory takes its own settings subclass, hence Any.
        factory: Callable[[Runtime, Any], FastAPI] = _load(self.factory_path)
        return factory


def _entry(
    name: str, package: str, settings_class: str, env_prefix: str, port: int, event_loop: str = "asyncio"
) -> ServiceEntry:
    factory = f"{package}.app:create_app"
    return ServiceEntry(name, f"{package}.config:{settings_class}", factory, env_prefix, port, event_loop)


# In the order `tsunagu run` starts them; the gateway first so its port answers soonest.
SERVICES: dict[str, ServiceEntry] = {
    entry.name: entry
    for entry in (
        # uvloop: the gateway's fan-out writes a socket per subscriber, in C there (docs/benchmarks.md).
        _entry("ws-gateway", "tsunagu_ws_gateway", "GatewaySettings", "TSUNAGU_GATEWAY_", 8080, "uvloop"),
        _entry("auth", "tsunagu_auth", "AuthSettings", "TSUNAGU_AUTH_", 8081),
        _entry("presence", "tsunagu_presence", "PresenceSettings", "TSUNAGU_PRESENCE_", 8082),
        _entry("collab", "tsunagu_collab", "CollabSettings", "TSUNAGU_COLLAB_", 8083),
        _entry("stream-ingest", "tsunagu_stream_ingest", "IngestSettings", "TSUNAGU_INGEST_", 8084),
        _entry("mqtt-bridge", "tsunagu_mqtt_bridge", "MqttBridgeSettings", "TSUNAGU_MQTT_BRIDGE_", 8085),
        _entry("sim-engine", "tsunagu_sim_engine", "SimSettings", "TSUNAGU_SIM_", 8086),
        _entry("audit-log", "tsunagu_audit_log", "AuditSettings", "TSUNAGU_AUDIT_", 8087),
    )
}
