#!/usr/bin/env bash
# Runs the operator's container image (scripts/image.sh's OCI archive) with runc against a
# real kube-apiserver and the Braze sandbox: the operator in the image must start as its
# non-root user on a read-only root filesystem, become ready (/readyz) and land the README's
# first import (examples/inline-once.yaml) in the sandbox. Every process and container it
# starts is stopped on exit, by pid or container id.
#
#   scripts/test-image.sh ARCHIVE     ARCHIVE: scripts/image.sh's output
#
# The container shares the host's network namespace (the API server and the sandbox listen
# on loopback only); runc keeps its state in a directory of this run, so `runc list` there
# shows only this test's container. crun refuses this machine's cgroup layout; runc works.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=$(realpath "${1:?usage: $0 ARCHIVE}")

# fd 3: the real stderr, also from inside wait_for's silenced probes.
exec 3>&2
log() { printf 'test-image: %s\n' "$*" >&3; }
fail() { log "FAILED: $*"; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out after $1 s waiting for $what"
    sleep 0.2
  done
}

bash scripts/control-plane.sh packages umoci runc curl
command -v kubectl >/dev/null || bash scripts/control-plane.sh packages kubernetes-client
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"
# The same package set as scripts/test-chart.sh and the demo, so nothing is rebuilt.
cargo build --locked -q -p cohort-operator -p braze-sandbox --bins
SANDBOX_BIN="$CARGO_TARGET_DIR/debug/braze-sandbox"

STATE=$(mktemp -d "${TMPDIR:-/tmp}/cohort-image-test.XXXXXX")
chmod 755 "$STATE"
CONTAINER="cohort-image-test-$$"
RUNC=(runc --root "$STATE/runc")
SANDBOX_PID=""
CLUSTER_STARTED=false
cleanup() {
  set +e
  if [ -d "$STATE/runc/$CONTAINER" ]; then
    "${RUNC[@]}" kill "$CONTAINER" KILL 2>/dev/null
    "${RUNC[@]}" delete --force "$CONTAINER"
  fi
  [ -n "$SANDBOX_PID" ] && kill "$SANDBOX_PID" 2>/dev/null && wait "$SANDBOX_PID" 2>/dev/null
  $CLUSTER_STARTED && bash scripts/control-plane.sh stop "$STATE/cluster"
  rm -rf "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the image, as a runtime bundle -------------------------------------------------------
mkdir -p "$STATE/layout"
tar -xf "$ARCHIVE" -C "$STATE/layout"
TAG=$(umoci ls --layout "$STATE/layout" | head -n1)
umoci unpack --image "$STATE/layout:$TAG" "$STATE/bundle" >/dev/null
ROOTFS="$STATE/bundle/rootfs"
[ ! -e "$ROOTFS/bin/sh" ] && [ ! -e "$ROOTFS/usr/bin/sh" ] || fail "the image has a shell"
grep -qx 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' "$ROOTFS/etc/passwd" \
  || fail "no nonroot user in /etc/passwd"

# --- a cluster, the Braze sandbox, the README's first import --------------------------------
bash scripts/control-plane.sh start "$STATE/cluster" >/dev/null 2>&1
CLUSTER_STARTED=true
export KUBECONFIG="$STATE/cluster/kubeconfig"
chmod 644 "$KUBECONFIG"
PORT=$(free_port)
BRAZE="http://127.0.0.1:$PORT"
"$SANDBOX_BIN" --listen "127.0.0.1:$PORT" --partner kubit=image-partner-key \
  --data-import-key image-import-key --users examples/demo/users.csv >"$STATE/sandbox.log" 2>&1 &
SANDBOX_PID=$!
wait_for 30 "the Braze sandbox" curl -sf "$BRAZE/sandbox/stats"

NS=cohort-image-test
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s crd/cohortimports.cohorts.dev >/dev/null
kubectl create namespace "$NS" >/dev/null
for f in examples/braze-data-import-secret.yaml examples/inline-once.yaml; do
  sed -e "s#https://rest\.[a-z0-9.-]*\.braze\.[a-z]*#$BRAZE#" \
      -e "s#data-import-key: change-me#data-import-key: image-import-key#" "$f"
  echo ---
done | kubectl apply -n "$NS" -f - >/dev/null
mkdir -p "$STATE/partner-keys"
printf 'image-partner-key' > "$STATE/partner-keys/us"
chmod -R a+rX "$STATE/partner-keys"

# --- the container: the image's user, entrypoint and root filesystem, read-only --------------
METRICS_PORT=$(free_port)
python3 - "$STATE/bundle/config.json" "$METRICS_PORT" "$BRAZE" "$NS" "$STATE" <<'PY'
import json, sys
path, port, braze, ns, state = sys.argv[1:]
config = json.load(open(path))
process = config["process"]
assert process["user"]["uid"] == 65532 and process["user"]["gid"] == 65532, process["user"]
assert process["args"] == ["/usr/local/bin/cohort-operator", "run"], process["args"]
process["terminal"] = False
# The chart's arguments that matter here (charts/cohort-operator/templates/deployment.yaml).
process["args"] += [
    f"--metrics-addr=127.0.0.1:{port}", "--log-format=json", f"--watch-namespaces={ns}",
    "--partner-keys-dir=/etc/cohort-operator/partner-keys",
    f"--braze-endpoint-region={braze}=us", "--leader-election", f"--lease-namespace={ns}",
]
process["env"] += ["KUBECONFIG=/etc/cohort-operator/kubeconfig", "POD_NAME=image-test",
                   "RUST_LOG=info"]
config["root"]["readonly"] = True
# Share the host's network namespace: the API server and the sandbox are on loopback.
config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
config["mounts"] += [
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "nodev", "mode=1777", "size=64m"]},
    {"destination": "/etc/cohort-operator/kubeconfig", "type": "bind",
     "source": f"{state}/cluster/kubeconfig", "options": ["rbind", "ro"]},
    {"destination": "/etc/cohort-operator/partner-keys", "type": "bind",
     "source": f"{state}/partner-keys", "options": ["rbind", "ro"]},
]
json.dump(config, open(path, "w"), indent=2)
PY

started=$SECONDS
"${RUNC[@]}" run --detach --bundle "$STATE/bundle" --pid-file "$STATE/container.pid" "$CONTAINER" \
  >"$STATE/operator.log" 2>&1 </dev/null
PID=$(cat "$STATE/container.pid")
ready() { # the operator answers /readyz; a container that stopped fails the test at once
  if [ "$("${RUNC[@]}" state "$CONTAINER" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" != running ]; then
    tail -n 30 "$STATE/operator.log" >&3
    fail "the container stopped before it was ready"
  fi
  curl -sf "http://127.0.0.1:$METRICS_PORT/readyz"
}
wait_for 60 "/readyz of the operator in the container" ready
log "ready $((SECONDS - started)) s after runc run"
[ "$(awk '/^Uid:/ {print $2}' "/proc/$PID/status")" = 65532 ] || fail "the container does not run as 65532"

succeeded() {
  [ "$(kubectl get cohortimport beta-testers -n "$NS" -o jsonpath='{.status.history[0].result}')" = Succeeded ]
}
if ! (wait_for 120 "the import beta-testers to succeed" succeeded); then
  kubectl get cohortimport beta-testers -n "$NS" -o yaml >&2 || true
  tail -n 30 "$STATE/operator.log" >&2
  fail "the import did not succeed"
fi
members=$(curl -sf "$BRAZE/sandbox/cohorts/beta-testers-2026/members?partner=kubit")
python3 - "$members" <<'PY' || fail "the sandbox's cohort beta-testers-2026 is not the example's 4 members: $members"
import json, sys
members = json.loads(sys.argv[1])
assert len(members) == 4, members
PY
"${RUNC[@]}" kill "$CONTAINER" TERM
stopped() {
  [ "$("${RUNC[@]}" state "$CONTAINER" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" = stopped ]
}
wait_for 30 "the container to stop on SIGTERM" stopped
grep -q '"level":"ERROR"' "$STATE/operator.log" && { grep '"level":"ERROR"' "$STATE/operator.log" >&2; fail "errors in the log"; }
log "passed: the image's operator became ready and landed beta-testers-2026 (4 members) in $((SECONDS - started)) s"
