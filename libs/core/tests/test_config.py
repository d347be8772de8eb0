from __future__ import annotations

import pytest
from tsunagu_core.config import ConfigError, CoreSettings, ServiceSettings, load_settings, render_config_docs


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TSUNAGU_BUS", "TSUNAGU_BROKER"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(CoreSettings)
    assert (settings.bus, settings.broker) == ("memory", "memory")


def test_environment_selects_real_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_BUS", "kafka")
    monkeypatch.setenv("TSUNAGU_KAFKA_BOOTSTRAP", "kafka-0:9092,kafka-1:9092")
    settings = load_settings(CoreSettings)
    assert settings.bus == "kafka" and settings.kafka_bootstrap == "kafka-0:9092,kafka-1:9092"


def test_invalid_values_give_one_line_naming_each_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSUNAGU_BROKER", "memcached")
    monkeypatch.setenv("TSUNAGU_KAFKA_PARTITIONS", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings(CoreSettings)
    message = str(caught.value)
    assert "\n" not in message
    assert "TSUNAGU_BROKER='memcached'" in message and "'memory' or 'redis'" in message
    assert "TSUNAGU_KAFKA_PARTITIONS='0'" in message and "greater than or equal to 1" in message


def test_docs_list_every_variable_with_type_default_and_description() -> None:
    text = render_config_docs([("Shared", CoreSettings), ("Any service", ServiceSettings)])
    assert "| `TSUNAGU_BUS` | `memory` \\| `kafka` | `memory` |" in text
    assert "| `TSUNAGU_NODE_NAME` | str | (computed) |" in text
    assert "`TSUNAGU_OTLP_ENDPOINT` | str | (empty) |" in text
    for name in CoreSettings.model_fields:
        assert f"`TSUNAGU_{name.upper()}`" in text
