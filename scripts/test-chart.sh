#!/usr/bin/env bash
# The Helm chart's tests (tests/chart/): render and lint with Helm v4's own library (PyPI
# helm-python-sdk, no helm binary), check values.schema.json, then apply the chart to a real
# kube-apiserver and check, as the operator's ServiceAccount, what RBAC lets it do; and run
# docs/gitops.md's Argo CD and Flux health checks against real objects.
#
#   scripts/test-chart.sh [pytest args...]
#
# The Python packages live in a venv outside the clone (~/.cache/cohort-operator/chart-venv),
# rebuilt when tests/chart/requirements.txt changes. The control plane is started on free
# loopback ports and stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v kubectl >/dev/null || [ -n "${KUBECTL:-}" ] || bash scripts/control-plane.sh packages kubernetes-client
VENV=$(bash scripts/chart-venv.sh)

# kube-apiserver v1.20.2, built once from Debian's source package and cached.
bash scripts/control-plane.sh install

# test_operator_as_serviceaccount.py runs the real binaries from "$CARGO_TARGET_DIR/debug"
# (the same default as scripts/test.sh, where this is a no-op after its build).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"
cargo build -q -p cohort-operator -p braze-sandbox --bins

CLUSTER_DIR="$(mktemp -d "${TMPDIR:-/tmp}/cohort-chart-cluster.XXXXXX")"
cleanup() {
  bash scripts/control-plane.sh stop "$CLUSTER_DIR" || true
  rm -rf "$CLUSTER_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Test files or ids given (tests/chart/test_x.py[::name]): only those; otherwise all.
where=(tests/chart)
for arg in "$@"; do [ -e "${arg%%::*}" ] && where=(); done
COHORT_CHART_CLUSTER_DIR="$CLUSTER_DIR" PYTHONDONTWRITEBYTECODE=1 \
  "$VENV/bin/python" -m pytest -p no:cacheprovider -q "${where[@]}" "$@"
