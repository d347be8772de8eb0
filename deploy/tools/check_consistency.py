"""Cross-checks between the repository layout, the Dockerfile, the Helm chart and skaffold.yaml.

    python deploy/tools/check_consistency.py [--rendered FILE ...]

Static checks (always):
  * every path the Dockerfile COPYs from the build context exists and is not excluded by
    .dockerignore; every workspace member's pyproject.toml reaches the dependency layer;
  * one Dockerfile target per service directory (services/<name>/), each running
    `tsunagu serve <name> --port <port> --host 0.0.0.0` as a non-root user, exposing and
    health-checking that port, with the OCI labels;
  * the chart has values and a template file for exactly those services, with the same ports;
  * skaffold.yaml builds each target once and hands each image to the chart.
With --rendered (output of `helm template`): every Deployment of a service runs
`tsunagu serve <name> --port <port> --host 0.0.0.0` with the Dockerfile target's port, probes
/healthz and /readyz, and runs non-root with a read-only root filesystem and /tmp mounted; and
every TSUNAGU_* variable the chart sets is one the code reads (docs/configuration.md, which is
generated from the settings classes). When the chart serves /metrics on a port of its own
(TSUNAGU_METRICS_PORT), the container and the Service name it `metrics` and the ServiceMonitor scrapes
it; every service has a NetworkPolicy in which the API port of an internal service admits named
callers only and the metrics port shares no rule with the API (what is opened to Prometheus is the
metrics and nothing else).

Exit status 1 when anything is wrong; every problem is printed.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dockerfile import Dockerfile, DockerIgnore, copy_sources, parse, parse_env

REPO = Path(__file__).resolve().parents[2]
CHART = Path("deploy") / "helm" / "tsunagu"
RUNTIME_STAGE = "runtime"
# Ports a service's container and Service may have after its API port.
EXTRA_PORTS = ("mllp", "metrics")
# The one service whose API port clients of the outside reach (through the ingress).
PUBLIC_SERVICE = "ws-gateway"
REQUIRED_TARGET_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.vendor",
)


class Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.passed = 0

    def check(self, ok: bool, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.problems.append(message)
        return ok


# --- repository --------------------------------------------------------------------------


def service_dirs(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in (repo / "services").glob("*/pyproject.toml"))


def workspace_members(repo: Path) -> list[str]:
    """Directories (relative) of the uv workspace members, from the root pyproject.toml."""
    data = tomllib.loads((repo / "pyproject.toml").read_text())
    patterns = data.get("tool", {}).get("uv", {}).get("workspace", {}).get("members", [])
    members: set[str] = set()
    for pattern in patterns:
        for match in glob.glob(str(repo / pattern)):
            if (Path(match) / "pyproject.toml").is_file():
                members.add(str(Path(match).relative_to(repo)))
    return sorted(members)


# --- Dockerfile --------------------------------------------------------------------------


def _context_files(repo: Path, ignore: DockerIgnore, source: str) -> list[str]:
    """Files of the build context a COPY source names (after .dockerignore)."""
    path = repo / source
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
    else:
        candidates = [Path(p) for p in glob.glob(str(repo / source), recursive=True) if Path(p).is_file()]
    rel = [str(p.relative_to(repo)) for p in candidates]
    return [r for r in rel if not ignore.excluded(r)]


def check_dockerfile(repo: Path, report: Report) -> dict[str, int]:
    """Static checks of the Dockerfile; returns {target: port} of the service targets."""
    dockerfile = parse(repo / "Dockerfile")
    ignore = DockerIgnore.load(repo / ".dockerignore")
    services = service_dirs(repo)
    report.check(bool(services), "no services/*/pyproject.toml found")

    # COPY sources from the build context exist and survive .dockerignore.
    copied: set[str] = set()
    for stage in dockerfile.stages:
        for instruction in stage.find("COPY") + stage.find("ADD"):
            flags, sources, _dest = copy_sources(instruction)
            if "from" in flags:
                continue
            for source in sources:
                where = f"Dockerfile:{instruction.line} {instruction.keyword} {source}"
                exists = (repo / source).exists() or bool(glob.glob(str(repo / source)))
                if not report.check(exists, f"{where}: not in the repository"):
                    continue
                files = _context_files(repo, ignore, source)
                report.check(bool(files), f"{where}: every file is excluded by .dockerignore")
                copied.update(files)

    # The dependency layer sees every workspace member's pyproject.toml and the lockfile.
    deps_stage = None
    for stage in dockerfile.stages:
        for instruction in stage.find("RUN"):
            if "uv sync" in instruction.args and "--no-install-workspace" in instruction.args:
                deps_stage = (stage, instruction)
    if report.check(deps_stage is not None, "Dockerfile: no `uv sync --no-install-workspace` dependency layer"):
        assert deps_stage is not None
        stage, run = deps_stage
        before: set[str] = set()
        for s in dockerfile.chain(stage.name) if stage.name else [stage]:
            for instruction in s.find("COPY"):
                if instruction.line > run.line:
                    continue
                flags, sources, _ = copy_sources(instruction)
                if "from" not in flags:
                    for source in sources:
                        before.update(_context_files(repo, ignore, source))
        report.check("uv.lock" in before, "Dockerfile: uv.lock is not copied before the dependency layer")
        report.check(
            "--frozen" in run.args or "--locked" in run.args,
            f"Dockerfile:{run.line}: the dependency layer must sync with --frozen or --locked",
        )
        for member in [".", *workspace_members(repo)]:
            manifest = str(Path(member) / "pyproject.toml") if member != "." else "pyproject.toml"
            report.check(
                manifest in before,
                f"Dockerfile: {manifest} (workspace member) is not copied before the dependency layer "
                f"(line {run.line}); add `COPY {manifest} {Path(manifest).parent}/`",
            )

    # Files hatchling needs to build each member (readme) are in the build context.
    for member in [".", *workspace_members(repo)]:
        data = tomllib.loads((repo / member / "pyproject.toml").read_text())
        readme = data.get("project", {}).get("readme")
        if isinstance(readme, str):
            path = str(Path(member) / readme) if member != "." else readme
            report.check(path in copied, f"Dockerfile: {path} (readme of {member}) is not copied; the build needs it")

    # Service targets.
    targets = {s.name: s for s in dockerfile.targets(RUNTIME_STAGE) if s.name}
    report.check(
        sorted(targets) == services,
        f"Dockerfile targets FROM {RUNTIME_STAGE} {sorted(targets)} differ from services/ {services}",
    )
    ports: dict[str, int] = {}
    for name in targets:
        ports_found = _check_target(dockerfile, name, report)
        if ports_found is not None:
            ports[name] = ports_found
    return ports


def _check_target(dockerfile: Dockerfile, name: str, report: Report) -> int | None:
    chain = dockerfile.chain(name)
    stage = chain[-1]
    where = f"Dockerfile target {name}"

    def last(keyword: str) -> Any:
        for s in reversed(chain):
            found = s.find(keyword)
            if found:
                return found[-1]
        return None

    entrypoint = last("ENTRYPOINT")
    cmd = last("CMD")
    argv = (entrypoint.exec_form() if entrypoint else []) + (cmd.exec_form() if cmd else [])
    port: int | None = None
    if report.check(
        len(argv) == 7
        and argv[:3] == ["tsunagu", "serve", name]
        and argv[3] == "--port"
        and argv[5:] == ["--host", "0.0.0.0"],
        f"{where}: runs {argv}, expected ['tsunagu', 'serve', '{name}', '--port', <port>, '--host', '0.0.0.0']",
    ):
        report.check(argv[4].isdigit(), f"{where}: port {argv[4]!r} is not a number")
        port = int(argv[4]) if argv[4].isdigit() else None

    expose = [w for i in stage.find("EXPOSE") for w in i.args.split()]
    report.check(
        port is not None and [str(port)] == [e.split("/")[0] for e in expose],
        f"{where}: EXPOSE {expose}, expected {port}",
    )

    health = last("HEALTHCHECK")
    report.check(
        health is not None and f"127.0.0.1:{port}/healthz" in health.args and "urllib" in health.args,
        f"{where}: HEALTHCHECK must fetch http://127.0.0.1:{port}/healthz with urllib",
    )

    user = last("USER")
    uid = user.args.split(":")[0] if user else "0"
    report.check(uid.isdigit() and int(uid) != 0, f"{where}: USER must be a numeric non-root uid, is {uid!r}")

    variables = dict(dockerfile.global_args)
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    for s in chain:
        for instruction in s.instructions:
            if instruction.keyword == "ARG":
                key, _, default = instruction.args.partition("=")
                if default:
                    variables[key.strip()] = default.strip().strip('"')
            elif instruction.keyword == "ENV":
                env.update(parse_env(instruction.args, {**variables, **env}))
            elif instruction.keyword == "LABEL":
                labels.update(parse_env(instruction.args, {**variables, **env}))
    report.check(env.get("PYTHONDONTWRITEBYTECODE") == "1", f"{where}: PYTHONDONTWRITEBYTECODE=1 is not set")
    for label in REQUIRED_TARGET_LABELS:
        report.check(label in labels, f"{where}: label {label} is missing")
    report.check(
        labels.get("org.opencontainers.image.title", "").endswith(name),
        f"{where}: org.opencontainers.image.title should name the service",
    )
    runtime_chain = chain[[s.name for s in chain].index(RUNTIME_STAGE) :]
    context_copies = [
        i.line for s in runtime_chain for i in s.find("COPY") + s.find("ADD") if "from" not in copy_sources(i)[0]
    ]
    report.check(
        not context_copies,
        f"{where}: lines {context_copies} copy from the build context; runtime stages take only the built environment",
    )
    return port


# --- chart -------------------------------------------------------------------------------


def check_chart_values(repo: Path, ports: dict[str, int], report: Report) -> None:
    chart = repo / CHART
    values = yaml.safe_load((chart / "values.yaml").read_text())
    services = values.get("services", {})
    report.check(
        sorted(services) == sorted(ports),
        f"chart values services {sorted(services)} differ from the Dockerfile targets {sorted(ports)}",
    )
    report.check(
        (values.get("networkPolicy") or {}).get("enabled") is True,
        "chart values networkPolicy.enabled is not true: the chart must install its NetworkPolicies by default",
    )
    report.check(
        int((values.get("config") or {}).get("metricsPort") or 0) > 0,
        "chart values config.metricsPort is 0: /metrics would share the API port, which NetworkPolicy cannot split",
    )
    for name, port in ports.items():
        svc = services.get(name) or {}
        report.check(
            svc.get("port") == port, f"chart values services.{name}.port is {svc.get('port')}, Dockerfile says {port}"
        )
        template = chart / "templates" / f"{name}.yaml"
        if report.check(template.is_file(), f"chart has no template file templates/{name}.yaml"):
            text = template.read_text()
            report.check(
                f'"name" "{name}"' in text or f'$name := "{name}"' in text,
                f"templates/{name}.yaml does not render the component {name}",
            )


def _components(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind by component label; the dev-* components (devInfra) are not services."""
    found = {}
    for doc in docs:
        labels = doc.get("metadata", {}).get("labels", {})
        component = labels.get("app.kubernetes.io/component", "")
        if (
            doc.get("kind") == kind
            and labels.get("app.kubernetes.io/part-of") == "tsunagu"
            and not component.startswith("dev-")
        ):
            found[component] = doc
    return found


def documented_variables(repo: Path) -> set[str] | None:
    """TSUNAGU_* variables of docs/configuration.md (generated from the code), None if absent."""
    path = repo / "docs" / "configuration.md"
    if not path.is_file():
        return None
    return set(re.findall(r"`(TSUNAGU_[A-Z0-9_]+)`", path.read_text()))


def _variables_set(docs: list[dict[str, Any]]) -> dict[str, str]:
    """TSUNAGU_* variable -> where the rendered chart sets it (ConfigMaps and container env)."""
    found: dict[str, str] = {}
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "ConfigMap":
            for key in doc.get("data") or {}:
                if key.startswith("TSUNAGU_"):
                    found.setdefault(key, name)
        if doc.get("kind") == "Deployment":
            for container in doc["spec"]["template"]["spec"].get("containers", []):
                for env in container.get("env") or []:
                    if env["name"].startswith("TSUNAGU_"):
                        found.setdefault(env["name"], name)
    return found


def check_rendered(
    paths: list[Path], ports: dict[str, int], report: Report, documented: set[str] | None = None
) -> None:
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        deployments = _components(docs, "Deployment")
        services = _components(docs, "Service")
        for name, port in ports.items():
            where = f"{path.name}: Deployment of {name}"
            deployment = deployments.get(name)
            if not report.check(deployment is not None, f"{where} is missing"):
                continue
            assert deployment is not None
            pod = deployment["spec"]["template"]["spec"]
            containers = [c for c in pod["containers"] if c["name"] == name]
            if not report.check(len(containers) == 1, f"{where}: no container named {name}"):
                continue
            c = containers[0]
            argv = list(c.get("command", [])) + list(c.get("args", []))
            report.check(
                argv[:7] == ["tsunagu", "serve", name, "--port", str(port), "--host", "0.0.0.0"],
                f"{where}: runs {argv}, expected tsunagu serve {name} --port {port} --host 0.0.0.0 ...",
            )
            # the service's HTTP port first; then its metrics port, and stream-ingest's HL7 MLLP port
            container_ports = [(p.get("name"), p.get("containerPort")) for p in c.get("ports", [])]
            report.check(
                [p for _, p in container_ports[:1]] == [port] and all(n in EXTRA_PORTS for n, _ in container_ports[1:]),
                f"{where}: containerPort {c.get('ports')} is not {port}",
            )
            report.check(
                c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
                f"{where}: liveness probe is not /healthz",
            )
            report.check(
                c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz",
                f"{where}: readiness probe is not /readyz",
            )
            sc = c.get("securityContext", {})
            psc = pod.get("securityContext", {})
            report.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem is not true")
            report.check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false")
            report.check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities are not drop [ALL]")
            report.check(
                (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot is not true"
            )
            report.check(
                (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                f"{where}: seccompProfile is not RuntimeDefault",
            )
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            tmp = volumes.get(mounts.get("/tmp", ""), {})
            report.check("emptyDir" in tmp, f"{where}: /tmp is not an emptyDir")
            svc = services.get(name)
            if report.check(svc is not None, f"{path.name}: Service of {name} is missing"):
                assert svc is not None
                service_ports = [(p.get("name"), p["port"]) for p in svc["spec"]["ports"]]
                report.check(
                    [p for _, p in service_ports[:1]] == [port] and all(n in EXTRA_PORTS for n, _ in service_ports[1:]),
                    f"{path.name}: Service of {name} listens on {svc['spec']['ports']}, expected {port}",
                )
            check_metrics_port(path.name, name, docs, c, svc, report)
        check_network_policies(path.name, ports, docs, report)
        extra = sorted(set(deployments) - set(ports))
        report.check(not extra, f"{path.name}: Deployments of unknown services {extra}")
        if documented is not None:
            for variable, where in sorted(_variables_set(docs).items()):
                report.check(
                    variable in documented,
                    f"{path.name}: {where} sets {variable}, which no settings class reads (docs/configuration.md)",
                )


def _config_of(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    config = _components(docs, "ConfigMap").get(name) or {}
    return {str(k): str(v) for k, v in (config.get("data") or {}).items()}


def check_metrics_port(
    where: str, name: str, docs: list[dict[str, Any]], container: dict[str, Any], svc: Any, report: Report
) -> None:
    """A metrics port of its own is named `metrics` on the container and the Service, and scraped."""
    metrics = _config_of(docs, name).get("TSUNAGU_METRICS_PORT", "0")
    if metrics in ("", "0"):
        return
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    report.check(
        named.get("metrics") == int(metrics),
        f"{where}: {name} serves /metrics on {metrics} (TSUNAGU_METRICS_PORT) but its container port `metrics` is"
        f" {named.get('metrics')}",
    )
    if svc is not None:
        served = {p.get("name"): p.get("port") for p in svc["spec"]["ports"]}
        report.check(served.get("metrics") == int(metrics), f"{where}: the Service of {name} has no `metrics` port")
    monitor = _components(docs, "ServiceMonitor").get(name)
    if monitor is not None:
        scraped = [e.get("port") for e in monitor["spec"].get("endpoints", [])]
        report.check(scraped == ["metrics"], f"{where}: the ServiceMonitor of {name} scrapes {scraped}, not `metrics`")


def _rule_ports(rule: dict[str, Any]) -> set[int]:
    return {int(p["port"]) for p in rule.get("ports") or [] if isinstance(p.get("port"), int)}


def check_network_policies(where: str, ports: dict[str, int], docs: list[dict[str, Any]], report: Report) -> None:
    """With NetworkPolicies rendered: one per service; an internal API admits named callers only; the
    metrics port is opened by a rule of its own."""
    policies = _components(docs, "NetworkPolicy")
    if not policies:
        return
    for name, port in ports.items():
        policy = policies.get(name)
        if not report.check(policy is not None, f"{where}: no NetworkPolicy for {name}"):
            continue
        assert policy is not None
        spec = policy["spec"]
        report.check(
            set(spec.get("policyTypes", [])) == {"Ingress", "Egress"},
            f"{where}: the NetworkPolicy of {name} does not restrict both ingress and egress",
        )
        metrics = int(_config_of(docs, name).get("TSUNAGU_METRICS_PORT", "0") or 0)
        for n, rule in enumerate(spec.get("ingress") or []):
            opened = _rule_ports(rule)
            label = f"{where}: NetworkPolicy {policy['metadata']['name']} ingress rule {n}"
            report.check(bool(rule.get("ports")), f"{label} opens every port")
            if port in opened and name != PUBLIC_SERVICE:
                report.check(bool(rule.get("from")), f"{label} opens {name}'s API port {port} to any source")
            if metrics and metrics in opened:
                report.check(opened == {metrics}, f"{label} opens the metrics port together with {sorted(opened)}")
            if not metrics:
                report.check(
                    port not in opened or name == PUBLIC_SERVICE or "namespaceSelector" not in str(rule.get("from")),
                    f"{label}: /metrics is on the API port, so opening it to a namespace opens {name}'s API",
                )


# --- skaffold ----------------------------------------------------------------------------


def sanitize(image: str) -> str:
    return re.sub(r"[/\-.:]", "_", image)


def check_skaffold(repo: Path, ports: dict[str, int], report: Report) -> None:
    path = repo / "skaffold.yaml"
    if not report.check(path.is_file(), "skaffold.yaml is missing"):
        return
    config = yaml.safe_load(path.read_text())
    report.check(
        str(config.get("apiVersion", "")).startswith("skaffold/v4"), "skaffold.yaml: apiVersion is not skaffold/v4*"
    )
    artifacts = config.get("build", {}).get("artifacts", [])
    by_target: dict[str, dict[str, Any]] = {}
    for artifact in artifacts:
        docker = artifact.get("docker", {})
        target = docker.get("target")
        report.check(
            target in ports, f"skaffold.yaml: artifact {artifact.get('image')} builds target {target!r}, not a service"
        )
        report.check(
            docker.get("dockerfile", "Dockerfile") == "Dockerfile",
            f"skaffold.yaml: {artifact.get('image')} uses another Dockerfile",
        )
        report.check(
            artifact.get("context", ".") in (".", "./"),
            f"skaffold.yaml: {artifact.get('image')} builds from another context",
        )
        report.check(target not in by_target, f"skaffold.yaml: target {target} is built twice")
        by_target[target] = artifact
    report.check(
        sorted(by_target) == sorted(ports), f"skaffold.yaml builds {sorted(by_target)}, services are {sorted(ports)}"
    )

    releases = config.get("deploy", {}).get("helm", {}).get("releases", [])
    if not report.check(len(releases) == 1, "skaffold.yaml: expected one Helm release"):
        return
    release = releases[0]
    report.check(
        (repo / release.get("chartPath", "")).resolve() == (repo / CHART).resolve(),
        f"skaffold.yaml: chartPath is not {CHART}",
    )
    for values_file in release.get("valuesFiles", []):
        report.check((repo / values_file).is_file(), f"skaffold.yaml: values file {values_file} does not exist")
    templates = release.get("setValueTemplates", {})
    for target, artifact in by_target.items():
        key = sanitize(artifact["image"])
        report.check(
            templates.get(f"services.{target}.image.repository") == f"{{{{.IMAGE_REPO_{key}}}}}",
            f"skaffold.yaml: setValueTemplates services.{target}.image.repository must be {{{{.IMAGE_REPO_{key}}}}}",
        )
        report.check(
            str(templates.get(f"services.{target}.image.tag", "")).startswith(f"{{{{.IMAGE_TAG_{key}}}}}"),
            f"skaffold.yaml: setValueTemplates services.{target}.image.tag must start with {{{{.IMAGE_TAG_{key}}}}}",
        )
    profiles = {p.get("name") for p in config.get("profiles", [])}
    for profile in ("kind", "minikube"):
        report.check(profile in profiles, f"skaffold.yaml: profile {profile} is missing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rendered", nargs="*", default=[], type=Path, help="helm template output files")
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args(argv)

    report = Report()
    ports = check_dockerfile(args.repo, report)
    check_chart_values(args.repo, ports, report)
    check_skaffold(args.repo, ports, report)
    if args.rendered:
        documented = documented_variables(args.repo)
        if documented is None:
            print("consistency: docs/configuration.md not found; TSUNAGU_* variable names not checked")
        check_rendered(args.rendered, ports, report, documented)

    for problem in report.problems:
        print(f"FAIL {problem}")
    listed = ", ".join(f"{name}:{port}" for name, port in sorted(ports.items(), key=lambda item: item[1]))
    counts = f"{report.passed} checks passed, {len(report.problems)} failed"
    print(f"consistency: {len(ports)} services ({listed}); {counts}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
