"""Grafana dashboards as code.

    python deploy/observability/generate_dashboards.py           # (re)write the JSON files
    python deploy/observability/generate_dashboards.py --check   # exit 1 when a file is not current

Writes one JSON file per dashboard into the Helm chart, deploy/helm/tsunagu/files/dashboards/
(deploy/observability/dashboards links there), which ships them as ConfigMaps for Grafana's dashboard
sidecar (monitoring.dashboards.enabled). The generated files are committed; deploy/check.sh fails when
they are not what this script writes, and checks every query against the metrics the services export.

Plain Python and the standard library only (grafana-foundation-sdk would work too, but then the check
and the tests would need it installed). The dashboards select the services by job name, tsunagu-<service>,
as the chart's ServiceMonitors and `tsunagu stack` name them, and use these template variables:
  datasource  the Prometheus data source
  namespace   Kubernetes namespaces with Tsunagu targets ("All" also matches series without the label,
              as under `tsunagu stack`)
  job         the services, for the panels that are not the gateway's
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "deploy" / "helm" / "tsunagu" / "files" / "dashboards"

Json = dict[str, Any]

DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
GATEWAY_JOB = "tsunagu-ws-gateway"
RATE = "$__rate_interval"
GRID_WIDTH = 24

# Thresholds shared with the alert rules (deploy/helm/tsunagu/files/tsunagu.rules.yaml).
SLOW_CLIENTS_PER_SECOND = 1
BROKER_P99_SECONDS = 0.05
DELIVERY_P99_SECONDS = 0.25


# --- selectors -------------------------------------------------------------------------------


def gateway(*matchers: str) -> str:
    """Series of the gateway in the chosen namespaces."""
    return "{" + ", ".join([f'job="{GATEWAY_JOB}"', 'namespace=~"$namespace"', *matchers]) + "}"


def job(name: str, *matchers: str) -> str:
    """Series of one service in the chosen namespaces."""
    return "{" + ", ".join([f'job="{name}"', 'namespace=~"$namespace"', *matchers]) + "}"


def services(*matchers: str) -> str:
    """Series of the chosen services in the chosen namespaces."""
    return "{" + ", ".join(['job=~"$job"', 'namespace=~"$namespace"', *matchers]) + "}"


# --- panels ----------------------------------------------------------------------------------


def query(expr: str, legend: str = "__auto", ref: str = "A") -> Json:
    return {
        "refId": ref,
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
    }


def _steps(steps: Sequence[tuple[str, float | None]]) -> Json:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def timeseries(
    title: str,
    description: str,
    targets: Sequence[Json],
    unit: str = "short",
    *,
    bars: bool = False,
    stack: bool = False,
    alert_threshold: float | None = None,
    overrides: Sequence[Json] = (),
) -> Json:
    """A time series panel; alert_threshold draws the alert rule's threshold as a red line."""
    custom: Json = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 80 if bars else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "off" if alert_threshold is None else "line"},
    }
    steps: list[tuple[str, float | None]] = [("green", None)]
    if alert_threshold is not None:
        steps.append(("red", alert_threshold))
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": list(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "color": {"mode": "palette-classic"},
                "custom": custom,
                "thresholds": _steps(steps),
            },
            "overrides": list(overrides),
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    description: str,
    targets: Sequence[Json],
    unit: str = "short",
    *,
    steps: Sequence[tuple[str, float | None]] = (("green", None),),
    text_mode: str = "auto",
    decimals: int | None = None,
) -> Json:
    defaults: Json = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": _steps(steps)}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": list(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": text_mode,
        },
    }


def highlight(series_name: str, color: str) -> Json:
    """Draw one series (by its legend name) thick and in a fixed colour."""
    return {
        "matcher": {"id": "byName", "options": series_name},
        "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": color}},
            {"id": "custom.lineWidth", "value": 3},
        ],
    }


Section = tuple[str, Sequence[tuple[Json, int, int]]]


def layout(sections: Iterable[Section]) -> list[Json]:
    """Rows of panels, left to right; gives every panel its id and grid position."""
    panels: list[Json] = []
    y = 0
    for title, items in sections:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
            }
        )
        y += 1
        x = row_height = 0
        for panel, width, height in items:
            if x + width > GRID_WIDTH:
                y, x, row_height = y + row_height, 0, 0
            panels.append({"id": len(panels) + 1, **panel, "gridPos": {"h": height, "w": width, "x": x, "y": y}})
            x += width
            row_height = max(row_height, height)
        y += row_height
    return panels


# --- template variables ----------------------------------------------------------------------


def datasource_variable() -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
    }


def query_variable(name: str, label: str, definition: str, all_value: str) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": definition,
        "query": definition,
        "includeAll": True,
        "allValue": all_value,
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "options": [],
    }


def dashboard(uid: str, title: str, description: str, variables: list[Json], panels: list[Json]) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["tsunagu"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables},
        "panels": panels,
    }


# --- the dashboards --------------------------------------------------------------------------


def overview() -> Json:
    per_second = "suffix:/s"
    slow = gateway('code="3008"')
    not_slow = gateway('code!="3008"')
    sections: list[Section] = [
        (
            "Overview",
            [
                (
                    stat(
                        "Connections",
                        "Open WebSocket connections, all gateway replicas.",
                        [query(f"sum(tsunagu_gateway_connections{gateway()})", "connections")],
                    ),
                    4,
                    4,
                ),
                (
                    stat(
                        "Subscriptions",
                        "Client subscriptions, all gateway replicas.",
                        [query(f"sum(tsunagu_gateway_subscriptions{gateway()})", "subscriptions")],
                    ),
                    4,
                    4,
                ),
                (
                    stat(
                        "Deliveries",
                        "Publications queued to client connections per second.",
                        [query(f"sum(rate(tsunagu_gateway_deliveries_total{gateway()}[{RATE}]))", "deliveries")],
                        per_second,
                    ),
                    4,
                    4,
                ),
                (
                    stat(
                        "Commands",
                        "Client commands handled per second.",
                        [query(f"sum(rate(tsunagu_gateway_commands_total{gateway()}[{RATE}]))", "commands")],
                        per_second,
                    ),
                    4,
                    4,
                ),
                (
                    stat(
                        "Slow-client disconnects",
                        "Connections closed with 3008 (the client did not read fast enough), per second. "
                        f"TsunaguSlowClientDisconnects fires above {SLOW_CLIENTS_PER_SECOND}/s for 10 minutes.",
                        [
                            query(
                                f"sum(rate(tsunagu_gateway_disconnects_total{slow}[{RATE}]))",
                                "slow clients",
                            )
                        ],
                        per_second,
                        steps=(("green", None), ("orange", 0.1), ("red", SLOW_CLIENTS_PER_SECOND)),
                    ),
                    4,
                    4,
                ),
                (
                    stat(
                        "Targets down",
                        "Service replicas Prometheus cannot scrape (TsunaguTargetDown after 5 minutes).",
                        [query(f"count({'up' + services()} == 0) or vector(0)", "down")],
                        steps=(("green", None), ("red", 1)),
                    ),
                    4,
                    4,
                ),
            ],
        ),
        (
            "Gateway",
            [
                (
                    timeseries(
                        "Connections per replica",
                        "Open WebSocket connections on each gateway replica.",
                        [query(f"sum by (instance) (tsunagu_gateway_connections{gateway()})", "{{instance}}")],
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Subscriptions and channels per replica",
                        "Client subscriptions, and channels with at least one subscriber, on each replica.",
                        [
                            query(
                                f"sum by (instance) (tsunagu_gateway_subscriptions{gateway()})",
                                "subscriptions {{instance}}",
                            ),
                            query(
                                f"sum by (instance) (tsunagu_gateway_channels{gateway()})",
                                "channels {{instance}}",
                                ref="B",
                            ),
                        ],
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Deliveries per replica",
                        "Publications queued to client connections per second, on each replica.",
                        [
                            query(
                                f"sum by (instance) (rate(tsunagu_gateway_deliveries_total{gateway()}[{RATE}]))",
                                "{{instance}}",
                            )
                        ],
                        per_second,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Commands by method",
                        "Client commands handled per second, by method.",
                        [
                            query(
                                f"sum by (method) (rate(tsunagu_gateway_commands_total{gateway()}[{RATE}]))",
                                "{{method}}",
                            )
                        ],
                        per_second,
                        stack=True,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Command errors by code",
                        "Commands answered with an error, per second, by code: 100 internal (TsunaguCommandErrorsHigh "
                        "above 5% of commands), 101 unauthorized, 102 unknown channel, 103 permission denied, "
                        "106 limit exceeded, 107 bad request, 108 not available, 109 token expired, "
                        "111 too many requests, 112 unrecoverable position.",
                        [
                            query(
                                f"sum by (code) (rate(tsunagu_gateway_command_errors_total{gateway()}[{RATE}]))",
                                "{{code}}",
                            )
                        ],
                        per_second,
                        overrides=[highlight("100", "red")],
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Disconnects by code",
                        "Connections closed by the server, per second, by close code. 3008 (red) is a slow client "
                        "cut off for not reading; 3000 connection closed, 3001 shutdown, 3005 connection expired, "
                        "3011 force reconnect, 3012 no pong, 3500 invalid or revoked token.",
                        [
                            query(
                                f"sum by (code) (rate(tsunagu_gateway_disconnects_total{not_slow}[{RATE}]))",
                                "{{code}}",
                            ),
                            query(
                                f"sum(rate(tsunagu_gateway_disconnects_total{slow}[{RATE}]))",
                                "3008 slow client",
                                ref="B",
                            ),
                        ],
                        per_second,
                        overrides=[highlight("3008 slow client", "red")],
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Revocations applied",
                        "Revocations received from auth (forced logouts), per second, by scope.",
                        [
                            query(
                                f"sum by (scope) (rate(tsunagu_gateway_revocations_total{gateway()}[{RATE}]))",
                                "{{scope}}",
                            )
                        ],
                        per_second,
                    ),
                    12,
                    7,
                ),
                (
                    timeseries(
                        "Connection events dropped",
                        "Connection events that did not reach the bus, per replica (TsunaguGatewayEventsDropped).",
                        [
                            query(
                                "sum by (instance) "
                                f"(increase(tsunagu_gateway_events_dropped_total{gateway()}[{RATE}]))",
                                "{{instance}}",
                            )
                        ],
                        bars=True,
                    ),
                    12,
                    7,
                ),
                (
                    timeseries(
                        "Delivery latency",
                        "From the publish accepted by the broker to the publication queued for a replica's "
                        "subscribers (Redis fan-out plus the replica's backlog), p50 and p99 over all replicas "
                        f"(TsunaguDeliveryLatencyHigh above {DELIVERY_P99_SECONDS * 1000:.0f} ms p99 for 10 minutes).",
                        [
                            query(
                                "histogram_quantile(0.5, sum by (le) "
                                f"(rate(tsunagu_gateway_delivery_lag_seconds_bucket{gateway()}[{RATE}])))",
                                "p50",
                            ),
                            query(
                                "histogram_quantile(0.99, sum by (le) "
                                f"(rate(tsunagu_gateway_delivery_lag_seconds_bucket{gateway()}[{RATE}])))",
                                "p99",
                                ref="B",
                            ),
                        ],
                        "s",
                        alert_threshold=DELIVERY_P99_SECONDS,
                    ),
                    24,
                    8,
                ),
            ],
        ),
        (
            "Event bus (Kafka)",
            [
                (
                    timeseries(
                        "Published by topic",
                        "Events published to the bus per second, by topic.",
                        [
                            query(
                                f"sum by (topic) (rate(tsunagu_bus_published_total{services()}[{RATE}]))",
                                "{{topic}}",
                            )
                        ],
                        per_second,
                        stack=True,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Publish errors",
                        "Bus publishes that failed, per second, by service and topic (TsunaguBusPublishErrors).",
                        [
                            query(
                                f"sum by (job, topic) (rate(tsunagu_bus_publish_errors_total{services()}[{RATE}]))",
                                "{{job}} {{topic}}",
                            )
                        ],
                        per_second,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Consumed by group",
                        "Events handled from the bus per second, by consumer group and topic.",
                        [
                            query(
                                f"sum by (group, topic) (rate(tsunagu_bus_consumed_total{services()}[{RATE}]))",
                                "{{group}} <- {{topic}}",
                            )
                        ],
                        per_second,
                        stack=True,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Handler errors",
                        "Handler attempts that raised, per second, by consumer group and topic (they are retried, "
                        "then dead-lettered).",
                        [
                            query(
                                f"sum by (group, topic) (rate(tsunagu_bus_handler_errors_total{services()}[{RATE}]))",
                                "{{group}} <- {{topic}}",
                            )
                        ],
                        per_second,
                    ),
                    12,
                    8,
                ),
                (
                    timeseries(
                        "Dead letters",
                        "Events given up on and sent to <topic>.dlq, by consumer group and topic "
                        "(TsunaguDeadLetters). The first one of a group and topic is not shown here: its series "
                        "starts at 1. The alert catches it.",
                        [
                            query(
                                f"sum by (group, topic) (increase(tsunagu_bus_dead_letters_total{services()}[{RATE}]))",
                                "{{group}} <- {{topic}}",
                            )
                        ],
                        bars=True,
                    ),
                    12,
                    8,
                ),
                (
                    timeseries(
                        "Consumer lag",
                        "Events in Kafka not yet handled, by consumer group and topic (TsunaguKafkaLagGrowing: "
                        "above 1000 and growing for 15 minutes).",
                        [
                            query(
                                f"sum by (group, topic) (tsunagu_bus_consumer_lag{services()})",
                                "{{group}} <- {{topic}}",
                            )
                        ],
                    ),
                    24,
                    8,
                ),
            ],
        ),
        (
            "Broker (Redis fan-out)",
            [
                (
                    timeseries(
                        "Broker publications",
                        "Channel publications accepted by the broker per second, by service.",
                        [
                            query(
                                f"sum by (job) (rate(tsunagu_broker_published_total{services()}[{RATE}]))",
                                "{{job}}",
                            )
                        ],
                        per_second,
                        stack=True,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Broker operation latency",
                        "p50 and p99 of broker operations (Redis round trips), by operation. The red line is "
                        "TsunaguBrokerLatencyHigh's p99 threshold (10 minutes above it).",
                        [
                            query(
                                "histogram_quantile(0.5, sum by (operation, le) "
                                f"(rate(tsunagu_broker_operation_seconds_bucket{services()}[{RATE}])))",
                                "p50 {{operation}}",
                            ),
                            query(
                                "histogram_quantile(0.99, sum by (operation, le) "
                                f"(rate(tsunagu_broker_operation_seconds_bucket{services()}[{RATE}])))",
                                "p99 {{operation}}",
                                ref="B",
                            ),
                        ],
                        "s",
                        alert_threshold=BROKER_P99_SECONDS,
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Fan-out resubscribes",
                        "Redis fan-out links lost and re-established, per replica; each one makes clients "
                        "resubscribe and recover (TsunaguBrokerResubscribing above 3 in 10 minutes).",
                        [
                            query(
                                "sum by (job, instance) "
                                f"(increase(tsunagu_broker_resubscribes_total{services()}[{RATE}]))",
                                "{{job}} {{instance}}",
                            )
                        ],
                        bars=True,
                    ),
                    8,
                    8,
                ),
            ],
        ),
        (
            "Sessions, presence and audit",
            [
                (
                    stat(
                        "Online users",
                        "Users with at least one connection, cluster-wide, as presence tracks them.",
                        [query(f"max(tsunagu_presence_online_users{job('tsunagu-presence')})", "online users")],
                        decimals=0,
                    ),
                    6,
                    6,
                ),
                (
                    stat(
                        "Audit chain",
                        "1 when audit-log's last verification found the hash chain and its signed checkpoints "
                        "intact (TsunaguAuditChainBroken fires on 0).",
                        [query(f"min(tsunagu_audit_chain_ok{job('tsunagu-audit-log')})", "chain intact")],
                        steps=(("red", None), ("green", 1)),
                        decimals=0,
                    ),
                    6,
                    6,
                ),
                (
                    timeseries(
                        "Logins",
                        "Password and client-credential logins per second by outcome (auth); failures "
                        "include lock-outs and rate limits.",
                        [
                            query(
                                f"sum by (outcome) (rate(tsunagu_auth_logins_total{job('tsunagu-auth')}[{RATE}]))",
                                "{{outcome}}",
                            )
                        ],
                        "suffix:/s",
                    ),
                    6,
                    6,
                ),
                (
                    timeseries(
                        "Audit events",
                        "Events appended to the audit chain per second, by type.",
                        [
                            query(
                                f"sum by (type) (rate(tsunagu_audit_events_total{job('tsunagu-audit-log')}[{RATE}]))",
                                "{{type}}",
                            )
                        ],
                        "suffix:/s",
                        stack=True,
                    ),
                    6,
                    6,
                ),
            ],
        ),
        (
            "Feeds, documents and simulations",
            [
                (
                    timeseries(
                        "Ingested records",
                        "Kafka records relayed to channels by stream-ingest per second, by mapping and outcome.",
                        [
                            query(
                                "sum by (mapping, outcome) "
                                f"(rate(tsunagu_ingest_records_total{job('tsunagu-stream-ingest')}[{RATE}]))",
                                "{{mapping}} {{outcome}}",
                            )
                        ],
                        "suffix:/s",
                    ),
                    8,
                    7,
                ),
                (
                    timeseries(
                        "Open documents",
                        "Yjs documents collab holds in memory, by replica.",
                        [
                            query(
                                f"sum by (instance) (tsunagu_collab_open_documents{job('tsunagu-collab')})",
                                "{{instance}}",
                            )
                        ],
                    ),
                    8,
                    7,
                ),
                (
                    timeseries(
                        "Simulation ticks",
                        "p99 work per room tick by kind, and the share of ticks that overran their interval "
                        "(TsunaguSimTickOverruns above 10% for 10 minutes).",
                        [
                            query(
                                "histogram_quantile(0.99, sum by (kind, le) "
                                f"(rate(tsunagu_sim_tick_seconds_bucket{job('tsunagu-sim-engine')}[{RATE}])))",
                                "p99 {{kind}}",
                            ),
                        ],
                        "s",
                    ),
                    8,
                    7,
                ),
            ],
        ),
        (
            "Services",
            [
                (
                    stat(
                        "Replicas up",
                        "Targets Prometheus scraped successfully, by service (TsunaguGatewayDown, TsunaguTargetDown).",
                        [query(f"sum by (job) (up{services()})", "{{job}}")],
                        steps=(("red", None), ("green", 1)),
                        text_mode="value_and_name",
                        decimals=0,
                    ),
                    24,
                    4,
                ),
                (
                    timeseries(
                        "CPU",
                        "CPU time used per second by each service process (1 = one core).",
                        [
                            query(
                                f"sum by (job, instance) (rate(process_cpu_seconds_total{services()}[{RATE}]))",
                                "{{job}} {{instance}}",
                            )
                        ],
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Resident memory",
                        "Resident set size of each service process.",
                        [
                            query(
                                f"sum by (job, instance) (process_resident_memory_bytes{services()})",
                                "{{job}} {{instance}}",
                            )
                        ],
                        "bytes",
                    ),
                    8,
                    8,
                ),
                (
                    timeseries(
                        "Open file descriptors",
                        "Open file descriptors of each service process (each WebSocket connection holds one); "
                        "the dashed limit is the process's maximum.",
                        [
                            query(f"sum by (job, instance) (process_open_fds{services()})", "{{job}} {{instance}}"),
                            query(
                                f"min by (job) (process_max_fds{services()})",
                                "limit {{job}}",
                                ref="B",
                            ),
                        ],
                        overrides=[
                            {
                                "matcher": {"id": "byFrameRefID", "options": "B"},
                                "properties": [
                                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                    {
                                        "id": "custom.hideFrom",
                                        "value": {"legend": True, "tooltip": False, "viz": False},
                                    },
                                ],
                            }
                        ],
                    ),
                    8,
                    8,
                ),
            ],
        ),
    ]
    variables = [
        datasource_variable(),
        query_variable("namespace", "Namespace", 'label_values(up{job=~"tsunagu-.+"}, namespace)', ".*"),
        query_variable(
            "job", "Service", 'label_values(up{job=~"tsunagu-.+", namespace=~"$namespace"}, job)', "tsunagu-.+"
        ),
    ]
    return dashboard(
        "tsunagu-overview",
        "Tsunagu / Overview",
        "The gateway's connections and traffic, the event bus, the Redis fan-out and every service's process. "
        "Generated by deploy/observability/generate_dashboards.py; do not edit in Grafana.",
        variables,
        layout(sections),
    )


DASHBOARDS = {"tsunagu-overview.json": overview}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when a file differs from what would be written")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    files = render()
    stale = sorted(p.name for p in args.output.glob("*.json") if p.name not in files) if args.output.is_dir() else []
    if args.check:
        problems = [
            name
            for name, text in files.items()
            if not (args.output / name).is_file() or (args.output / name).read_text() != text
        ]
        for name in problems:
            print(f"FAIL {name} is not current: run python deploy/observability/generate_dashboards.py")
        for name in stale:
            print(f"FAIL {name} is not generated by this script (remove it, or add it to DASHBOARDS)")
        if problems or stale:
            return 1
        print(f"dashboards: {len(files)} file(s) current in {args.output}")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.output / name).unlink()
        print(f"removed {name}")
    for name, text in files.items():
        path = args.output / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
