#!/usr/bin/env bash
# `kubectl cohort` as a release: the plugin archive for linux-amd64, its sha256, and the
# krew manifest (krew/cohort.yaml.in) pointing to it.
#
#   scripts/plugin.sh [--binary PATH] [--out DIR] [--base-url URL]
#
#   --binary PATH   this cohort-operator binary instead of building the release binary
#   --out DIR       where to write; default $CARGO_TARGET_DIR/dist
#   --base-url URL  where the archive will be published (the manifest's uri is
#                   URL/ARCHIVE); default https://cohorts.dev/releases/v$VERSION
#
# Writes kubectl-cohort_vVERSION_linux_amd64.tar.gz (kubectl-cohort, LICENSE,
# third-party-licenses.md), its .sha256 (sha256sum's format) and cohort.yaml (the krew
# manifest). Install from them: `kubectl krew install --manifest=cohort.yaml
# --archive=kubectl-cohort_…tar.gz`, or unpack the archive into a directory on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY=""
OUT=""
BASE_URL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$(realpath "$2"); shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --base-url) BASE_URL="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR] [--base-url URL]" >&2; exit 2 ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
HOMEPAGE=$(sed -n 's/^home: \(.*\)$/\1/p' charts/cohort-operator/Chart.yaml)
BASE_URL="${BASE_URL:-$HOMEPAGE/releases/v$VERSION}"
OUT="${OUT:-$CARGO_TARGET_DIR/dist}"
EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

if [ -z "$BINARY" ]; then
  cargo build --release --locked -q -p cohort-operator --bin cohort-operator
  BINARY="$CARGO_TARGET_DIR/release/cohort-operator"
fi
"$BINARY" --version | grep -qx "cohort-operator $VERSION" \
  || { echo "plugin: $BINARY is not cohort-operator $VERSION" >&2; exit 1; }
# The newest glibc symbol version the binary needs: the oldest glibc it runs on.
GLIBC=$(objdump -T "$BINARY" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)

ARCHIVE="kubectl-cohort_v${VERSION}_linux_amd64.tar.gz"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/cohort-plugin.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
install -m 0755 "$BINARY" "$STAGE/kubectl-cohort"
install -m 0644 LICENSE docs/third-party-licenses.md "$STAGE/"
mkdir -p "$OUT"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" -C "$STAGE" -cf - \
    kubectl-cohort LICENSE third-party-licenses.md | gzip -n > "$OUT/$ARCHIVE.tmp"
mv "$OUT/$ARCHIVE.tmp" "$OUT/$ARCHIVE"
SHA=$(cd "$OUT" && sha256sum "$ARCHIVE" | tee "$ARCHIVE.sha256" | cut -d' ' -f1)
sed -e '/^#/d' -e "s#@VERSION@#$VERSION#g" -e "s#@URI@#$BASE_URL/$ARCHIVE#g" -e "s#@SHA256@#$SHA#g" \
    -e "s#@HOMEPAGE@#$HOMEPAGE#g" -e "s#@GLIBC@#$GLIBC#g" krew/cohort.yaml.in > "$OUT/cohort.yaml"
grep -q '@[A-Z0-9]\+@' "$OUT/cohort.yaml" && { echo "plugin: unfilled placeholder in cohort.yaml" >&2; exit 1; }
echo "$OUT/$ARCHIVE"
echo "$OUT/cohort.yaml"
