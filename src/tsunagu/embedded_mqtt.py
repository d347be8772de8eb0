"""`tsunagu run`'s own MQTT broker, for when no TSUNAGU_MQTT_URL names a real one.

It is run mode's infrastructure, like the in-process bus: the CLI starts it and points mqtt-bridge at it
through TSUNAGU_MQTT_URL, so the bridge neither knows nor cares that the broker is embedded. The broker
is rumqttd, shipped compiled in the `iotcore` wheel: MQTT 5 with shared subscriptions, request/response
properties and user properties, which the bridge relies on. (amqtt, the asyncio-native one, speaks
MQTT 3.1.1 only: it never answers the bridge's MQTT 5 CONNECT.) rumqttd has no shutdown call, so iotcore
runs it in a child process that exits with its parent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from iotcore import Broker

log = logging.getLogger("tsunagu.embedded_mqtt")

# rumqttd's per-connection limits; payloads up to mqtt-bridge's own default limit and then some.
MAX_PAYLOAD_BYTES = 256 * 1024
START_TIMEOUT = 10.0


class RunSettings(BaseSettings):
    """What `tsunagu run` starts by itself when the infrastructure is not configured."""

    model_config = SettingsConfigDict(env_prefix="TSUNAGU_RUN_", extra="ignore")

    mqtt_port: int = Field(
        1883,
        ge=0,
        le=65535,
        description="Port of the embedded MQTT 5 broker that `tsunagu run` starts when `TSUNAGU_MQTT_URL` is unset;"
        " when it is taken (a local Mosquitto), a free port is used and printed. 0: a free port.",
    )


def mqtt_url_configured() -> bool:
    return bool(os.environ.get("TSUNAGU_MQTT_URL"))


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config(host: str, port: int) -> str:
    """rumqttd's TOML: one MQTT 5 listener; the router keeps up to 10 MiB per topic filter for slow readers."""
    return f"""id = 0

[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 1048576
max_segment_count = 10

[v5.1]
name = "tsunagu-run-v5"
listen = "{host}:{port}"
next_connection_delay_ms = 1

[v5.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MAX_PAYLOAD_BYTES}
max_inflight_count = 100
"""


class EmbeddedMqttBroker:
    """An MQTT 5 broker on `host:port` for this process's lifetime (`start()` and `stop()` block: run them
    in a thread)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self.listen = host or "127.0.0.1"
        self.wanted = port
        self.port = port or _free_port(self.host)
        # Said in the banner: a local broker already holds the wanted port.
        self.displaced = False
        if port and not _port_free(self.listen, port):
            self.port = _free_port(self.host)
            self.displaced = True
        self._broker: Broker | None = None
        self._config_path: str | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        from iotcore import Broker

        with tempfile.NamedTemporaryFile("w", prefix="tsunagu-mqtt-", suffix=".toml", delete=False) as config:
            config.write(_config(self.listen, self.port))
        self._config_path = config.name
        broker = Broker(config_path=config.name)
        broker.start(timeout=START_TIMEOUT)
        self._broker = broker
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()
        if self._config_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._config_path)
            self._config_path = None
