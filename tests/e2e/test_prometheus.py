"""Prometheus, configured as `tsunagu stack` configures it, scrapes every service of `tsunagu run` and loads
the project's alert rules; asked through its HTTP API, as an operator's Grafana would ask it.

A Prometheus of this test's own (the stack's scrapes the default ports, where other tests run nothing),
with the stack's config generator pointed at the free ports `tsunagu run` got here.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tsunagu.stack.prometheus import Prometheus
from tsunagu.stack.settings import StackSettings
from tsunagu.stack.templates import RULES_FILE, SCRAPE_TARGETS, prometheus_yml

PORT_VARIABLES = {
    "ws-gateway": "TSUNAGU_GATEWAY_PORT",
    "auth": "TSUNAGU_AUTH_PORT",
    "presence": "TSUNAGU_PRESENCE_PORT",
    "collab": "TSUNAGU_COLLAB_PORT",
    "stream-ingest": "TSUNAGU_INGEST_PORT",
    "mqtt-bridge": "TSUNAGU_MQTT_BRIDGE_PORT",
    "sim-engine": "TSUNAGU_SIM_PORT",
    "audit-log": "TSUNAGU_AUDIT_PORT",
}


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}; last answer: {last}")


def test_prometheus_scrapes_every_service_and_loads_the_alert_rules(  # type: ignore[no-untyped-def]
    start_service, pick_port, tmp_path: Path
) -> None:
    from tsunagu_core.testing import require_stack

    require_stack("Prometheus")  # installed by `tsunagu stack up`
    binary = Prometheus(StackSettings()).binary()
    if binary is None:
        pytest.skip("no prometheus binary")
    assert set(PORT_VARIABLES) == set(SCRAPE_TARGETS), "a service the stack scrapes is missing here"
    ports = {service: pick_port() for service in PORT_VARIABLES}
    env = {PORT_VARIABLES[service]: str(port) for service, port in ports.items()}
    env |= {"TSUNAGU_BUS": "memory", "TSUNAGU_BROKER": "memory", "TSUNAGU_DATABASE": "memory"}
    platform = start_service(["run"], env, port=ports["ws-gateway"])
    platform.wait_healthy(90)

    prometheus_port = pick_port()
    settings = StackSettings(prometheus_port=prometheus_port)
    config = tmp_path / "prometheus.yml"
    targets = {service: (port,) for service, port in ports.items()}
    config.write_text(prometheus_yml(settings, targets, evaluation_interval="2s"))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{prometheus_port}/api/v1"
    try:

        def all_up() -> dict[str, str] | None:
            try:
                active = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
            except (httpx.HTTPError, KeyError, ValueError):
                return None
            health = {t["labels"]["job"]: t["health"] for t in active if t["labels"]["job"].startswith("tsunagu-")}
            return health if len(health) == len(ports) and set(health.values()) == {"up"} else None

        health = until(all_up, 60, "not every service was scraped successfully")
        assert set(health) == {f"tsunagu-{service}" for service in ports}

        # The services' own metrics are stored, not just `up` (in `tsunagu run` every service shares one process
        # and so one registry: each job has them all).
        query = 'tsunagu_gateway_connections{job="tsunagu-ws-gateway"}'
        answer = httpx.get(f"{api}/query", params={"query": query}).json()
        assert len(answer["data"]["result"]) == 1, answer

        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = httpx.get(f"{api}/rules", timeout=2).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            evaluated = rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules)
            return rules if evaluated and all(not r["lastEvaluation"].startswith("0001") for r in rules) else None

        rules = until(rules_evaluated, 30, "the alert rules were not loaded and evaluated")
        assert RULES_FILE.read_text().count("- alert:") == len(rules)
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]

        # Every service is up, so no availability alert stays: one the rules raised as pending at an evaluation
        # before the first scrape (nothing to scrape yet, which the rule counts as down) is gone at the next.
        def availability_alerts() -> list[dict[str, Any]]:
            alerts = httpx.get(f"{api}/alerts", timeout=2).json()["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] in ("TsunaguGatewayDown", "TsunaguTargetDown")]

        until(lambda: not availability_alerts(), 20, "an availability alert stayed with every service up")
    finally:
        process.terminate()
        process.wait(10)
        log.close()
