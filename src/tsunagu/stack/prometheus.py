"""Prometheus: scrapes every service's /metrics under the job names the dashboards and rules select on."""

from __future__ import annotations

import urllib.error
import urllib.request

from tsunagu.stack import proc
from tsunagu.stack.base import Component
from tsunagu.stack.settings import connection_env
from tsunagu.stack.templates import prometheus_yml


class Prometheus(Component):
    name = "prometheus"
    port_fields = ("prometheus_port",)
    service = "prometheus"
    exe_names = ("prometheus",)

    @property
    def port(self) -> int:
        return self.settings.prometheus_port

    def detail(self) -> str:
        return connection_env(self.settings)["TSUNAGU_PROMETHEUS_URL"]

    def binary(self) -> str | None:
        return proc.which("prometheus", "/usr/bin/prometheus")

    def missing_packages(self) -> list[str]:
        return [] if self.binary() else ["prometheus"]

    def marker(self) -> str:
        return f"--config.file={self.home / 'prometheus.yml'}"

    def prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        proc.write_if_changed(self.home / "prometheus.yml", prometheus_yml(self.settings))

    def command(self) -> list[str]:
        return [
            self.binary() or "prometheus",
            f"--config.file={self.home / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.home / 'data'}",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
        ]

    def probe(self, timeout: float) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=timeout) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError, ValueError):
            return False
