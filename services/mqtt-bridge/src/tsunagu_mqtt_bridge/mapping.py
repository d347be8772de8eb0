"""MQTT topic <-> channel mapping, validation and payload handling: pure functions, no I/O.

PLATFORM.md: MQTT topic `a/b/c` <-> channel `mqtt:a/b/c`. A topic maps only when the channel is a
valid gateway channel name (letters, digits, `_-:.@/,=!~$`, at most 255 characters); anything else is
rejected with a reason that is logged and counted, never silently dropped.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

NAMESPACE = "mqtt"
PREFIX = NAMESPACE + ":"
MAX_CHANNEL = 255
# The gateway's channel rule minus `#` (user-limited channels) and `+`: a device topic is neither.
_CHANNEL_CHARS = re.compile(r"^[\w\-:.@/,=!~$]+$")
ONLINE = "online"
OFFLINE = "offline"


class Rejected(ValueError):
    """An MQTT message or command that cannot be mapped; `reason` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_filter(topic_filter: str) -> None:
    """Raise ValueError unless `topic_filter` is a valid MQTT topic filter."""
    if not topic_filter or "\x00" in topic_filter:
        raise ValueError(f"empty or NUL topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"`#` must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"`+` must be a whole level in {topic_filter!r}")
    if topic_filter.startswith("$share/"):
        raise ValueError(f"give the plain filter, the bridge adds $share itself: {topic_filter!r}")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching; wildcards at the first level do not match `$` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def wildcard_values(topic_filter: str, topic: str) -> list[str] | None:
    """The levels of `topic` matched by the `+` levels of `topic_filter`, or None if it does not match."""
    if not topic_matches(topic_filter, topic):
        return None
    levels = topic.split("/")
    return [levels[i] for i, level in enumerate(topic_filter.split("/")) if level == "+"]


def validate_publish_topic(topic: str) -> None:
    """A topic a message may be published to (by a device or by the bridge)."""
    if not topic:
        raise Rejected("empty_topic", "empty topic")
    if "+" in topic or "#" in topic:
        raise Rejected("wildcard_topic", f"wildcards are not allowed in a publish topic: {topic[:80]!r}")
    if topic.startswith("$"):
        raise Rejected("system_topic", f"$ topics are the broker's: {topic[:80]!r}")
    if "\x00" in topic or len(topic.encode()) > 65535:
        raise Rejected("invalid_topic", "NUL in topic or topic longer than 65535 bytes")


def channel_for_topic(topic: str) -> str:
    """`a/b/c` -> `mqtt:a/b/c`; Rejected when the channel would not be a valid channel name."""
    validate_publish_topic(topic)
    channel = PREFIX + topic
    if len(channel) > MAX_CHANNEL:
        raise Rejected("topic_too_long", f"channel would be {len(channel)} > {MAX_CHANNEL} characters")
    if not _CHANNEL_CHARS.match(channel):
        raise Rejected("invalid_channel_chars", f"topic has characters a channel cannot have: {topic[:80]!r}")
    return channel


def topic_for_channel(channel: str) -> str:
    if not channel.startswith(PREFIX):
        raise Rejected("not_mqtt_channel", f"not an {PREFIX} channel: {channel[:80]!r}")
    topic = channel[len(PREFIX) :]
    validate_publish_topic(topic)
    return topic


def check_payload(payload: bytes, limit: int) -> bytes:
    if len(payload) > limit:
        raise Rejected("payload_too_large", f"payload of {len(payload)} bytes > {limit}")
    return payload


def presence_status(payload: bytes) -> str | None:
    """`online`/`offline` from a status payload: plain text, a JSON string, or {"status": ...}."""
    text: Any = payload.decode("utf-8", "replace").strip()
    if text[:1] in ('"', "{"):
        try:
            text = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if isinstance(text, dict):
            text = text.get("status")
    if not isinstance(text, str):
        return None
    text = text.strip().lower()
    return text if text in (ONLINE, OFFLINE) else None


def payload_to_bytes(value: Any) -> bytes:
    """An RPC's payload as MQTT bytes: a string as its UTF-8 text, anything else as JSON."""
    if isinstance(value, str):
        return value.encode()
    return orjson.dumps(value)


def payload_to_json(payload: bytes) -> dict[str, Any]:
    """MQTT bytes for a JSON answer: the JSON value, else the UTF-8 text, else base64."""
    try:
        return {"payload": orjson.loads(payload), "encoding": "json"}
    except orjson.JSONDecodeError:
        pass
    try:
        return {"payload": payload.decode("utf-8"), "encoding": "text"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode(), "encoding": "base64"}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    ssl: bool
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> BrokerAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT URL must be mqtt:// or mqtts://, not {url!r}")
    secure = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (8883 if secure else 1883),
        ssl=secure,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
