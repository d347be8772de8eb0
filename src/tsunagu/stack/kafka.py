"""Kafka in KRaft mode (one broker and controller), from the jars `maven` fetched, with an SSL listener."""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

from tsunagu.stack import maven, proc
from tsunagu.stack.base import Component, tls_connect
from tsunagu.stack.settings import StackError, StackSettings
from tsunagu.stack.templates import kafka_log4j2_properties, kafka_server_properties

# librdkafka's connection errors while Kafka boots go here instead of our stderr
_QUIET = logging.getLogger("tsunagu.stack.kafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def kafka_cluster_id() -> str:
    """A Kafka cluster id as `StorageTool random-uuid` makes one: 16 random bytes, URL-safe base64."""
    while True:
        value = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not value.startswith("-"):
            return value


def java() -> str | None:
    return proc.which("java", "/usr/bin/java")


class Kafka(Component):
    name = "kafka"
    port_fields = ("kafka_port", "kafka_controller_port")
    exe_names = ("java",)

    def __init__(self, settings: StackSettings) -> None:
        super().__init__(settings)
        self.libs = maven.kafka_dist(settings) / "libs"

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    def detail(self) -> str:
        return f"bootstrap {self.address}"

    def missing_packages(self) -> list[str]:
        missing = []
        if not java():
            missing.append("default-jre-headless")
        if not maven.mvn():
            missing.append("maven")
        return missing

    def marker(self) -> str:
        return str(self.home / "server.properties")

    def _java(self) -> list[str]:
        return [
            java() or "java",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-Djava.awt.headless=true",
            "-cp",
            f"{self.libs}/*",
        ]

    def prepare(self) -> None:
        self.fetch_seconds = maven.ensure_kafka_jars(self.settings)
        self.home.mkdir(parents=True, exist_ok=True)
        properties = self.home / "server.properties"
        proc.write_if_changed(properties, kafka_server_properties(self.settings))
        proc.write_if_changed(self.home / "log4j2.properties", kafka_log4j2_properties())
        data = self.home / "data"
        if (data / "meta.properties").exists():
            return
        id_file = self.home / "cluster.id"
        cluster_id = id_file.read_text().strip() if id_file.exists() else ""
        if not cluster_id:
            cluster_id = kafka_cluster_id()
            id_file.write_text(cluster_id + "\n")
        self.log.touch()
        proc.run(
            [
                *self._java(),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                "--ignore-formatted",
            ],
            what="formatting the Kafka storage",
            timeout=120,
            cwd=self.home,
            log=self.log,
        )

    def command(self) -> list[str]:
        java = self._java()
        return [java[0], "-Xms256m", "-Xmx512m", *java[1:], "kafka.Kafka", str(self.home / "server.properties")]

    def probe(self, timeout: float) -> bool:
        try:
            proc.connect(self.port, min(timeout, 1.0)).close()
            tls_connect(self.settings, self.settings.kafka_tls_port, min(timeout, 3.0)).close()
        except OSError:
            return False
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError:
            raise StackError("confluent-kafka is not installed: cannot ask Kafka for metadata") from None
        config: dict[str, Any] = {"bootstrap.servers": self.address, "logger": _QUIET, "socket.timeout.ms": 3000}
        admin = AdminClient(config)
        try:
            metadata = admin.list_topics(timeout=timeout)
        except Exception:  # KafkaException: not answering metadata yet
            return False
        return bool(metadata.brokers)
