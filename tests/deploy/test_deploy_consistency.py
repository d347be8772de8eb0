"""The deployment checks themselves: the Dockerfile/.dockerignore reader and the consistency
checks that deploy/check.sh runs (deploy/tools/). Needs no helm and no Docker; the full check,
with helm, schemas and the image replay, is `bash deploy/check.sh`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "tools"))

import check_consistency  # noqa: E402
from dockerfile import DockerIgnore, parse  # noqa: E402

SERVICES = {
    "ws-gateway": 8080,
    "auth": 8081,
    "presence": 8082,
    "collab": 8083,
    "stream-ingest": 8084,
    "mqtt-bridge": 8085,
    "sim-engine": 8086,
    "audit-log": 8087,
}


def problems(repo: Path, rendered: list[Path] | None = None) -> list[str]:
    report = check_consistency.Report()
    ports = check_consistency.check_dockerfile(repo, report)
    check_consistency.check_chart_values(repo, ports, report)
    check_consistency.check_skaffold(repo, ports, report)
    if rendered:
        check_consistency.check_rendered(rendered, ports, report)
    return report.problems


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of what the checks read: manifests, sources, Dockerfile, chart, skaffold.yaml."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "README.md", "skaffold.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=ignore)
    shutil.copytree(REPO / "libs", tmp_path / "libs", ignore=ignore)
    shutil.copytree(REPO / "services", tmp_path / "services", ignore=ignore)
    shutil.copytree(REPO / "deploy" / "helm", tmp_path / "deploy" / "helm")
    return tmp_path


def test_dockerignore_whitelist_semantics() -> None:
    ignore = DockerIgnore("*\n!src/\n!services/*/src/\n!services/*/pyproject.toml\n**/__pycache__\n")
    assert not ignore.excluded("src/tsunagu/cli.py")
    assert not ignore.excluded("services/auth/src/tsunagu_auth/app.py")
    assert not ignore.excluded("services/auth/pyproject.toml")
    assert ignore.excluded("services/auth/tests/test_auth_app.py")
    assert ignore.excluded("docs/deploy.md")
    assert ignore.excluded("src/tsunagu/__pycache__/cli.cpython-311.pyc")
    assert ignore.excluded("__pycache__/x.pyc")


def test_dockerfile_has_one_target_per_service() -> None:
    dockerfile = parse(REPO / "Dockerfile")
    targets = {stage.name for stage in dockerfile.targets("runtime")}
    assert targets == set(SERVICES)
    assert dockerfile.stage_names()[:4] == ["uv", "base", "deps", "build"]


def test_repository_is_consistent() -> None:
    assert problems(REPO) == []


def test_ports_agree_everywhere() -> None:
    report = check_consistency.Report()
    assert check_consistency.check_dockerfile(REPO, report) == SERVICES
    values = yaml.safe_load((REPO / "deploy/helm/tsunagu/values.yaml").read_text())
    assert {name: svc["port"] for name, svc in values["services"].items()} == SERVICES


def test_a_port_that_differs_in_the_chart_is_caught(repo: Path) -> None:
    values = repo / "deploy/helm/tsunagu/values.yaml"
    values.write_text(values.read_text().replace("port: 8083", "port: 9083"))
    assert any("services.collab.port is 9083" in p for p in problems(repo))


def test_a_workspace_member_missing_from_the_dependency_layer_is_caught(repo: Path) -> None:
    dockerfile = repo / "Dockerfile"
    line = "COPY services/presence/pyproject.toml services/presence/\n"
    dockerfile.write_text(dockerfile.read_text().replace(line, ""))
    assert any("services/presence/pyproject.toml (workspace member)" in p for p in problems(repo))


def test_a_new_service_without_a_target_is_caught(repo: Path) -> None:
    new = repo / "services" / "replay"
    (new / "src" / "tsunagu_replay").mkdir(parents=True)
    (new / "pyproject.toml").write_text('[project]\nname = "tsunagu-replay"\nversion = "0.1.0"\n')
    found = problems(repo)
    assert any("differ from services/" in p for p in found)
    assert any("services/replay/pyproject.toml (workspace member)" in p for p in found)


def test_sources_excluded_by_dockerignore_are_caught(repo: Path) -> None:
    (repo / ".dockerignore").write_text((repo / ".dockerignore").read_text() + "src/\n")
    assert any("COPY src/: every file is excluded by .dockerignore" in p for p in problems(repo))


def test_a_missing_readme_copy_is_caught(repo: Path) -> None:
    dockerfile = repo / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("COPY README.md ./\n", ""))
    assert any("README.md (readme of .) is not copied" in p for p in problems(repo))


def test_a_wrong_command_in_a_target_is_caught(repo: Path) -> None:
    dockerfile = repo / "Dockerfile"
    text = dockerfile.read_text().replace('ENTRYPOINT ["tsunagu", "serve", "auth"]', 'ENTRYPOINT ["tsunagu", "run"]')
    dockerfile.write_text(text)
    assert any(p.startswith("Dockerfile target auth: runs") for p in problems(repo))


def test_a_skaffold_artifact_for_an_unknown_target_is_caught(repo: Path) -> None:
    skaffold = repo / "skaffold.yaml"
    skaffold.write_text(skaffold.read_text().replace("target: sim-engine", "target: sim"))
    found = problems(repo)
    assert any("builds target 'sim', not a service" in p for p in found)


def _deployment(name: str, port: int, command: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"tsunagu-{name}",
            "labels": {"app.kubernetes.io/part-of": "tsunagu", "app.kubernetes.io/component": name},
        },
        "spec": {
            "template": {
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": name,
                            "command": command[:3],
                            "args": command[3:],
                            "ports": [{"containerPort": port}],
                            "livenessProbe": {"httpGet": {"path": "/healthz"}},
                            "readinessProbe": {"httpGet": {"path": "/readyz"}},
                            "securityContext": {
                                "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                }
            }
        },
    }


def _service(name: str, port: int) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"tsunagu-{name}",
            "labels": {"app.kubernetes.io/part-of": "tsunagu", "app.kubernetes.io/component": name},
        },
        "spec": {"ports": [{"port": port}]},
    }


def test_rendered_deployments_must_run_their_service(tmp_path: Path) -> None:
    docs: list[dict[str, object]] = []
    for name, port in SERVICES.items():
        command = ["tsunagu", "serve", name, "--port", str(port), "--host", "0.0.0.0"]
        if name == "presence":
            command = ["tsunagu", "serve", "auth", "--port", str(port), "--host", "0.0.0.0"]
        docs += [_deployment(name, port, command), _service(name, port)]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    found = problems(REPO, [rendered])
    assert len(found) == 1
    assert found[0].startswith("rendered.yaml: Deployment of presence: runs ['tsunagu', 'serve', 'auth'")


def test_variables_the_code_does_not_read_are_caught(tmp_path: Path) -> None:
    docs: list[dict[str, object]] = []
    for name, port in SERVICES.items():
        docs += [
            _deployment(name, port, ["tsunagu", "serve", name, "--port", str(port), "--host", "0.0.0.0"]),
            _service(name, port),
        ]
    docs.append({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"TSUNAGU_BUS": "kafka", "TSUNAGU_BUSS": "x"}})
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    report = check_consistency.Report()
    check_consistency.check_rendered([rendered], SERVICES, report, documented={"TSUNAGU_BUS"})
    assert report.problems == [
        "rendered.yaml: ConfigMap/x sets TSUNAGU_BUSS, which no settings class reads (docs/configuration.md)"
    ]


def test_only_stream_ingest_s_mllp_port_may_follow_the_http_port(tmp_path: Path) -> None:
    docs: list[dict[str, object]] = []
    for name, port in SERVICES.items():
        deployment = _deployment(name, port, ["tsunagu", "serve", name, "--port", str(port), "--host", "0.0.0.0"])
        service = _service(name, port)
        extra = {"name": "mllp" if name == "stream-ingest" else "debug", "containerPort": 2575}
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"].append(extra)  # type: ignore[index]
        if name == "stream-ingest":
            service["spec"]["ports"].append({"name": "mllp", "port": 2575})  # type: ignore[index]
        docs += [deployment, service]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    found = [p for p in problems(REPO, [rendered]) if "containerPort" in p or "listens on" in p]
    assert len(found) == len(SERVICES) - 1 and not any("stream-ingest" in p for p in found), found


def _platform(metrics_port: int = 9464) -> list[dict[str, object]]:
    """A rendered chart in miniature: per service a Deployment, a Service, a ConfigMap and a NetworkPolicy
    as the chart makes them (the API port for the gateway's pods, the metrics port for a namespace)."""
    docs: list[dict[str, object]] = []
    gateway = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "ws-gateway"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    for name, port in SERVICES.items():
        deployment = _deployment(name, port, ["tsunagu", "serve", name, "--port", str(port), "--host", "0.0.0.0"])
        service = _service(name, port)
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"].append(  # type: ignore[index]
            {"name": "metrics", "containerPort": metrics_port}
        )
        service["spec"]["ports"].append({"name": "metrics", "port": metrics_port})  # type: ignore[index]
        labels = {"app.kubernetes.io/part-of": "tsunagu", "app.kubernetes.io/component": name}
        config = {"kind": "ConfigMap", "metadata": {"name": f"tsunagu-{name}", "labels": labels}}
        config["data"] = {"TSUNAGU_METRICS_PORT": str(metrics_port)}
        api_rule: dict[str, object] = {"ports": [{"protocol": "TCP", "port": port}]}
        if name != "ws-gateway":
            api_rule["from"] = [gateway]
        policy = {
            "kind": "NetworkPolicy",
            "metadata": {"name": f"tsunagu-{name}", "labels": labels},
            "spec": {
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [api_rule, {"ports": [{"protocol": "TCP", "port": metrics_port}], "from": [monitoring]}],
            },
        }
        docs += [deployment, service, config, policy]
    return docs


def _rendered_problems(tmp_path: Path, docs: list[dict[str, object]]) -> list[str]:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    return problems(REPO, [rendered])


def _of(docs: list[dict[str, object]], kind: str, name: str) -> dict[str, object]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == f"tsunagu-{name}")  # type: ignore[index]


def test_the_chart_as_it_renders_network_policies_and_metrics_passes(tmp_path: Path) -> None:
    assert _rendered_problems(tmp_path, _platform()) == []


def test_an_internal_api_open_to_any_source_is_caught(tmp_path: Path) -> None:
    docs = _platform()
    del _of(docs, "NetworkPolicy", "audit-log")["spec"]["ingress"][0]["from"]  # type: ignore[index]
    found = _rendered_problems(tmp_path, docs)
    assert found == [
        "rendered.yaml: NetworkPolicy tsunagu-audit-log ingress rule 0 opens audit-log's API port 8087 to any source"
    ]


def test_metrics_opened_together_with_the_api_are_caught(tmp_path: Path) -> None:
    """The finding: the rule letting Prometheus scrape opened the whole API port to the monitoring namespace."""
    docs = _platform()
    rules = _of(docs, "NetworkPolicy", "collab")["spec"]["ingress"]  # type: ignore[index]
    rules[1]["ports"].append({"protocol": "TCP", "port": 8083})
    found = _rendered_problems(tmp_path, docs)
    assert found == [
        "rendered.yaml: NetworkPolicy tsunagu-collab ingress rule 1 opens the metrics port together with [8083, 9464]"
    ]


def test_metrics_on_the_api_port_opened_to_a_namespace_are_caught(tmp_path: Path) -> None:
    docs = _platform()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            doc["data"] = {}
    policy = _of(docs, "NetworkPolicy", "sim-engine")["spec"]  # type: ignore[index]
    policy["ingress"][1]["ports"] = [{"protocol": "TCP", "port": 8086}]
    found = [p for p in _rendered_problems(tmp_path, docs) if "NetworkPolicy" in p]
    assert found == [
        "rendered.yaml: NetworkPolicy tsunagu-sim-engine ingress rule 1: /metrics is on the API port, so opening it"
        " to a namespace opens sim-engine's API"
    ]


def test_a_service_without_a_network_policy_or_a_metrics_port_is_caught(tmp_path: Path) -> None:
    docs = [
        d for d in _platform() if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "tsunagu-presence")
    ]  # type: ignore[index]
    ports = _of(docs, "Deployment", "mqtt-bridge")["spec"]["template"]["spec"]["containers"][0]["ports"]  # type: ignore[index]
    ports.pop()
    found = _rendered_problems(tmp_path, docs)
    assert "rendered.yaml: no NetworkPolicy for presence" in found
    assert any(p.startswith("rendered.yaml: mqtt-bridge serves /metrics on 9464") for p in found), found


def test_network_policies_off_by_default_are_caught(repo: Path) -> None:
    values = repo / "deploy/helm/tsunagu/values.yaml"
    text = values.read_text()
    values.write_text(text.replace("networkPolicy:\n  enabled: true", "networkPolicy:\n  enabled: false"))
    assert any("networkPolicy.enabled is not true" in p for p in problems(repo))
