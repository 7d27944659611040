#!/usr/bin/env bash
# Checks scripts/plugin.sh's release of `kubectl cohort` as a user installing it by hand
# would: the archive matches its .sha256 and the krew manifest, unpacks to kubectl-cohort,
# and kubectl finds the plugin on PATH and runs `kubectl cohort version`.
#
#   scripts/test-plugin.sh DIR     DIR: scripts/plugin.sh's output directory
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath "${1:?usage: $0 DIR}")
fail() { printf 'test-plugin: FAILED: %s\n' "$*" >&2; exit 1; }
bash scripts/control-plane.sh packages python3-yaml
command -v kubectl >/dev/null || bash scripts/control-plane.sh packages kubernetes-client

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
ARCHIVE="kubectl-cohort_v${VERSION}_linux_amd64.tar.gz"
[ -f "$DIR/$ARCHIVE" ] || fail "$DIR/$ARCHIVE not found"
(cd "$DIR" && sha256sum --quiet -c "$ARCHIVE.sha256") || fail "the archive does not match its .sha256"
/usr/bin/python3 - "$DIR/cohort.yaml" "$DIR/$ARCHIVE" "$VERSION" <<'PY' || fail "the krew manifest does not describe the archive"
import hashlib, sys, yaml
manifest, archive, version = sys.argv[1:]
plugin = yaml.safe_load(open(manifest))
assert plugin["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2", plugin["apiVersion"]
assert (plugin["kind"], plugin["metadata"]["name"]) == ("Plugin", "cohort"), plugin["metadata"]
assert plugin["spec"]["version"] == f"v{version}", plugin["spec"]["version"]
[platform] = plugin["spec"]["platforms"]
assert platform["selector"]["matchLabels"] == {"os": "linux", "arch": "amd64"}, platform["selector"]
assert platform["uri"].endswith("/" + archive.rsplit("/", 1)[1]), platform["uri"]
assert platform["sha256"] == hashlib.sha256(open(archive, "rb").read()).hexdigest(), platform["sha256"]
assert platform["bin"] == "kubectl-cohort"
PY

BIN=$(mktemp -d "${TMPDIR:-/tmp}/cohort-plugin-test.XXXXXX")
trap 'rm -rf "$BIN"' EXIT
tar -xzf "$DIR/$ARCHIVE" -C "$BIN"
[ "$(ls "$BIN" | sort | tr '\n' ' ')" = "LICENSE kubectl-cohort third-party-licenses.md " ] \
  || fail "unexpected archive contents: $(ls "$BIN")"
PATH="$BIN:$PATH" kubectl plugin list 2>/dev/null | grep -qx "$BIN/kubectl-cohort" \
  || fail "kubectl plugin list does not find kubectl-cohort"
got=$(PATH="$BIN:$PATH" kubectl cohort version)
[ "$got" = "cohort-operator $VERSION (API cohorts.dev/v1alpha1)" ] || fail "kubectl cohort version printed: $got"
PATH="$BIN:$PATH" kubectl cohort --help | grep -q '^Usage: kubectl cohort ' || fail "help does not say kubectl cohort"
# The README tells users which glibc the archive needs: the manifest's figure.
glibc=$(sed -n 's/.*needs glibc \([0-9.]*\) or later.*/\1/p' "$DIR/cohort.yaml")
grep -q "needs glibc $glibc or newer" README.md || fail "README.md does not say the plugin needs glibc $glibc"
echo "test-plugin: passed: $ARCHIVE installs as kubectl cohort $VERSION"
