"""Typed configuration from `TSUNAGU_*` environment variables.

Every settings class is a pydantic-settings model whose field descriptions are the documentation:
`docs/configuration.md` is rendered from these classes by `tsunagu config-docs`, and a test fails
when the committed file differs, so the docs cannot drift from the code.
"""

from __future__ import annotations

import socket
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class ConfigError(Exception):
    """Configuration that a service cannot start with; the message is one line for the operator."""


class TlsSettings(BaseSettings):
    """TLS of every service: towards the infrastructure it connects to (mTLS) and on the port it serves.

    TLS is chosen per connection by its address: `rediss://`, `TSUNAGU_KAFKA_SECURITY_PROTOCOL=SSL`,
    `sslmode=` in the PostgreSQL DSN, `mqtts://`; these files are then the trust anchor and identity.
    """

    model_config = SettingsConfigDict(env_prefix="TSUNAGU_", extra="ignore")

    tls_ca_file: str = Field(
        "",
        description="PEM file of the CA(s) the servers' certificates are checked against (a Secret's `ca.crt`);"
        " empty: the system's trust store.",
    )
    tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) this service presents to Redis, Kafka, PostgreSQL and the MQTT broker"
        " (mTLS; a Secret's `tls.crt`); empty: no client certificate.",
    )
    tls_key_file: str = Field("", description="PEM private key of `TSUNAGU_TLS_CERT_FILE` (a Secret's `tls.key`).")
    tls_check_hostname: bool = Field(
        True, description="Check that a server's certificate names the host connected to (off only for debugging)."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL"] = Field(
        "PLAINTEXT",
        description="`SSL`: Kafka over TLS with the `TSUNAGU_TLS_*` files (mTLS when a certificate is set).",
    )
    server_tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) a service serves HTTPS/WSS with (a Secret's `tls.crt`); reloaded when the"
        " file changes, without dropping connections. Empty: plain HTTP (TLS ends at the ingress).",
    )
    server_tls_key_file: str = Field("", description="PEM private key of `TSUNAGU_SERVER_TLS_CERT_FILE`.")
    server_tls_client_ca_file: str = Field(
        "",
        description="PEM CA(s) whose client certificates a service accepts (client-certificate authentication);"
        " empty: clients are not asked for one.",
    )
    server_tls_client_auth: Literal["optional", "required"] = Field(
        "optional",
        description="With a client CA: `optional` also lets clients without a certificate in (they use a JWT);"
        " `required` refuses the TLS handshake without a valid one.",
    )
    server_tls_reload_interval: float = Field(
        2.0, gt=0, le=3600, description="Seconds between checks whether the server certificate files changed."
    )


class CoreSettings(TlsSettings):
    """Shared by every service: which engines to use and how to reach the infrastructure."""

    model_config = SettingsConfigDict(env_prefix="TSUNAGU_", extra="ignore")

    bus: Literal["memory", "kafka"] = Field(
        "memory", description="Durable event bus engine: `kafka` in a cluster, `memory` for one process."
    )
    broker: Literal["memory", "redis"] = Field(
        "memory",
        description="Fan-out, history and presence engine: `redis` across replicas, `memory` for one process.",
    )
    database: Literal["memory", "postgres"] = Field(
        "memory",
        description="Storage engine of auth, collab and audit-log: `postgres` in a cluster, `memory` for one process"
        " (lost at exit).",
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, `host:port[,...]`.")
    kafka_partitions: int = Field(
        6, ge=1, le=1024, description="Partitions of the `tsunagu.*` topics when the platform creates them."
    )
    kafka_replication: int = Field(
        1,
        ge=1,
        le=7,
        description="Replication factor of the `tsunagu.*` topics when the platform creates them.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: `redis://host:port/db` (`rediss://` with TLS) for one server; "
        "`redis-cluster://host:port,host:port` for Redis Cluster (any nodes: the others are discovered); "
        "`redis-sentinel://host:26379,host:26380/db#primary` for the primary that Sentinel names "
        "(`rediss-cluster://`, `rediss-sentinel://` with TLS).",
    )
    postgres_dsn: str = Field(
        "postgresql://tsunagu:tsunagu@127.0.0.1:5432/tsunagu",
        description="PostgreSQL DSN for auth, collab and audit-log (used when `TSUNAGU_DATABASE=postgres`).",
    )
    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="MQTT broker URL for mqtt-bridge; unset, `tsunagu run` starts a broker of its own"
        " (`TSUNAGU_RUN_MQTT_PORT`).",
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="Name of this replica in events and logs (defaults to the host name, the pod name in Kubernetes).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest log level written.")
    log_format: Literal["json", "text"] = Field(
        "text", description="`json`: one JSON object per line with trace ids; `text`: for humans."
    )
    otlp_endpoint: str = Field(
        "",
        description="OTLP/HTTP traces endpoint, e.g. `http://collector:4318`; empty: tracing is not exported.",
    )
    dependency_retry_max: float = Field(
        15.0, gt=0, le=300, description="Longest wait in seconds between attempts to reach a dependency."
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="Event loop of `tsunagu serve` and `tsunagu run`. `auto`: uvloop (libuv, in C) for"
        " `tsunagu serve ws-gateway`, whose fan-out costs less than half the CPU per delivery on it"
        " (docs/benchmarks.md), the standard library's for the other services and `tsunagu run`.",
    )
    shutdown_grace: float = Field(
        20.0, ge=0, le=600, description="Seconds a stopping service waits for open connections to finish."
    )
    env: Literal["development", "production"] = Field(
        "development",
        description="`production` refuses to start with development secrets, an internal API without a credential,"
        " unsigned audit checkpoints or unencrypted auth signing keys (docs/security.md); the chart sets it.",
    )
    internal_token: str = Field(
        "",
        description="Shared secret of the platform's internal APIs: every service but the gateway and auth requires"
        " `Authorization: Bearer <it>` on all but `/healthz` and `/readyz`, and the gateway sends it. Empty:"
        " only `TSUNAGU_INTERNAL_PEERS` are let in (with neither, the APIs are open: development only).",
    )
    internal_peers: list[str] = Field(
        default_factory=list,
        description="JSON list of globs of client-certificate names (SPIFFE URI, DNS SAN or CN) let into the internal"
        " APIs without the token (mTLS; needs `TSUNAGU_SERVER_TLS_CLIENT_CA_FILE`).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="JSON list of addresses/CIDRs of the proxies in front of the services (ingress controllers,"
        " load balancers): from those, the client address is the last `X-Forwarded-For` hop they did not add."
        " Empty: the socket's peer is the client, and `X-Forwarded-For` is ignored.",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of a listener of its own for `/metrics` (the chart uses 9464), so a NetworkPolicy can open it"
        " to Prometheus alone; 0: `/metrics` is served on the service's port.",
    )
    http_max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=1_073_741_824,
        description="Largest HTTP request body the internal APIs read (collab, presence, stream-ingest, mqtt-bridge,"
        " sim-engine, audit-log); a larger one gets 413 before it is read. auth has 64 KiB of its own.",
    )


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build settings from the environment, turning validation errors into one clear ConfigError line."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(cls, exc)) from None


def describe_validation_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    problems = []
    for error in exc.errors():
        if not error["loc"]:  # a check across fields: its message names the variables itself
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        variable = f"{prefix}{field}".upper()
        given = error.get("input")
        shown = f"={given!r}" if isinstance(given, str | int | float) else ""
        problems.append(f"{variable}{shown}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


def _default_text(cls: type[BaseSettings], name: str) -> str:
    field = cls.model_fields[name]
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    if value == "":
        return "(empty)"
    return f"`{value}`"


def render_config_docs(classes: Iterable[tuple[str, type[BaseSettings]]]) -> str:
    """Markdown reference of every variable, one table per settings class."""
    lines = [
        "# Configuration",
        "",
        "Generated from the settings classes by `tsunagu config-docs`; do not edit by hand.",
        "Every service reads the shared variables; the others belong to the service named in the heading.",
        "A bad value stops the service at start with one line naming the variable and what is allowed.",
        "",
    ]
    for title, cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines += [f"## {title}", "", "| Variable | Type | Default | Description |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            variable = f"{prefix}{name}".upper()
            row = f"| `{variable}` | {_type_name(field.annotation)} | {_default_text(cls, name)} | {description} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


class ServiceSettings(BaseSettings):
    """Where one service listens; each service subclasses this with its own prefix and port."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (`0.0.0.0` in a container).")
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on.")
