"""Which Kafka topics are relayed, to which channels, and how (PLATFORM.md "Channel mapping of the edges").

A record on topic `T` with key `K` goes to channel `stream:T.K`, and to `stream:T` when it has no
key. Templates may use `{topic}`, `{key}` and `{partition}`; `keyless_channel` must not use `{key}`.

Formats:
- `json`: the value must be JSON; it is published as it is (the gateway embeds it verbatim).
  A value that is not JSON goes to `<topic>.dlq`.
- `bytes`: any value, published as the JSON object `{"b64": "<base64>"}`, so JSON and protobuf
  clients alike get an unambiguous JSON object.
- `protobuf`: passthrough of the raw bytes. Protobuf-protocol clients get the exact bytes; JSON
  clients get them as a base64 string (the gateway's rule for non-JSON data, as in Centrifugo).
"""

from __future__ import annotations

import base64
import json
import re
import string
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHANNEL = 255
_PLACEHOLDERS = {"topic", "key", "partition"}
# What a channel name may hold: printable, no whitespace.
_CHANNEL = re.compile(r"^[^\s\x00-\x1f\x7f]+$")
DLQ_SUFFIX = ".dlq"


class PoisonRecord(Exception):
    """A record that can never be relayed; it goes to the dead-letter topic with this message."""


def _placeholders(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None


class IngestMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str = Field(min_length=1, max_length=249)
    name: str = ""
    channel: str = "stream:{topic}.{key}"
    keyless_channel: str = "stream:{topic}"
    format: Literal["json", "bytes", "protobuf"] = "json"
    max_rate: float = Field(0.0, ge=0, le=10_000)
    max_record_bytes: int = Field(1_048_576, ge=1, le=16 * 1_048_576)

    @field_validator("topic")
    @classmethod
    def _topic_is_name_or_pattern(cls, value: str) -> str:
        if value.startswith("^"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"topic pattern {value!r} is not a valid regex: {exc}") from None
        elif not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError(f"topic {value!r} is not a Kafka topic name (or a regex starting with ^)")
        elif value.endswith(DLQ_SUFFIX):
            raise ValueError(f"topic {value!r} is a dead-letter topic")
        return value

    @model_validator(mode="after")
    def _templates_are_valid(self) -> IngestMapping:
        for field_name, template in (("channel", self.channel), ("keyless_channel", self.keyless_channel)):
            used = _placeholders(template)
            unknown = used - _PLACEHOLDERS
            if unknown:
                raise ValueError(
                    f"{field_name} template {template!r} uses {', '.join(sorted(unknown))};"
                    " allowed: {topic}, {key}, {partition}"
                )
            if not template or any(char.isspace() for char in template):
                raise ValueError(f"{field_name} template {template!r} must be a channel name without spaces")
        if "key" in _placeholders(self.keyless_channel):
            raise ValueError("keyless_channel cannot use {key}: it is for records without a key")
        return self

    @property
    def label(self) -> str:
        """The mapping's name in metrics and logs."""
        return self.name or self.topic

    @property
    def is_pattern(self) -> bool:
        return self.topic.startswith("^")

    def matches(self, topic: str) -> bool:
        if topic.endswith(DLQ_SUFFIX):
            return False
        if not self.is_pattern:
            return topic == self.topic
        # `re` caches compiled patterns; librdkafka subscribes with the same regex.
        return re.search(self.topic, topic) is not None

    def channel_for(self, topic: str, key: bytes | None, partition: int) -> str:
        """The channel of a record; raises PoisonRecord when the key cannot be part of a channel name."""
        if key is None:
            channel = self.keyless_channel.format(topic=topic, partition=partition)
        else:
            try:
                text = key.decode("utf-8")
            except UnicodeDecodeError:
                raise PoisonRecord("key is not UTF-8") from None
            channel = self.channel.format(topic=topic, key=text, partition=partition)
        if len(channel) > MAX_CHANNEL or not _CHANNEL.match(channel):
            raise PoisonRecord(f"channel {channel[:80]!r} is not a valid name (printable, no spaces, <= {MAX_CHANNEL})")
        return channel

    def payload(self, value: bytes) -> bytes:
        """What is published for a record value; raises PoisonRecord for a value that cannot be relayed."""
        if len(value) > self.max_record_bytes:
            raise PoisonRecord(f"record of {len(value)} bytes exceeds max_record_bytes={self.max_record_bytes}")
        if self.format == "json":
            try:
                parsed = orjson.loads(value)
            except orjson.JSONDecodeError:
                # orjson is 5-10x faster but stricter (integers beyond 64 bits): json decides.
                try:
                    parsed = json.loads(value)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise PoisonRecord(f"value is not JSON: {exc}") from None
            if b"\n" in value:
                return json.dumps(parsed, separators=(",", ":")).encode()
            return value
        if self.format == "bytes":
            return b'{"b64":"' + base64.b64encode(value) + b'"}'
        return value


def find_mapping(mappings: list[IngestMapping], topic: str) -> IngestMapping | None:
    """The first mapping for `topic`: exact names win over patterns, then the configured order."""
    for mapping in mappings:
        if not mapping.is_pattern and mapping.matches(topic):
            return mapping
    for mapping in mappings:
        if mapping.is_pattern and mapping.matches(topic):
            return mapping
    return None
