"""stream-ingest settings (`TSUNAGU_INGEST_*`), including the topic-to-channel mappings."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict
from tsunagu_core.config import ServiceSettings

from tsunagu_stream_ingest.mappings import IngestMapping


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_INGEST_", extra="ignore")

    port: int = Field(8084, ge=1, le=65535, description="TCP port to listen on.")
    # NoDecode: the JSON is parsed by the validator below, so a malformed value is a one-line ConfigError.
    mappings: Annotated[list[IngestMapping], NoDecode] = Field(
        default_factory=list,
        description="JSON list of mappings, each `{topic, name, channel, keyless_channel, format, max_rate,"
        " max_record_bytes}`: `topic` is a Kafka topic name or a regex starting with `^`;"
        " see services/stream-ingest/README.md.",
    )
    consumer_group: str = Field("stream-ingest", min_length=1, description="Kafka consumer group of the relay.")
    consumers: int = Field(
        1, ge=1, le=32, description="Consumers in the group per process (partitions are handled in parallel)."
    )
    batch_size: int = Field(
        500,
        ge=1,
        le=10_000,
        description="Most records of one partition relayed as one batch of publications (one broker call).",
    )
    history_size: int = Field(
        10,
        ge=1,
        le=100_000,
        description="Publications kept per stream channel (>= 1: the last value for late subscribers).",
    )
    history_ttl: float = Field(300.0, gt=0, description="Seconds a stream channel's history is kept.")
    idempotency_ttl: float = Field(
        3600.0, gt=0, description="Seconds a record's idempotency key (`ingest/topic/partition/offset`) is remembered."
    )
    shutdown_flush: float = Field(
        5.0, ge=0, le=120, description="Seconds a stopping relay spends publishing the values still held by conflation."
    )
    demo_feed: bool = Field(
        False, description="Write demo price quotes to `demo_feed_topic` and relay them (`tsunagu run` turns it on)."
    )
    demo_feed_topic: str = Field("demo.ticker", min_length=1, description="Topic of the demo quotes.")
    demo_feed_symbols: list[str] = Field(
        default_factory=lambda: ["TSU", "NGU", "KFK"], description="JSON list of the demo's symbols (the record keys)."
    )
    demo_feed_rate: float = Field(4.0, gt=0, le=100, description="Demo quotes per second per symbol.")
    mllp_port: int = Field(
        0, ge=0, le=65535, description="TCP port of the HL7 v2 MLLP listener (the standard one is 2575); 0 = off."
    )
    mllp_host: str = Field("127.0.0.1", min_length=1, description="Address the MLLP listener binds to.")
    mllp_senders: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="JSON list of addresses/CIDRs allowed to send HL7 over MLLP; a connection from elsewhere is"
        " closed before a byte is read (also over TLS). The default admits this machine only; the chart sets the"
        " senders of `services.stream-ingest.mllp.senders`.",
    )
    mllp_max_message_bytes: int = Field(
        524_288,
        ge=1024,
        le=786_432,
        description="Largest HL7 message accepted; a larger one gets AR. At most 768 KiB: the message is kept whole"
        " in its audit event, and Kafka takes records up to 1 MB.",
    )
    mllp_idle_timeout: float = Field(
        600.0, gt=0, description="Seconds an MLLP connection may stay without a message before it is closed."
    )
    mllp_tls: bool = Field(
        True,
        description="Serve MLLP over TLS with the server certificate (`TSUNAGU_SERVER_TLS_*`, client certificates"
        " included) when one is configured; false: plain MLLP even then (e.g. TLS ends at a sidecar).",
    )
    mllp_history_size: int = Field(
        1000, ge=1, le=100_000, description="Publications kept per `hl7:` channel (as the gateway's `hl7` namespace)."
    )
    mllp_history_ttl: float = Field(
        86400.0, gt=0, description="Seconds an `hl7:` channel's history is kept (as the gateway's `hl7` namespace)."
    )

    @field_validator("mappings", mode="before")
    @classmethod
    def _mappings_from_json(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            if not value.strip():
                return []
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
        return value

    @field_validator("mappings")
    @classmethod
    def _names_are_unique(cls, value: list[IngestMapping]) -> list[IngestMapping]:
        names = [mapping.label for mapping in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"mapping names must be unique: {', '.join(duplicates)}")
        return value
