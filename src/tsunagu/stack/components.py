"""The components by name, in start order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tsunagu.stack import ALIASES, COMPONENTS
from tsunagu.stack.base import Component
from tsunagu.stack.kafka import Kafka
from tsunagu.stack.mqtt import Mqtt
from tsunagu.stack.postgres import Postgres
from tsunagu.stack.prometheus import Prometheus
from tsunagu.stack.redis import Redis
from tsunagu.stack.settings import StackError, StackSettings

COMPONENT_CLASSES: dict[str, Callable[[StackSettings], Component]] = {
    "redis": Redis,
    "kafka": Kafka,
    "postgres": Postgres,
    "mqtt": Mqtt,
    "prometheus": Prometheus,
}


def components(settings: StackSettings, names: Sequence[str] = ()) -> list[Component]:
    """The named components (all when none are named), in start order."""
    wanted = {ALIASES.get(name, name) for name in names}
    unknown = sorted(wanted - set(COMPONENTS))
    if unknown:
        raise StackError(f"unknown component {', '.join(unknown)}: choose from {' '.join(COMPONENTS)}")
    return [COMPONENT_CLASSES[name](settings) for name in COMPONENTS if not wanted or name in wanted]
