"""The pieces every dashboard is made of: series selectors, panels, rows laid out on Grafana's grid,
template variables and the dashboard around them (Grafana's JSON model, schema 39)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

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
