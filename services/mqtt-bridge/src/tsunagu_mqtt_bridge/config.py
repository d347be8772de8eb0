from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict
from tsunagu_core.config import ServiceSettings

from tsunagu_mqtt_bridge.mapping import validate_filter


class MqttBridgeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TSUNAGU_MQTT_BRIDGE_", extra="ignore")

    port: int = Field(8085, ge=1, le=65535, description="TCP port to listen on.")
    filters: list[str] = Field(
        default_factory=lambda: ["#"],
        description="JSON list of MQTT topic filters relayed to `mqtt:<topic>` channels (`#` never matches `$SYS`).",
    )
    share_group: str = Field(
        "tsunagu",
        pattern=r"^[^/+#]*$",
        description="MQTT 5 shared-subscription group (`$share/<group>/<filter>`) so replicas split the load;"
        " empty: every replica receives every message.",
    )
    client_id: str = Field(
        "",
        description="MQTT client id of the persistent session; empty: `tsunagu-mqtt-bridge-<TSUNAGU_NODE_NAME>`."
        " Keep it stable across restarts of a replica and different between replicas.",
    )
    session_expiry: int = Field(
        3600, ge=0, le=0xFFFFFFFF, description="Seconds the broker keeps the bridge's session (and its messages)."
    )
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="MQTT 5 Receive Maximum: QoS 1 messages the broker may send before the bridge acknowledges"
        " them (the broker's own limit applies too: Mosquitto's max_inflight_messages, 20 by default).",
    )
    reconnect_max: float = Field(10.0, gt=0, le=300, description="Longest wait in seconds between MQTT reconnects.")
    relay_workers: int = Field(
        2,
        ge=1,
        le=1024,
        description="Parallel relays to channels, each publishing batches; messages of one topic keep their order.",
    )
    relay_batch_size: int = Field(
        500, ge=1, le=10_000, description="Most MQTT messages a relay publishes in one broker call."
    )
    ack_in_order: bool = Field(
        True,
        description="Acknowledge MQTT messages in the order they arrived, as MQTT requires [MQTT-4.6.0-2] and strict"
        " brokers (rumqttd, `tsunagu run`'s embedded one) enforce by disconnecting. Off: each as soon as it is"
        " relayed, which Mosquitto tolerates and which keeps its in-flight window from waiting on the slowest relay.",
    )
    max_payload_bytes: int = Field(
        65536, ge=1, description="Largest MQTT payload relayed to a channel; larger ones are rejected and counted."
    )
    history_size: int = Field(10, ge=0, description="Channel history kept per `mqtt:` channel (the gateway's).")
    history_ttl: float = Field(300.0, ge=0, description="Seconds `mqtt:` channel history is kept (the gateway's).")
    consumer_group: str = Field(
        "mqtt-bridge", min_length=1, description="Kafka consumer group reading `tsunagu.mqtt.commands`."
    )
    dedupe_ttl: float = Field(
        86400.0, gt=0, description="Seconds a command id is remembered so a redelivered command is not sent twice."
    )
    presence_topic: str = Field(
        "devices/+/status",
        description="Filter of device status (last-will) topics carrying `online`/`offline`; the first `+` is the"
        " device id. Empty: no device presence.",
    )
    presence_channel: str = Field(
        "mqtt:devices/{device}", description="Channel on which a device's join/leave is kept and pushed."
    )
    presence_ttl: float = Field(86400.0, gt=1, description="Seconds a device's presence entry lives without news.")
    request_timeout: float = Field(
        3.0, gt=0, le=60, description="Default seconds `mqtt.request` waits for the device's response."
    )
    request_timeout_max: float = Field(30.0, gt=0, le=600, description="Longest timeout an `mqtt.request` may ask.")

    @field_validator("filters")
    @classmethod
    def _filters_are_valid(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one filter")
        for topic_filter in value:
            validate_filter(topic_filter)
        return value

    @field_validator("presence_topic")
    @classmethod
    def _presence_is_filter(cls, value: str) -> str:
        if value:
            validate_filter(value)
            if "+" not in value.split("/"):
                raise ValueError("the presence topic needs a `+` level for the device id")
        return value
