"""Where the stack lives and listens (TSUNAGU_STACK_*), and the TSUNAGU_* variables that point services at it."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tsunagu.devpki import DevPki

HOST = "127.0.0.1"
PG_USER = "tsunagu"
PG_PASSWORD = "tsunagu"
PG_DATABASE = "tsunagu"
# A role that logs in only over TLS, with the development client certificate (pg_ident maps its CN).
PG_TLS_USER = "tsunagu_tls"


class StackError(Exception):
    """A component that cannot be brought up or down: `reason` is one line, `log` the file to show the tail of."""

    def __init__(self, reason: str, log: Path | None = None, log_offset: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log = log
        self.log_offset = log_offset


class StackSettings(BaseSettings):
    """Where `tsunagu stack` keeps its state and which loopback ports the infrastructure listens on."""

    model_config = SettingsConfigDict(env_prefix="TSUNAGU_STACK_", extra="ignore")

    dir: Path = Field(
        Path(".stack"),
        description="State directory holding every component's config, data, log and pid file "
        "(relative paths are taken from the current directory).",
    )
    cache_dir: Path = Field(
        Path("~/.cache/tsunagu"),
        description="Cache for downloads shared by every state directory: the Kafka jars fetched with Maven.",
    )
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis port on 127.0.0.1.")
    kafka_port: int = Field(9092, ge=1, le=65535, description="Kafka broker (bootstrap) port on 127.0.0.1.")
    kafka_controller_port: int = Field(
        9093, ge=1, le=65535, description="Kafka KRaft controller port on 127.0.0.1 (internal to the broker)."
    )
    mqtt_port: int = Field(1883, ge=1, le=65535, description="Mosquitto MQTT port on 127.0.0.1.")
    redis_tls_port: int = Field(
        6380, ge=1, le=65535, description="Redis TLS-only port on 127.0.0.1 (client certificate required)."
    )
    kafka_tls_port: int = Field(
        9094, ge=1, le=65535, description="Kafka SSL listener on 127.0.0.1 (client certificate required)."
    )
    mqtt_tls_port: int = Field(
        8883, ge=1, le=65535, description="Mosquitto TLS-only listener on 127.0.0.1 (client certificate required)."
    )
    postgres_port: int = Field(5432, ge=1, le=65535, description="PostgreSQL port on 127.0.0.1.")
    redis_cluster_port: int = Field(
        7000,
        ge=1,
        le=55529,
        description="`stack up redis-cluster`: the first of 6 consecutive node ports (3 primaries, 3 replicas) on "
        "127.0.0.1; each node's cluster bus is its port + 10000.",
    )
    redis_sentinel_port: int = Field(
        26379, ge=1, le=65533, description="`stack up redis-sentinel`: the first of 3 consecutive Sentinel ports."
    )
    redis_sentinel_data_port: int = Field(
        6390,
        ge=1,
        le=65533,
        description="`stack up redis-sentinel`: the first of 3 consecutive Redis ports (the primary, 2 replicas).",
    )
    prometheus_port: int = Field(9090, ge=1, le=65535, description="Prometheus web and API port on 127.0.0.1.")
    turn_port: int = Field(3478, ge=1, le=65535, description="coturn TURN/STUN port (UDP and TCP) on 127.0.0.1.")
    turn_relay_ports: tuple[int, int] = Field(
        (49160, 49200), description="The UDP port range coturn relays through (`min-port`, `max-port`)."
    )
    turn_secret: str = Field(
        "tsunagu-dev-turn-secret",
        description="coturn's `static-auth-secret`: the secret auth signs TURN credentials with (a local stack's).",
    )
    turn_realm: str = Field("tsunagu.local", description="coturn's realm.")
    kafka_version: str = Field(
        "4.1.1",
        pattern=r"^\d+\.\d+\.\d+$",
        description="Apache Kafka version whose jars are fetched from Maven Central (run in KRaft mode).",
    )
    start_timeout: float = Field(
        90.0, gt=0, le=3600, description="Seconds `stack up` waits for each component to answer before failing."
    )

    @field_validator("dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackSettings:
        seen: dict[int, str] = {}
        for name in (
            "redis_port",
            "kafka_port",
            "kafka_controller_port",
            "mqtt_port",
            "postgres_port",
            "prometheus_port",
            "redis_tls_port",
            "kafka_tls_port",
            "mqtt_tls_port",
            "redis_cluster_port",
            "redis_sentinel_port",
            "redis_sentinel_data_port",
            "turn_port",
        ):
            port = getattr(self, name)
            if port in seen:
                raise ValueError(f"TSUNAGU_STACK_{name.upper()} and TSUNAGU_STACK_{seen[port].upper()} are both {port}")
            seen[port] = name
        low, high = self.turn_relay_ports
        if not 1024 <= low <= high <= 65535:
            raise ValueError("TSUNAGU_STACK_TURN_RELAY_PORTS is [low, high] within 1024-65535")
        return self


def load_settings() -> StackSettings:
    """Settings from the environment; a bad value becomes one StackError line naming the variable."""
    try:
        return StackSettings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = error.get("loc") or ()
            given = error.get("input")
            if loc:
                variable = f"TSUNAGU_STACK_{loc[0]}".upper()
                shown = f"={given!r}" if isinstance(given, str | int | float) else ""
                problems.append(f"{variable}{shown}: {error['msg']}")
            else:
                problems.append(str(error["msg"]).removeprefix("Value error, "))
        raise StackError("invalid configuration: " + "; ".join(problems)) from None


def postgres_dsn(settings: StackSettings) -> str:
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{HOST}:{settings.postgres_port}/{PG_DATABASE}"


def tls_dir(settings: StackSettings) -> Path:
    """The development PKI of this state directory (`devpki`: ca.crt, server/ and client/ pairs)."""
    return settings.dir / "tls"


def tls_connection_env(settings: StackSettings) -> dict[str, str]:
    """The variables that point services at the TLS-only side of this stack, with mTLS everywhere:
    the client certificate for Redis, Kafka, PostgreSQL and Mosquitto, the server certificate (and
    client CA) for the services' own ports."""
    pki = DevPki(tls_dir(settings))
    return {
        "TSUNAGU_REDIS_URL": f"rediss://{HOST}:{settings.redis_tls_port}/0",
        "TSUNAGU_KAFKA_BOOTSTRAP": f"{HOST}:{settings.kafka_tls_port}",
        "TSUNAGU_KAFKA_SECURITY_PROTOCOL": "SSL",
        "TSUNAGU_MQTT_URL": f"mqtts://{HOST}:{settings.mqtt_tls_port}",
        "TSUNAGU_POSTGRES_DSN": f"postgresql://{PG_TLS_USER}@{HOST}:{settings.postgres_port}/{PG_DATABASE}"
        "?sslmode=verify-full",
        "TSUNAGU_PROMETHEUS_URL": f"http://{HOST}:{settings.prometheus_port}",
        "TSUNAGU_TLS_CA_FILE": str(pki.ca_cert),
        "TSUNAGU_TLS_CERT_FILE": str(pki.client_cert),
        "TSUNAGU_TLS_KEY_FILE": str(pki.client_key),
        "TSUNAGU_SERVER_TLS_CERT_FILE": str(pki.server_cert),
        "TSUNAGU_SERVER_TLS_KEY_FILE": str(pki.server_key),
        "TSUNAGU_SERVER_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
    }


CLUSTER_NODES, SENTINEL_DATA_NODES, SENTINELS = 6, 3, 3
SENTINEL_SERVICE = "tsunagu"


def redis_cluster_ports(settings: StackSettings) -> list[int]:
    return [settings.redis_cluster_port + i for i in range(CLUSTER_NODES)]


def redis_sentinel_ports(settings: StackSettings) -> tuple[list[int], list[int]]:
    """The data servers' ports (the first one starts as primary) and the sentinels'."""
    return (
        [settings.redis_sentinel_data_port + i for i in range(SENTINEL_DATA_NODES)],
        [settings.redis_sentinel_port + i for i in range(SENTINELS)],
    )


def redis_cluster_url(settings: StackSettings) -> str:
    return "redis-cluster://" + ",".join(f"{HOST}:{port}" for port in redis_cluster_ports(settings))


def redis_sentinel_url(settings: StackSettings) -> str:
    sentinels = redis_sentinel_ports(settings)[1]
    return "redis-sentinel://" + ",".join(f"{HOST}:{port}" for port in sentinels) + f"#{SENTINEL_SERVICE}"


REDIS_SET_URLS = {"redis-cluster": redis_cluster_url, "redis-sentinel": redis_sentinel_url}


def turn_env(settings: StackSettings) -> dict[str, str]:
    """`stack env turn`: auth issues credentials for the stack's coturn."""
    address = f"{HOST}:{settings.turn_port}"
    return {
        "TSUNAGU_AUTH_TURN_SECRET": settings.turn_secret,
        "TSUNAGU_AUTH_TURN_URIS": json.dumps([f"turn:{address}?transport=udp", f"turn:{address}?transport=tcp"]),
        "TSUNAGU_AUTH_STUN_URIS": json.dumps([f"stun:{address}"]),
    }


def connection_env(settings: StackSettings) -> dict[str, str]:
    """The variables services and tests read to reach this stack."""
    return {
        "TSUNAGU_REDIS_URL": f"redis://{HOST}:{settings.redis_port}/0",
        "TSUNAGU_KAFKA_BOOTSTRAP": f"{HOST}:{settings.kafka_port}",
        "TSUNAGU_MQTT_URL": f"mqtt://{HOST}:{settings.mqtt_port}",
        "TSUNAGU_POSTGRES_DSN": postgres_dsn(settings),
        "TSUNAGU_PROMETHEUS_URL": f"http://{HOST}:{settings.prometheus_port}",
    }
