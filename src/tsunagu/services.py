"""The composition root's table of services: the only module that imports service packages.

Each entry names its settings class and app factory by module path and imports them only when asked:
`tsunagu --help` or `tsunagu token` load no service, and `tsunagu serve auth` loads auth alone. A
gateway that is killed and restarted is back as soon as its own imports are done, which is what
bounds how much a reconnecting client must recover.
"""

from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from collections.abc import Callable

    from fastapi import FastAPI
    from tsunagu_core.config import ServiceSettings
    from tsunagu_core.lifecycle import Runtime


def _load(path: str) -> typing.Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class ServiceEntry:
    """A service by name, with its settings class and app factory imported on first use (a plain class:
    even `dataclasses` costs a CLI start-up more than the rest of this module)."""

    __slots__ = ("factory_path", "name", "settings_path")

    def __init__(self, name: str, settings_path: str, factory_path: str) -> None:
        self.name = name
        self.settings_path = settings_path
        self.factory_path = factory_path

    @property
    def settings(self) -> type[ServiceSettings]:
        settings: type[ServiceSettings] = _load(self.settings_path)
        return settings

    @property
    def factory(self) -> Callable[[Runtime, typing.Any], FastAPI]:
        # Each factory takes its own settings subclass, hence Any.
        factory: Callable[[Runtime, typing.Any], FastAPI] = _load(self.factory_path)
        return factory


def _entry(name: str, package: str, settings_class: str) -> ServiceEntry:
    return ServiceEntry(name, f"{package}.config:{settings_class}", f"{package}.app:create_app")


# In the order `tsunagu run` starts them; the gateway first so its port answers soonest.
SERVICES: dict[str, ServiceEntry] = {
    entry.name: entry
    for entry in (
        _entry("ws-gateway", "tsunagu_ws_gateway", "GatewaySettings"),
        _entry("auth", "tsunagu_auth", "AuthSettings"),
        _entry("presence", "tsunagu_presence", "PresenceSettings"),
        _entry("collab", "tsunagu_collab", "CollabSettings"),
        _entry("stream-ingest", "tsunagu_stream_ingest", "IngestSettings"),
        _entry("mqtt-bridge", "tsunagu_mqtt_bridge", "MqttBridgeSettings"),
        _entry("sim-engine", "tsunagu_sim_engine", "SimSettings"),
        _entry("audit-log", "tsunagu_audit_log", "AuditSettings"),
    )
}
