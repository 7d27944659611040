#!/usr/bin/env bash
# A real Kubernetes control plane (etcd + kube-apiserver v1.20.2) for tests and the demo.
#
#   scripts/control-plane.sh install        Debian packages + the cached kube-apiserver build
#   scripts/control-plane.sh start DIR      start etcd + kube-apiserver on free loopback ports;
#                                           writes DIR/kubeconfig and DIR/pids
#   scripts/control-plane.sh stop DIR       stop what `start DIR` started
#   scripts/control-plane.sh packages PKG…  apt-get install those of PKG… not installed yet
#                                           (other test scripts use it too)
#
# kube-apiserver is built from Debian's source package (there is no prebuilt binary to fetch
# here) and cached outside the clone, keyed by version, so only the first run pays ~5 min.
set -euo pipefail

K8S_VERSION=1.20.2
DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
CACHE_DIR="${COHORT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator}"
APISERVER="$CACHE_DIR/kube-apiserver-v$K8S_VERSION"

log() { printf 'control-plane: %s\n' "$*" >&2; }

need_packages() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

build_apiserver() {
  [ -x "$APISERVER" ] && return 0
  need_packages golang-1.19-go make rsync dpkg-dev golang-github-modern-go-reflect2-dev
  if ! grep -rqs 'deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/ \
     && ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/; then
    log "adding a deb-src entry for bookworm main"
    cat > /etc/apt/sources.list.d/cohort-operator-src.sources <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
  fi
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/kube-build.XXXXXX")
  log "building kube-apiserver v$K8S_VERSION from Debian's source package in $work (first run only, ~5 min)"
  ( cd "$work" && apt-get source -qq --download-only "kubernetes=$DEB_VERSION" >/dev/null )
  local orig; orig=$(ls "$work"/kubernetes_*.orig.tar.* | head -n1)
  mkdir -p "$work/src" && tar -xf "$orig" -C "$work/src" --strip-components=1
  # The vendored reflect2 v1.0.1 crashes the server under Go >= 1.18 as soon as a CRD is
  # created; Debian's 1.0.2 does not.
  rm -rf "$work/src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$work/src/vendor/github.com/modern-go/reflect2"
  rm -f "$work/src/vendor/github.com/modern-go/reflect2/go.mod"
  # Only the OpenAPI definitions are generated (pkg/generated/openapi is not in the tarball).
  # `make WHAT=cmd/kube-apiserver` would also rebuild and rerun deepcopy-, defaulter-,
  # conversion- and prerelease-lifecycle-gen over the whole tree (about 50 s on 2 cores):
  # their output is in the tarball already and they rewrite it identically but for an added
  # `//go:build` line equivalent to its `// +build` one, so the server's machine code is the
  # same (its .text is byte-identical; line numbers in those files' traces shift by one).
  # GOGC=400: the Go compiler collects garbage less often; the same binary for 15% less CPU
  # (397 → 339 CPU s), its largest process 1.32 → 1.41 GB.
  ( cd "$work/src" && export PATH="/usr/lib/go-1.19/bin:$PATH" GOFLAGS=-mod=vendor GO111MODULE=off \
      KUBE_GIT_VERSION="v$K8S_VERSION" GOGC=400 \
      && make gen_openapi && hack/make-rules/build.sh cmd/kube-apiserver ) >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
  mkdir -p "$CACHE_DIR"
  cp "$work/src/_output/bin/kube-apiserver" "$APISERVER.tmp" && mv "$APISERVER.tmp" "$APISERVER"
  rm -rf "$work"
  log "cached $APISERVER"
}

install() {
  need_packages etcd-server openssl curl
  build_apiserver
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() {
  local dir="$1"; mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  [ -x "$APISERVER" ] || install
  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  mkdir -p "$dir/etcd" "$dir/certs"
  local token; token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s,admin,admin,"system:masters"\n' "$token" > "$dir/tokens.csv"
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
       --advertise-client-urls "http://127.0.0.1:$etcd_port" \
       --listen-peer-urls "http://127.0.0.1:$peer_port" >"$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"
  "$APISERVER" --etcd-servers="http://127.0.0.1:$etcd_port" --cert-dir="$dir/certs" \
    --secure-port="$api_port" --bind-address=127.0.0.1 \
    --service-cluster-ip-range=10.0.0.0/24 --authorization-mode=RBAC \
    --token-auth-file="$dir/tokens.csv" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
    --disable-admission-plugins=ServiceAccount --insecure-port=0 >"$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"
  cat > "$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: { server: "https://127.0.0.1:$api_port", insecure-skip-tls-verify: true }
users:
- name: admin
  user: { token: "$token" }
contexts:
- name: local
  context: { cluster: local, user: admin, namespace: default }
current-context: local
KC
  for _ in $(seq 1 300); do
    if curl -ksf -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      log "ready at https://127.0.0.1:$api_port (kubeconfig: $dir/kubeconfig)"
      return 0
    fi
    kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || { tail -n 30 "$dir/apiserver.log" >&2; stop "$dir"; exit 1; }
    sleep 0.1
  done
  log "kube-apiserver did not become ready"; tail -n 30 "$dir/apiserver.log" >&2; stop "$dir"; exit 1
}

stop() {
  local dir="$1"
  for f in apiserver etcd; do
    if [ -f "$dir/$f.pid" ]; then
      local pid; pid=$(cat "$dir/$f.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$f.pid"
    fi
  done
}

case "${1:-}" in
  install) install ;;
  start) start "${2:?usage: start DIR}" ;;
  stop) stop "${2:?usage: stop DIR}" ;;
  path) echo "$APISERVER" ;;
  packages) shift; need_packages "$@" ;;
  *) echo "usage: $0 install | start DIR | stop DIR | path | packages PKG..." >&2; exit 2 ;;
esac
