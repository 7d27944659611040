#!/usr/bin/env bash
# The operator's container image, built without a container engine or any registry pull:
# Debian's umoci writes an OCI image layout from a root filesystem assembled here, and the
# layout is archived as an OCI archive (`oci-archive:` to skopeo, podman, containerd's
# `ctr image import`, crane, ...).
#
#   scripts/image.sh [--binary PATH] [--out FILE]
#
#   --binary PATH  put this cohort-operator binary in the image instead of building the
#                  release binary (`cargo build --release --locked`)
#   --out FILE     where to write the archive; default
#                  $CARGO_TARGET_DIR/image/cohort-operator-VERSION.oci.tar
#
# The image: the root filesystem scripts/image-rootfs.sh assembles (the release binary,
# exactly the shared libraries it loads, CA certificates, /etc/passwd with `nonroot`, the
# license texts; no shell), USER 65532:65532, ENTRYPOINT the binary, CMD `run`, TMPDIR=/tmp,
# and the OCI annotations source, revision, version, licenses, created, title, description
# (as labels and on the manifest). The Dockerfile builds the same with a container engine.
#
# Prints the archive's path and the image's manifest digest on its last two lines.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$(realpath "$2"); shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out FILE]" >&2; exit 2 ;;
  esac
done

log() { printf 'image: %s\n' "$*" >&2; }

bash scripts/control-plane.sh packages umoci ca-certificates

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# The source's own time, so that the same commit gives the same layer and config.
EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
SOURCE=$(sed -n 's/^sources: \[\(.*\)\]$/\1/p' charts/cohort-operator/Chart.yaml)
LICENSES=$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
OUT="${OUT:-$CARGO_TARGET_DIR/image/cohort-operator-$VERSION.oci.tar}"

if [ -z "$BINARY" ]; then
  log "building the release binary"
  cargo build --release --locked -q -p cohort-operator --bin cohort-operator
  BINARY="$CARGO_TARGET_DIR/release/cohort-operator"
fi
"$BINARY" --version | grep -qx "cohort-operator $VERSION" \
  || { log "$BINARY is not cohort-operator $VERSION"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cohort-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
LAYOUT="$WORK/layout"

# --- the root filesystem (the Dockerfile assembles it with the same script) ---------------
bash scripts/image-rootfs.sh "$BINARY" "$ROOTFS"
libraries=$(ldd "$BINARY" | grep -o '/[^ ]*' | sort -u)
find "$ROOTFS" -exec touch -h -d "@$EPOCH" {} +

# --- the image ---------------------------------------------------------------------------
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:$VERSION"
umoci insert --image "$LAYOUT:$VERSION" --history.created "$CREATED" \
  --history.created_by "scripts/image.sh" "$ROOTFS" /
annotations=(
  "org.opencontainers.image.title=cohort-operator"
  "org.opencontainers.image.description=Keeps analytics cohorts imported into Braze, as a Kubernetes operator"
  "org.opencontainers.image.source=$SOURCE"
  "org.opencontainers.image.revision=$REVISION"
  "org.opencontainers.image.version=$VERSION"
  "org.opencontainers.image.licenses=$LICENSES"
  "org.opencontainers.image.created=$CREATED"
)
config=(--image "$LAYOUT:$VERSION" --created "$CREATED" --history.created "$CREATED"
  --history.created_by "scripts/image.sh" --architecture amd64 --os linux
  --config.user 65532:65532 --config.entrypoint /usr/local/bin/cohort-operator
  --config.cmd run --config.exposedports 8080/tcp --config.workingdir /
  --config.env TMPDIR=/tmp)
for a in "${annotations[@]}"; do config+=(--config.label "$a" --manifest.annotation "$a"); done
umoci config "${config[@]}"
umoci gc --layout "$LAYOUT"

mkdir -p "$(dirname "$OUT")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" -C "$LAYOUT" -cf "$OUT.tmp" .
mv "$OUT.tmp" "$OUT"
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
  "$LAYOUT/index.json")
log "$(du -h "$OUT" | cut -f1) OCI archive, cohort-operator:$VERSION, libraries: $(echo $libraries)"
echo "$OUT"
echo "$digest"
