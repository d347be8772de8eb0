"""The plugin interface of simulation kinds, and the registry by kind name.

A kind is an object with a `name` that validates a room's `params` and creates a `Simulation`;
the engine owns the tick loop, the input queue, rate limits, encoding and publishing, so a kind
only says how inputs change its state, how state advances by `dt`, and what each entity looks like.
Register one with `register_kind(obj)`, an entry point in group `tsunagu.sim_kinds`, or the
`TSUNAGU_SIM_KINDS` setting (`module:attribute`, comma-separated).

A simulation may also have (the room looks for them; `twin` has all of them):
- `apply_input(user, data, now, *, client, seq)`, called instead of `apply`, for a kind that needs to know
  which input it is (a twin names its device command after it);
- `sources()`, the broker channels whose publications drive it, and `observe(channel, data, time_ms)`,
  which the room calls at the start of a tick for each one that arrived (the engine follows the channels);
- `take_commands()`, device commands made by the inputs of a tick, which the engine sends through the
  platform's command path (Kafka `tsunagu.mqtt.commands`, mqtt-bridge, a receipt for the user);
- `room`, an attribute the room sets to its name.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("tsunagu.sim.kinds")

ENTRY_POINT_GROUP = "tsunagu.sim_kinds"


class InputRejected(Exception):
    """An input the simulation refuses; `reason` is a short code sent back to the sender."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class Entity:
    """What clients see of one entity. `x`, `y` are the ground plane (area-of-interest cells use them),
    `z` is height, `r` a heading in degrees; `extra` carries small kind-specific fields."""

    x: float
    y: float
    z: float = 0.0
    r: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Simulation(Protocol):
    def apply(self, user: str, data: Mapping[str, Any], now: float) -> None:
        """Apply one input from `user` at sim time `now` (seconds); raise InputRejected to refuse it."""

    def step(self, dt: float, now: float) -> None:
        """Advance the state by `dt` seconds; `now` is the sim time after the step."""

    def entities(self) -> dict[str, Entity]: ...

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable full-precision state, enough for `restore` on another replica."""

    def restore(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class SimKind(Protocol):
    name: str

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The room's params with defaults filled in; raise ValueError with a clear message."""

    def create(self, params: Mapping[str, Any]) -> Simulation: ...


_REGISTRY: dict[str, SimKind] = {}


def register_kind(kind: SimKind) -> SimKind:
    if not isinstance(kind, SimKind) or not isinstance(getattr(kind, "name", None), str) or not kind.name:
        raise TypeError(f"{kind!r} is not a SimKind (a name, validate_params() and create())")
    _REGISTRY[kind.name] = kind
    return kind


def get_kind(name: str) -> SimKind | None:
    return _REGISTRY.get(name)


def kind_names() -> list[str]:
    return sorted(_REGISTRY)


def load_import_path(path: str) -> SimKind:
    module_name, _, attribute = path.strip().partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{path!r}: a kind is given as module:attribute")
    obj = getattr(importlib.import_module(module_name), attribute)
    if isinstance(obj, type):
        obj = obj()
    return register_kind(obj)


def load_kinds(import_paths: str = "") -> list[str]:
    """Register the built-in kinds, the entry points and the configured import paths; their names."""
    from tsunagu_sim_engine.kinds.avatar import AvatarKind
    from tsunagu_sim_engine.kinds.physics import PhysicsKind
    from tsunagu_sim_engine.kinds.twin import TwinKind

    register_kind(AvatarKind())
    register_kind(PhysicsKind())
    register_kind(TwinKind())
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = point.load()
            register_kind(obj() if isinstance(obj, type) else obj)
        except Exception as exc:
            log.error("sim kind entry point %s failed to load: %r", point.name, exc)
    for path in filter(None, (p.strip() for p in import_paths.split(","))):
        load_import_path(path)
    return kind_names()


def number(params: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"params.{name} must be a number from {low} to {high}")
    return float(value)
