#!/usr/bin/env bash
# Everything a release ships, from one release build of the operator binary:
#
#   scripts/release.sh [--out DIR]      DIR: default $CARGO_TARGET_DIR/dist
#
#   cohort-operator-VERSION.oci.tar                 the container image (scripts/image.sh)
#   kubectl-cohort_vVERSION_linux_amd64.tar.gz      the kubectl plugin, its .sha256 and the
#   cohort.yaml                                     krew manifest (scripts/plugin.sh)
#   cohort-operator-VERSION.tgz                     the Helm chart, `helm lint --strict`-clean,
#                                                   packaged by Helm's own library
#
# Prints how long each step took. scripts/test.sh runs it, then tests the image and the
# plugin (scripts/test-image.sh, scripts/test-plugin.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"
OUT="${OUT:-$CARGO_TARGET_DIR/dist}"
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
mkdir -p "$OUT"

timed() { # timed NAME COMMAND...: runs it and prints its time
  local name=$1 started=$SECONDS; shift
  "$@"
  printf 'release: %s took %d s\n' "$name" $((SECONDS - started)) >&2
}

timed "the release binary" cargo build --release --locked -q -p cohort-operator --bin cohort-operator
BINARY="$CARGO_TARGET_DIR/release/cohort-operator"
timed "the image" bash scripts/image.sh --binary "$BINARY" --out "$OUT/cohort-operator-$VERSION.oci.tar" >/dev/null
timed "the plugin archive" bash scripts/plugin.sh --binary "$BINARY" --out "$OUT" >/dev/null
package_chart() {
  local venv; venv=$(bash scripts/chart-venv.sh)
  "$venv/bin/python" - "$OUT" <<'PY'
import sys
import helm_python as helm
report = helm.lint("charts/cohort-operator", None, strict=True, namespace="cohort-system")
if report["errors"] or [m for m in report["messages"] if m["severity"] > 1]:
    sys.exit(f"helm lint: {report}")
print(helm.package("charts/cohort-operator", destination=sys.argv[1]))
PY
}
timed "the chart package" package_chart >/dev/null
ls -l "$OUT"
