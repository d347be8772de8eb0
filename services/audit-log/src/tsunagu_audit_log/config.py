from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tsunagu_core import topics
from tsunagu_core.config import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_AUDIT_", extra="ignore")

    port: int = Field(8087, ge=1, le=65535, description="TCP port to listen on.")
    topic: str = Field(
        topics.AUDIT, min_length=1, description="Kafka topic of the audit events (`AuditEvent` in an envelope)."
    )
    gateway_events: bool = Field(
        True,
        description="Also record the security events of `tsunagu.gateway.events` (forced logouts, code 3500).",
    )
    group: str = Field("audit-log", min_length=1, description="Kafka consumer group of the audit-log replicas.")
    consumers: int = Field(
        1,
        ge=1,
        le=64,
        description="Consumers per replica in the group; each takes batches of every partition it is assigned"
        " in parallel, and the batches waiting together are written in one transaction.",
    )
    batch_max: int = Field(500, ge=1, le=10_000, description="Most events written to PostgreSQL in one transaction.")
    batch_linger: float = Field(
        0.002, ge=0, le=1, description="Seconds a batch waits for more events before it is written."
    )
    schema_name: str = Field(
        "public",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema holding the audit tables (its own migrations; one chain per schema).",
    )
    signing_key: str = Field(
        "",
        description="Ed25519 private key signing the checkpoints: PEM (PKCS#8) or base64 of the 32-byte seed."
        " Empty and no key file: with `TSUNAGU_DATABASE=memory` a key is generated at start; with PostgreSQL"
        " no checkpoints are signed (a warning says so).",
    )
    signing_key_file: str = Field(
        "", description="Path of a file holding the checkpoint signing key (same formats as the key itself)."
    )
    trusted_keys: str = Field(
        "",
        description="Comma-separated base64 Ed25519 public keys whose older checkpoints still verify"
        " (after a key rotation).",
    )
    checkpoint_rows: int = Field(1000, ge=1, description="Sign a checkpoint once this many rows were appended.")
    checkpoint_interval: float = Field(
        60.0, gt=0, le=86400, description="Seconds after which new rows are checkpointed even if fewer than that."
    )
    verify_interval: float = Field(
        300.0, ge=0, le=86400, description="Seconds between background verifications of the whole chain; 0: never."
    )
