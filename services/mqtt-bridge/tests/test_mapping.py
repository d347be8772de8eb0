import pytest
from tsunagu_core.config import ConfigError, load_settings
from tsunagu_mqtt_bridge.config import MqttBridgeSettings
from tsunagu_mqtt_bridge.mapping import (
    Rejected,
    channel_for_topic,
    check_payload,
    parse_mqtt_url,
    payload_to_bytes,
    payload_to_json,
    presence_status,
    topic_for_channel,
    topic_matches,
    validate_filter,
    wildcard_values,
)


def test_topic_maps_to_channel_and_back() -> None:
    assert channel_for_topic("a/b/c") == "mqtt:a/b/c"
    assert topic_for_channel("mqtt:a/b/c") == "a/b/c"
    assert channel_for_topic("plant-1/line.2/temp@x") == "mqtt:plant-1/line.2/temp@x"


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty_topic"),
        ("a/+/c", "wildcard_topic"),
        ("a/#", "wildcard_topic"),
        ("$SYS/broker/load", "system_topic"),
        ("a b/c", "invalid_channel_chars"),
        ("a/b?c", "invalid_channel_chars"),
        ("x" * 251, "topic_too_long"),
    ],
)
def test_unmappable_topics_are_rejected_with_a_reason(topic: str, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        channel_for_topic(topic)
    assert info.value.reason == reason


def test_longest_mappable_topic() -> None:
    assert len(channel_for_topic("x" * 250)) == 255


def test_payload_limit() -> None:
    assert check_payload(b"x" * 10, 10) == b"x" * 10
    with pytest.raises(Rejected) as info:
        check_payload(b"x" * 11, 10)
    assert info.value.reason == "payload_too_large"


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/b", "$SYS/b", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
    ],
)
def test_filter_matching(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def test_wildcard_values_and_filter_validation() -> None:
    assert wildcard_values("devices/+/status", "devices/d7/status") == ["d7"]
    assert wildcard_values("devices/+/status", "devices/d7/temp") is None
    for bad in ("a/#/b", "a/b+", "", "$share/g/a"):
        with pytest.raises(ValueError):
            validate_filter(bad)


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"online", "online"),
        (b" OFFLINE\n", "offline"),
        (b'"online"', "online"),
        (b'{"status": "offline"}', "offline"),
        (b"sleeping", None),
        (b"{bad", None),
        (b"\xff\xfe", None),
    ],
)
def test_presence_status(payload: bytes, status: str | None) -> None:
    assert presence_status(payload) == status


def test_payload_passthrough_rules() -> None:
    assert payload_to_bytes({"on": True}) == b'{"on":true}'
    assert payload_to_bytes("raw text") == b"raw text"
    assert payload_to_json(b'{"t": 21.5}') == {"payload": {"t": 21.5}, "encoding": "json"}
    assert payload_to_json(b"hello") == {"payload": "hello", "encoding": "text"}
    assert payload_to_json(b"\xff\x00") == {"payload": "/wA=", "encoding": "base64"}


def test_mqtt_urls() -> None:
    plain = parse_mqtt_url("mqtt://127.0.0.1:1883")
    assert (plain.host, plain.port, plain.ssl, plain.username) == ("127.0.0.1", 1883, False, None)
    secure = parse_mqtt_url("mqtts://bridge:s%40cret@broker.example")
    assert (secure.port, secure.ssl, secure.username, secure.password) == (8883, True, "bridge", "s@cret")
    with pytest.raises(ValueError):
        parse_mqtt_url("http://x")


def test_settings_validate_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_MQTT_BRIDGE_FILTERS", '["sensors/#", "a/+/b"]')
    assert load_settings(MqttBridgeSettings).filters == ["sensors/#", "a/+/b"]
    monkeypatch.setenv("TSUNAGU_MQTT_BRIDGE_FILTERS", '["a/#/b"]')
    with pytest.raises(ConfigError, match="TSUNAGU_MQTT_BRIDGE_FILTERS"):
        load_settings(MqttBridgeSettings)
    monkeypatch.setenv("TSUNAGU_MQTT_BRIDGE_FILTERS", '["#"]')
    monkeypatch.setenv("TSUNAGU_MQTT_BRIDGE_PRESENCE_TOPIC", "devices/status")
    with pytest.raises(ConfigError, match="PRESENCE_TOPIC"):
        load_settings(MqttBridgeSettings)
