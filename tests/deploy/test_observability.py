"""Dashboards and alert rules (deploy/observability): the PromQL metric-name reader, the generator's
output being current, and the checks deploy/check.sh runs on them. Needs no helm, no promtool and no
network; the full check (promtool, rendered chart, `tsunagu run` scraped) is `bash deploy/check.sh`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "tools"))
sys.path.insert(0, str(REPO / "deploy" / "observability"))

import check_observability  # noqa: E402
import generate_dashboards  # noqa: E402
from promql import (  # noqa: E402
    SYNTHETIC,
    PromQLError,
    exposed_names,
    grafana_to_promql,
    metric_names,
    variable_query_expr,
)

# --- the PromQL reader -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (job) (rate(tsunagu_bus_published_total{topic="a", job=~"x|y"}[5m]))',
            {"tsunagu_bus_published_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (namespace, job, operation, le) "
            "(rate(tsunagu_broker_operation_seconds_bucket[5m]))) > 0.05",
            {"tsunagu_broker_operation_seconds_bucket"},
        ),
        ('sum by (job) (up{job="g"}) == 0 or absent(up{job="g"})', {"up"}),
        ("a / on (job) group_left (pod) b", {"a", "b"}),
        ("a * on (job) group_left b", {"a", "b"}),
        ("sum without (instance, pod) (a) > bool 1e3", {"a"}),
        ("sum (a) by (job) unless b offset 15m", {"a", "b"}),
        ("x unless x offset -5m", {"x"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
        ('{__name__="a", job="x"} + count_values("v", b)', {"a", "b"}),
        ("max_over_time(a[1h:5m]) @ start()", {"a"}),
        ("topk(3, a) and b > Inf or c < NaN", {"a", "b", "c"}),
        ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
        ("vector(0)", set()),
        ('count(up{job=~"$job", namespace=~"$namespace"} == 0) or vector(0)', {"up"}),
        ("recorded:rate5m{job='a'} # a comment naming nothing_here\n + 1", {"recorded:rate5m"}),
        ("sum by (code) (rate(a{code!=\"3008\", msg='}{)(,'}[5m]))", {"a"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr",
    [
        "rate(a[5m]",
        "rate(a[5m]))",
        'a{job="x"',
        'a{job="x}',
        "a[5m",
        '{__name__=~"tsunagu_.*"}',
        "sum($job)",
    ],
)
def test_metric_names_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(PromQLError):
        metric_names(expr)


def test_grafana_variables() -> None:
    expr = 'rate(a{ns=~"$namespace"}[$__rate_interval]) + rate(b[${__interval}])'
    assert grafana_to_promql(expr) == 'rate(a{ns=~"$namespace"}[5m]) + rate(b[5m])'
    assert metric_names(grafana_to_promql(expr)) == {"a", "b"}
    assert variable_query_expr('label_values(up{job=~"t-.+", ns=~"$ns"}, job)') == 'up{job=~"t-.+", ns=~"$ns"}'
    assert variable_query_expr("label_values(namespace)") is None
    assert variable_query_expr("label_names()") is None
    assert variable_query_expr("query_result(sum(a))") == "sum(a)"
    assert variable_query_expr("sum(a)") == "sum(a)"


EXPOSITION = """\
# HELP tsunagu_bus_published_total Events published to the bus
# TYPE tsunagu_bus_published_total counter
# HELP tsunagu_broker_operation_seconds Latency of broker operations
# TYPE tsunagu_broker_operation_seconds histogram
# HELP tsunagu_gateway_connections Open client connections on this node
# TYPE tsunagu_gateway_connections gauge
tsunagu_gateway_connections 0.0
# TYPE old_style counter
old_style_total{code="1"} 3.0
"""


def test_exposed_names_include_declared_families_without_samples() -> None:
    names = exposed_names(EXPOSITION)
    assert {
        "tsunagu_bus_published_total",
        "tsunagu_broker_operation_seconds_bucket",
        "tsunagu_broker_operation_seconds_sum",
        "tsunagu_broker_operation_seconds_count",
        "tsunagu_gateway_connections",
        "old_style_total",
    } <= names
    assert "tsunagu_bus_published" not in names
    assert "tsunagu_gateway_connections_total" not in names


# --- the dashboards --------------------------------------------------------------------------


def test_generated_dashboards_are_current() -> None:
    files = generate_dashboards.render()
    assert files, "no dashboards"
    on_disk = {p.name for p in generate_dashboards.OUTPUT.glob("*.json")}
    assert on_disk == set(files), "run python deploy/observability/generate_dashboards.py"
    for name, text in files.items():
        current = (generate_dashboards.OUTPUT / name).read_text()
        assert current == text, f"{name} is not current: run python deploy/observability/generate_dashboards.py"


def test_generator_check_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate_dashboards.main(["--output", str(tmp_path)]) == 0
    assert generate_dashboards.main(["--check", "--output", str(tmp_path)]) == 0
    name = next(iter(generate_dashboards.render()))
    (tmp_path / name).write_text("{}\n")
    (tmp_path / "hand-made.json").write_text("{}\n")
    assert generate_dashboards.main(["--check", "--output", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{name} is not current" in out
    assert "hand-made.json is not generated" in out


def test_dashboards_pass_the_structure_check() -> None:
    report = check_observability.Report()
    for name, dashboard in check_observability.load_dashboards().items():
        check_observability.check_dashboard(name, dashboard, report)
    assert report.problems == []


def test_structure_check_catches_duplicate_ids_overlaps_and_unknown_variables() -> None:
    dashboard = json.loads(json.dumps(next(iter(check_observability.load_dashboards().values()))))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    panels[1]["id"] = panels[0]["id"]
    panels[2]["gridPos"] = dict(panels[3]["gridPos"])
    panels[4]["targets"][0]["expr"] = 'sum(a{pod=~"$pod"})'
    panels[5]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    report = check_observability.Report()
    check_observability.check_dashboard("x.json", dashboard, report)
    text = "\n".join(report.problems)
    assert "already used" in text
    assert "overlaps" in text
    assert "$pod is not a variable" in text
    assert "not the ${datasource} variable" in text


# --- the rules and their tests ---------------------------------------------------------------


def test_every_alert_is_complete_and_tested_firing_and_quiet() -> None:
    report = check_observability.Report()
    check_observability.check_rules(check_observability.load_rules(), check_observability.load_rule_tests(), report)
    assert report.problems == []


def test_rules_check_catches_untested_and_incomplete_alerts() -> None:
    rules = [
        {"alert": "A", "expr": "up == 0", "for": "1m", "labels": {"severity": "warning"}, "annotations": {}},
        {"alert": "B", "expr": "up == 0"},
    ]
    tests = {"t.yaml": {"tests": [{"name": "t", "alert_rule_test": [{"alertname": "A", "exp_alerts": [{}]}]}]}}
    report = check_observability.Report()
    check_observability.check_rules(rules, tests, report)
    text = "\n".join(report.problems)
    assert "alert A: no promtool test where it stays quiet" in text
    assert "alert A: no summary annotation" in text
    assert "alert B: no `for`" in text
    assert "alert B: no severity label" in text
    assert "alert B: no promtool test where it fires" in text


def test_observability_paths_lead_to_the_chart() -> None:
    report = check_observability.Report()
    check_observability.check_links(report)
    assert report.problems == []


# --- metric names against what is exported ---------------------------------------------------


def test_unknown_metric_names_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    used = check_observability.used_metrics([])
    assert "tsunagu_gateway_connections" in used
    assert not [name for name in used if name.startswith("<unreadable")]
    exported = sorted(set(used) - SYNTHETIC)
    complete = "".join(f"# TYPE {name} gauge\n" for name in exported)
    (tmp_path / "complete.txt").write_text(complete)
    assert check_observability.run_metrics([], [tmp_path / "complete.txt"], tmp_path / "log") == 0
    missing = "tsunagu_gateway_connections"
    (tmp_path / "partial.txt").write_text(complete.replace(f"# TYPE {missing} gauge\n", ""))
    capsys.readouterr()
    assert check_observability.run_metrics([], [tmp_path / "partial.txt"], tmp_path / "log") == 1
    assert f"FAIL {missing} is not exported by any service" in capsys.readouterr().out


def test_dashboards_and_rules_read_only_what_the_services_export() -> None:
    """The same comparison as deploy/check.sh, against the metrics the service packages register when
    imported (check.sh reads them over HTTP from `tsunagu run`)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    services = pytest.importorskip("tsunagu.services")
    for entry in services.SERVICES.values():
        assert entry.factory  # imports the service's application, which registers its metrics
    exported = exposed_names(prometheus_client.generate_latest(prometheus_client.REGISTRY).decode())
    used = check_observability.used_metrics([])
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported | SYNTHETIC}
    assert unknown == {}


def test_service_ports_come_from_the_configuration_docs() -> None:
    ports = check_observability.service_ports()
    assert ports["ws-gateway"] == "TSUNAGU_GATEWAY_PORT"
    assert ports["audit-log"] == "TSUNAGU_AUDIT_PORT"
    assert len(ports) == len(set(ports.values())) >= 8
    assert not [v for v in ports.values() if v.startswith("TSUNAGU_STACK_")]
