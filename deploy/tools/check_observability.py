"""Checks of the Grafana dashboards and the alert rules (deploy/observability), run by deploy/check.sh.

    python deploy/tools/check_observability.py static [--rendered FILE ...]
    python deploy/tools/check_observability.py metrics [--exposition FILE ...] [--rendered FILE ...]

static:
  - the dashboards are what deploy/observability/generate_dashboards.py writes;
  - each is valid JSON with a unique uid, unique panel ids, panels inside the 24-column grid and not
    overlapping, every query on the ${datasource} variable with a unique refId, and only $variables
    the dashboard defines (or Grafana's own);
  - every query's PromQL passes `promtool check rules` (as a recording rule);
  - every alert rule has `for`, a severity label and summary/description annotations, and the promtool
    tests (deploy/observability/rules/tests) show each alert firing and quiet, and name no other alert;
  - deploy/observability/{dashboards,rules/tsunagu.rules.yaml} lead to the chart's files;
  - the rendered charts (--rendered, from `helm template`) ship exactly those rules and dashboards.
metrics:
  every metric name the dashboards and the rules (also the rendered charts' additionalRules) read is
  one the services export: `tsunagu run` is started with free ports and memory engines, and every
  service's /metrics is read (or --exposition files are used instead). A family declared with
  `# TYPE` counts even with no samples yet (labelled metrics appear on first use).
Exit status 1 when anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promql import SYNTHETIC, PromQLError, exposed_names, grafana_to_promql, metric_names, variable_query_expr

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
CHART_FILES = REPO / "deploy" / "helm" / "tsunagu" / "files"
DASHBOARDS = CHART_FILES / "dashboards"
RULES = CHART_FILES / "tsunagu.rules.yaml"
RULE_TESTS = OBSERVABILITY / "rules" / "tests"
CONFIG_DOCS = REPO / "docs" / "configuration.md"
GRID_WIDTH = 24
# Variables Grafana defines itself.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
START_TIMEOUT = 60.0

Json = dict[str, Any]


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, message: str) -> None:
        self.problems.append(message)
        print(f"FAIL {message}")

    def ok(self, message: str) -> None:
        print(f"ok   {message}")


# --- reading ---------------------------------------------------------------------------------


def load_dashboards(directory: Path = DASHBOARDS) -> dict[str, Json]:
    return {path.name: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def all_panels(panels: list[Json]) -> Iterator[Json]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries(dashboard: Json) -> Iterator[tuple[str, str]]:
    """(where, PromQL with Grafana's variables still in) of every panel query and variable query."""
    for panel in all_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                yield f"panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        raw = variable.get("query")
        text = raw.get("query", "") if isinstance(raw, dict) else str(raw or "")
        expr = variable_query_expr(text)
        if expr:
            yield f"variable ${variable.get('name')}", expr


def load_rules(path: Path = RULES) -> list[Json]:
    data = yaml.safe_load(path.read_text())
    return [rule for group in data.get("groups", []) for rule in group.get("rules", [])]


def load_rule_tests(directory: Path = RULE_TESTS) -> dict[str, Json]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(directory.glob("*.yaml"))}


def rendered_objects(paths: list[Path]) -> Iterator[tuple[Path, Json]]:
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                yield path, doc


# --- static checks ---------------------------------------------------------------------------


def check_generated(report: Report) -> None:
    before = len(report.problems)
    sys.path.insert(0, str(OBSERVABILITY))
    import generate_dashboards

    expected = generate_dashboards.render()
    present = {p.name for p in DASHBOARDS.glob("*.json")}
    for name, text in expected.items():
        path = DASHBOARDS / name
        if not path.is_file() or path.read_text() != text:
            report.fail(f"{name} is not current: run python deploy/observability/generate_dashboards.py")
    for name in sorted(present - set(expected)):
        report.fail(f"{name} in {DASHBOARDS.relative_to(REPO)} is not generated by generate_dashboards.py")
    if len(report.problems) == before:
        report.ok(f"dashboards are generate_dashboards.py's output ({', '.join(sorted(expected))})")


def check_dashboard(name: str, dashboard: Json, report: Report) -> None:
    before = len(report.problems)
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        report.fail(f"{name}: no datasource variable")
    ids: dict[Any, str] = {}
    cells: dict[tuple[int, int], Any] = {}
    panels = list(all_panels(dashboard.get("panels", [])))
    for panel in panels:
        pid = panel.get("id")
        where = f"{name}: panel {pid} {panel.get('title')!r}"
        if not isinstance(pid, int):
            report.fail(f"{where}: id is not an integer")
        elif pid in ids:
            report.fail(f"{where}: id already used by {ids[pid]!r}")
        else:
            ids[pid] = panel.get("title", "")
        grid = panel.get("gridPos", {})
        try:
            x, y, w, h = (int(grid[k]) for k in ("x", "y", "w", "h"))
        except (KeyError, TypeError, ValueError):
            report.fail(f"{where}: gridPos needs integer x, y, w, h")
            continue
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > GRID_WIDTH:
            report.fail(f"{where}: gridPos {grid} is outside the {GRID_WIDTH}-column grid")
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    report.fail(f"{where}: overlaps panel {cells[(cx, cy)]}")
                    break
                cells[(cx, cy)] = pid
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            report.fail(f"{where}: no queries")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or None in refs:
            report.fail(f"{where}: refIds {refs} are not unique")
        for item in [panel, *targets]:
            if item.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                report.fail(f"{where}: datasource is {item.get('datasource')}, not the ${{datasource}} variable")
    for where, expr in dashboard_queries(dashboard):
        for used in re.findall(r"\$\{?(\w+)", expr):
            if used not in variables and used not in GRAFANA_VARIABLES:
                report.fail(f"{name}: {where}: ${used} is not a variable of the dashboard")
    if len(report.problems) == before:
        report.ok(f"{name}: uid {dashboard.get('uid')!r}, {len(panels)} panels, ids unique, layout and queries sane")


def check_promql_syntax(dashboards: dict[str, Json], report: Report) -> None:
    """promtool check rules on every dashboard query, each as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        report.fail("promtool is not installed (Debian package prometheus)")
        return
    rules = []
    for name, dashboard in dashboards.items():
        for n, (where, expr) in enumerate(dashboard_queries(dashboard)):
            record = re.sub(r"[^a-zA-Z0-9_]", "_", f"dashboard:{Path(name).stem}") + f":query{n}"
            rules.append({"record": record, "expr": grafana_to_promql(expr), "labels": {"where": f"{name} {where}"}})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard-queries.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        report.fail(f"promtool check rules on the dashboard queries:\n{result.stdout}{result.stderr}")
    else:
        report.ok(f"promtool parses all {len(rules)} dashboard queries")


def check_rules(rules: list[Json], tests: dict[str, Json], report: Report) -> None:
    before = len(report.problems)
    alerts = [rule for rule in rules if "alert" in rule]
    names = [rule["alert"] for rule in alerts]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        report.fail(f"alert {duplicate} is defined more than once")
    for rule in alerts:
        where = f"alert {rule['alert']}"
        if "for" not in rule:
            report.fail(f"{where}: no `for`")
        if not rule.get("labels", {}).get("severity"):
            report.fail(f"{where}: no severity label")
        for key in ("summary", "description"):
            if not rule.get("annotations", {}).get(key):
                report.fail(f"{where}: no {key} annotation")
    fires: set[str] = set()
    quiet: set[str] = set()
    for file, test_file in tests.items():
        for test in test_file.get("tests", []):
            for case in test.get("alert_rule_test", []):
                alert = case.get("alertname")
                if alert not in names:
                    report.fail(f"{file}: test {test.get('name')!r} expects {alert}, which no rule defines")
                (fires if case.get("exp_alerts") else quiet).add(alert)
    for alert in names:
        if alert not in fires:
            report.fail(f"alert {alert}: no promtool test where it fires")
        if alert not in quiet:
            report.fail(f"alert {alert}: no promtool test where it stays quiet")
    if len(report.problems) == before:
        report.ok(f"{len(alerts)} alerts with for/severity/summary/description, each tested firing and quiet")


def check_links(report: Report) -> None:
    """deploy/observability's paths lead to the chart's files (symbolic links in git)."""
    links = {
        OBSERVABILITY / "dashboards": DASHBOARDS,
        OBSERVABILITY / "rules" / "tsunagu.rules.yaml": RULES,
    }
    ok = True
    for link, target in links.items():
        if not link.exists() or link.resolve() != target.resolve():
            report.fail(f"{link.relative_to(REPO)} does not lead to {target.relative_to(REPO)} (a symbolic link)")
            ok = False
    if ok:
        report.ok("deploy/observability links to the chart's dashboards and rules")


def check_rendered(paths: list[Path], dashboards: dict[str, Json], report: Report) -> None:
    """The rendered charts ship the rules file as it is and one ConfigMap per dashboard."""
    before = len(report.problems)
    source_groups = yaml.safe_load(RULES.read_text())["groups"]
    dashboard_texts = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    rule_objects = config_maps = 0
    for path, obj in rendered_objects(paths):
        kind = obj.get("kind")
        name = f"{path.name}: {kind} {obj.get('metadata', {}).get('name')}"
        if kind == "PrometheusRule":
            rule_objects += 1
            groups = obj.get("spec", {}).get("groups", [])
            shipped = [g for g in groups if g.get("name") != "tsunagu.additional"]
            if shipped != source_groups:
                report.fail(f"{name}: its groups are not those of {RULES.relative_to(REPO)}")
        elif kind == "ConfigMap" and obj.get("metadata", {}).get("labels", {}).get("grafana_dashboard"):
            for key, text in (obj.get("data") or {}).items():
                config_maps += 1
                if key not in dashboard_texts:
                    report.fail(f"{name}: {key} is not a dashboard file")
                elif text.rstrip("\n") != dashboard_texts[key].rstrip("\n"):
                    report.fail(f"{name}: {key} differs from the dashboard file")
    if not paths:
        return
    if not rule_objects:
        report.fail("no rendered chart has a PrometheusRule (monitoring.enabled in the production values?)")
    if not config_maps:
        report.fail("no rendered chart has a dashboard ConfigMap (monitoring.dashboards.enabled?)")
    if rule_objects and config_maps and len(report.problems) == before:
        report.ok(
            f"rendered charts ship the rules ({rule_objects} PrometheusRule) "
            f"and the dashboards ({config_maps} ConfigMap entries) unchanged"
        )


def run_static(rendered: list[Path]) -> int:
    report = Report()
    check_generated(report)
    dashboards = load_dashboards()
    uids = [d.get("uid") for d in dashboards.values()]
    if len(set(uids)) != len(uids):
        report.fail(f"dashboard uids are not unique: {uids}")
    for name, dashboard in dashboards.items():
        check_dashboard(name, dashboard, report)
    check_promql_syntax(dashboards, report)
    check_rules(load_rules(), load_rule_tests(), report)
    check_links(report)
    check_rendered(rendered, dashboards, report)
    return 1 if report.problems else 0


# --- metric names ----------------------------------------------------------------------------


def used_metrics(rendered: list[Path]) -> dict[str, set[str]]:
    """Metric name -> where it is read (dashboard queries, rules, rendered additional rules)."""
    used: dict[str, set[str]] = {}

    def add(where: str, expr: str) -> None:
        try:
            names = metric_names(grafana_to_promql(expr))
        except PromQLError as exc:
            names = {f"<unreadable: {exc}>"}
        for name in names:
            used.setdefault(name, set()).add(where)

    for file, dashboard in load_dashboards().items():
        for where, expr in dashboard_queries(dashboard):
            add(f"{file} {where}", expr)
    for rule in load_rules():
        add(f"rule {rule.get('alert') or rule.get('record')}", str(rule.get("expr", "")))
    for path, obj in rendered_objects(rendered):
        if obj.get("kind") != "PrometheusRule":
            continue
        for group in obj.get("spec", {}).get("groups", []):
            if group.get("name") == "tsunagu.additional":
                for rule in group.get("rules", []):
                    add(f"{path.name} additional rule {rule.get('alert') or rule.get('record')}", str(rule["expr"]))
    return used


def service_ports() -> dict[str, str]:
    """Service -> its port variable, from docs/configuration.md (generated from the settings classes)."""
    ports: dict[str, str] = {}
    section = ""
    for line in CONFIG_DOCS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        match = re.match(r"\|\s*`(TSUNAGU_\w+_PORT)`\s*\|.*\|\s*TCP port to listen on\.\s*\|\s*$", line)
        if match:
            ports[section] = match.group(1)
    return ports


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.read().decode("utf-8", "replace") if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def scrape_services(log_path: Path) -> dict[str, str]:
    """Start `tsunagu run` (every service, memory engines, free ports); service -> its /metrics text."""
    ports = {service: _free_port() for service in service_ports()}
    if not ports:
        raise RuntimeError(f"no service port variables found in {CONFIG_DOCS}")
    env = {**os.environ, "TSUNAGU_BUS": "memory", "TSUNAGU_BROKER": "memory", "TSUNAGU_LOG_LEVEL": "warning"}
    env.update({variable: str(ports[service]) for service, variable in service_ports().items()})
    uv = shutil.which("uv") or "uv"
    command = [uv, "run", "--frozen", "--quiet", "tsunagu", "run"]
    print(f"starting `{' '.join(command[1:])}`: " + ", ".join(f"{s} :{p}" for s, p in ports.items()))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    pages: dict[str, str] = {}
    started = time.monotonic()
    try:
        while time.monotonic() - started < START_TIMEOUT and process.poll() is None and len(pages) < len(ports):
            for service, port in ports.items():
                if service not in pages and (text := _get(f"http://127.0.0.1:{port}/metrics")) is not None:
                    pages[service] = text
            time.sleep(0.2)
        missing = sorted(set(ports) - set(pages))
        if missing:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise RuntimeError(f"no /metrics from {', '.join(missing)} (exit {process.poll()}); log:\n{tail}")
        print(f"read /metrics of {len(pages)} services in {time.monotonic() - started:.1f}s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return pages


def _family(sample_name: str) -> str:
    return re.sub(r"_(total|bucket|sum|count|created)$", "", sample_name)


def run_metrics(rendered: list[Path], expositions: list[Path], log_path: Path) -> int:
    if expositions:
        pages = {path.name: path.read_text() for path in expositions}
    else:
        try:
            pages = scrape_services(log_path)
        except RuntimeError as exc:
            print(f"FAIL {exc}")
            return 1
    exported: set[str] = set()
    for page in pages.values():
        exported |= exposed_names(page)
    used = used_metrics(rendered)
    unknown = sorted(name for name in used if name not in exported and name not in SYNTHETIC)
    for name in unknown:
        print(f"FAIL {name} is not exported by any service; read by:")
        for where in sorted(used[name]):
            print(f"       {where}")
    own = sorted(name for name in used if name.startswith("tsunagu_"))
    print(f"{len(used)} metric names read by the dashboards and rules ({len(own)} tsunagu_*), {len(exported)} exported")
    families = {_family(n) for n in exported if n.startswith("tsunagu_")}
    unread = sorted(families - {_family(n) for n in used})
    if unread:
        print(f"exported but on no dashboard and in no rule: {', '.join(unread)}")
    if unknown:
        return 1
    print("every metric the dashboards and rules read is exported")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["static", "metrics"])
    parser.add_argument("--rendered", nargs="*", type=Path, default=[], help="helm template output files")
    parser.add_argument("--exposition", nargs="*", type=Path, default=[], help="metrics: saved /metrics pages")
    parser.add_argument("--log", type=Path, default=REPO / ".cache" / "deploy-check" / "tsunagu-run.log")
    args = parser.parse_args(argv)
    if args.mode == "static":
        return run_static(args.rendered)
    return run_metrics(args.rendered, args.exposition, args.log)


if __name__ == "__main__":
    sys.exit(main())
