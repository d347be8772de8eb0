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
