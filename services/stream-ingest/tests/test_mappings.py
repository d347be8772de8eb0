"""Mappings: channel templates, topic names and patterns, formats, and configuration errors."""

from __future__ import annotations

import base64
import json

import pytest
from tsunagu_core.config import ConfigError, load_settings
from tsunagu_stream_ingest.config import IngestSettings
from tsunagu_stream_ingest.mappings import IngestMapping, PoisonRecord, find_mapping


def test_default_templates_follow_the_platform_contract() -> None:
    mapping = IngestMapping(topic="prices")
    assert mapping.channel_for("prices", b"EURUSD", 0) == "stream:prices.EURUSD"
    assert mapping.channel_for("prices", None, 2) == "stream:prices"
    assert mapping.label == "prices"


def test_custom_templates_may_use_the_partition() -> None:
    mapping = IngestMapping(
        topic="^scores\\..*", name="scores", channel="live:{key}", keyless_channel="live:{topic}-{partition}"
    )
    assert mapping.channel_for("scores.nba", b"game-7", 1) == "live:game-7"
    assert mapping.channel_for("scores.nba", None, 4) == "live:scores.nba-4"


def test_keys_that_cannot_name_a_channel_are_poison() -> None:
    mapping = IngestMapping(topic="prices")
    with pytest.raises(PoisonRecord, match="not UTF-8"):
        mapping.channel_for("prices", b"\xff\xfe", 0)
    with pytest.raises(PoisonRecord, match="not a valid name"):
        mapping.channel_for("prices", b"two words", 0)
    with pytest.raises(PoisonRecord, match="not a valid name"):
        mapping.channel_for("prices", b"k" * 300, 0)


def test_exact_names_win_over_patterns_and_dead_letter_topics_never_match() -> None:
    pattern = IngestMapping(topic="^prices\\..*", name="all-prices")
    exact = IngestMapping(topic="prices.fx")
    mappings = [pattern, exact]
    assert find_mapping(mappings, "prices.fx") is exact
    assert find_mapping(mappings, "prices.equities") is pattern
    assert find_mapping(mappings, "prices.equities.dlq") is None
    assert find_mapping(mappings, "weather") is None


def test_formats() -> None:
    as_json = IngestMapping(topic="t")
    assert as_json.payload(b'{"p": 1.5}') == b'{"p": 1.5}'
    # A line break cannot ride in the gateway's newline-delimited frames: compacted.
    assert as_json.payload(b'{\n"p": 1}') == b'{"p":1}'
    with pytest.raises(PoisonRecord, match="not JSON"):
        as_json.payload(b"{broken")
    with pytest.raises(PoisonRecord, match="not JSON"):
        as_json.payload(b"\xff\x00")
    raw = b"\x08\x96\x01"
    wrapped = json.loads(IngestMapping(topic="t", format="bytes").payload(raw))
    assert base64.b64decode(wrapped["b64"]) == raw
    assert IngestMapping(topic="t", format="protobuf").payload(raw) == raw
    with pytest.raises(PoisonRecord, match="exceeds max_record_bytes=4"):
        IngestMapping(topic="t", format="protobuf", max_record_bytes=4).payload(b"12345")


def test_mappings_come_from_one_json_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TSUNAGU_INGEST_MAPPINGS",
        json.dumps([{"topic": "prices", "max_rate": 5}, {"topic": "^scores\\..*", "format": "bytes"}]),
    )
    settings = load_settings(IngestSettings)
    assert [(m.topic, m.max_rate, m.format) for m in settings.mappings] == [
        ("prices", 5.0, "json"),
        ("^scores\\..*", 0.0, "bytes"),
    ]
    assert settings.consumer_group == "stream-ingest"
    assert settings.history_size == 10 and settings.history_ttl == 300


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[{", "not valid JSON"),
        ('[{"topic": "^prices[("}]', "not a valid regex"),
        ('[{"topic": "bad topic"}]', "not a Kafka topic name"),
        ('[{"topic": "x.dlq"}]', "dead-letter topic"),
        ('[{"topic": "t", "channel": "stream:{user}"}]', "uses user"),
        ('[{"topic": "t", "keyless_channel": "stream:{key}"}]', "keyless_channel cannot use {key}"),
        ('[{"topic": "t", "format": "xml"}]', "'json', 'bytes' or 'protobuf'"),
        ('[{"topic": "t", "max_rate": -1}]', "greater than or equal to 0"),
        ('[{"topic": "t", "colour": "red"}]', "Extra inputs are not permitted"),
        ('[{"topic": "t"}, {"topic": "t"}]', "names must be unique: t"),
    ],
)
def test_bad_mappings_stop_with_one_clear_line(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("TSUNAGU_INGEST_MAPPINGS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings(IngestSettings)
    message = str(caught.value)
    assert "\n" not in message
    assert "TSUNAGU_INGEST_MAPPINGS" in message
    assert expected in message


def test_history_must_keep_the_last_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_INGEST_HISTORY_SIZE", "0")
    with pytest.raises(ConfigError, match="TSUNAGU_INGEST_HISTORY_SIZE"):
        load_settings(IngestSettings)
