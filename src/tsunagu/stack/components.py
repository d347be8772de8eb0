"""The components by name, in start order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tsunagu.stack import ALIASES, COMPONENTS, OPTIONAL_COMPONENTS
from tsunagu.stack.base import Component
from tsunagu.stack.kafka import Kafka
from tsunagu.stack.mqtt import Mqtt
from tsunagu.stack.postgres import Postgres
from tsunagu.stack.prometheus import Prometheus
from tsunagu.stack.redis import Redis
from tsunagu.stack.redis_sets import RedisClusterSet, RedisSentinelSet
from tsunagu.stack.settings import StackError, StackSettings
from tsunagu.stack.turn import Turn

COMPONENT_CLASSES: dict[str, Callable[[StackSettings], Component]] = {
    "redis": Redis,
    "kafka": Kafka,
    "postgres": Postgres,
    "mqtt": Mqtt,
    "prometheus": Prometheus,
    "redis-cluster": RedisClusterSet,
    "redis-sentinel": RedisSentinelSet,
    "turn": Turn,
}


def components(settings: StackSettings, names: Sequence[str] = ()) -> list[Component]:
    """The named components (all but the optional ones when none are named), in start order."""
    wanted = {ALIASES.get(name, name) for name in names}
    known = (*COMPONENTS, *OPTIONAL_COMPONENTS)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise StackError(f"unknown component {', '.join(unknown)}: choose from {' '.join(known)}")
    if not wanted:
        return [COMPONENT_CLASSES[name](settings) for name in COMPONENTS]
    return [COMPONENT_CLASSES[name](settings) for name in known if name in wanted]
