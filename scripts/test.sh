#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root or on a developer's machine.
#
# Installs what the tests need (Debian packages, the cached kube-apiserver build), then runs
# every Rust test (unit, contract, e2e on a real kube-apiserver, PostgreSQL and SMTP server,
# each started by the tests themselves on loopback) and the Helm chart tests (the upgrade
# from the previous chart and the docs-drift checks among them); then builds the release
# (image, plugin archive, chart package) and runs the image with runc and the plugin with
# kubectl. Each step's time is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  etcd-server openssl curl            # the control plane (scripts/control-plane.sh)
  postgresql                          # the SQL source's tests (testkit::postgres)
  python3-aiosmtpd                    # the email tests (testkit::smtp)
  python3-venv                        # Helm via PyPI for the chart tests
  prometheus                          # promtool: the chart's PrometheusRule (check + unit tests)
  umoci runc ca-certificates          # the image: built with umoci, run with runc
  python3-yaml                        # the plugin test reads the krew manifest
)
missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# kubectl for the kubectl-plugin test; Debian's matches the 1.20 test server. A kubectl
# already on the PATH (another distribution's) is used as it is.
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# kube-apiserver v1.20.2 from Debian's source package, cached outside the clone.
bash scripts/control-plane.sh install

# Build output is cached outside the clone too, so a fresh clone does not rebuild the world.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"

# The fast gate first, before minutes of tests: formatting (rustfmt.toml), then every
# lint as an error, on every target (tests, benches and the sandbox crates too).
if command -v rustup >/dev/null; then
  rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed | grep -q '^clippy' || rustup component add clippy
fi
timed() { # timed NAME COMMAND...: runs it and prints its time
  local name=$1 started=$SECONDS; shift
  "$@"
  printf 'test.sh: %s took %d s\n' "$name" $((SECONDS - started)) >&2
}

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# Every crate in Cargo.lock under an allowed license; the shipped list up to date.
timed "license check" bash scripts/licenses.sh

# Two cores: build once (clippy has checked, not built), then run the tests.
timed "rust build" cargo build --workspace --all-targets --locked
timed "rust tests" cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"

# The README's main-job command, as a newcomer runs it: it fails unless every example
# cohort ends up in the Braze sandbox.
timed "demo" bash scripts/demo.sh --local

timed "chart tests" bash scripts/test-chart.sh

# The release, built once (one release build of the binary for the image and the plugin),
# then the image run with runc against a real API server and the plugin run by kubectl.
DIST="$CARGO_TARGET_DIR/dist"
timed "release build" bash scripts/release.sh --out "$DIST"
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
timed "image test" bash scripts/test-image.sh "$DIST/cohort-operator-$VERSION.oci.tar"
timed "plugin test" bash scripts/test-plugin.sh "$DIST"
