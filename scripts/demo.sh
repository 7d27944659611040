#!/usr/bin/env bash
# The operator's main job, end to end, on this machine.
#
# With no cluster configured (no KUBECONFIG, no ~/.kube/config) it starts a local control
# plane (etcd + kube-apiserver); with one, it uses that cluster. Either way it starts a
# Braze sandbox seeded with the demo users, a throw-away PostgreSQL warehouse, the Snowflake,
# Databricks and BigQuery stand-ins over it, and an HTTP export server for the examples'
# sources, installs the CRD, applies examples/ (pointed at those local stand-ins), runs the
# operator, runs every import and shows the resulting status and the sandbox's cohort
# membership.
#
#   scripts/demo.sh            run, show, clean up
#   scripts/demo.sh --keep     leave everything running (Ctrl-C stops it)
#   scripts/demo.sh --local    start a local control plane even if a cluster is configured
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=false
LOCAL=false
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=true ;;
    --local) LOCAL=true ;;
    *) echo "usage: $0 [--keep] [--local]" >&2; exit 2 ;;
  esac
done

NAMESPACE=cohort-demo
PARTNER=kubit
PARTNER_KEY=demo-partner-key
IMPORT_KEY=demo-data-import-key
REST_API_KEY=demo-rest-api-key
STATE=$(mktemp -d "${TMPDIR:-/tmp}/cohort-demo.XXXXXX")
chmod 755 "$STATE"
PIDS=()
STARTED_CLUSTER=false
PG_BIN=""
APISERVER_BUILD=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "demo: timed out waiting for $what" >&2; return 1; }
    sleep 0.2
  done
}

cleanup() {
  set +e
  [ -n "$APISERVER_BUILD" ] && kill -- "-$APISERVER_BUILD" 2>/dev/null
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  [ -n "$PG_BIN" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -m immediate stop >/dev/null 2>&1
  $STARTED_CLUSTER && bash scripts/control-plane.sh stop "$STATE/cluster"
  rm -rf "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- what the demo needs ------------------------------------------------------------------
need=()
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v openssl >/dev/null || need+=(openssl)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  say "Installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PG_BIN=/usr/lib/postgresql/15/bin

USE_LOCAL=false
if $LOCAL || { [ -z "${KUBECONFIG:-}" ] && [ ! -f "$HOME/.kube/config" ]; }; then USE_LOCAL=true; fi

# The first run builds kube-apiserver (scripts/control-plane.sh install) while cargo builds
# the workspace: each leaves a core idle part of the time (rustc on the last, largest crate;
# apt and tar; the Go linker), so on 2 cores together they finish sooner than one after the
# other (README, "Build time"). Its own process group, so cleanup stops every compiler.
if $USE_LOCAL && [ ! -x "$(bash scripts/control-plane.sh path)" ]; then
  say "Building kube-apiserver from Debian's source package, first run only (log: $STATE/apiserver-build.log)"
  setsid bash scripts/control-plane.sh install >"$STATE/apiserver-build.log" 2>&1 &
  APISERVER_BUILD=$!
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort-operator/target}"
say "Building cohort-operator, braze-sandbox and the warehouse stand-ins"
cargo build --locked -q -p cohort-operator -p braze-sandbox -p warehouse-sandbox --bins
if [ -n "$APISERVER_BUILD" ]; then
  say "Waiting for the kube-apiserver build"
  status=0
  wait "$APISERVER_BUILD" || status=$?
  APISERVER_BUILD=""
  if [ $status -ne 0 ]; then
    tail -n 40 "$STATE/apiserver-build.log" >&2
    echo "demo: building kube-apiserver failed (exit status $status)" >&2
    exit 1
  fi
fi
OPERATOR="$CARGO_TARGET_DIR/debug/cohort-operator"
SANDBOX="$CARGO_TARGET_DIR/debug/braze-sandbox"
WAREHOUSES="$CARGO_TARGET_DIR/debug/warehouse-sandbox"
BIGQUERY="$CARGO_TARGET_DIR/debug/bigquery-sandbox"

# --- the cluster ------------------------------------------------------------------------
if $USE_LOCAL; then
  say "No cluster configured: starting a local control plane"
  bash scripts/control-plane.sh start "$STATE/cluster"
  STARTED_CLUSTER=true
  export KUBECONFIG="$STATE/cluster/kubeconfig"
else
  say "Using the configured cluster ($(kubectl config current-context))"
fi

# --- Braze, the warehouse and the HTTP export, on loopback --------------------------------
SANDBOX_PORT=$(free_port)
BRAZE="http://127.0.0.1:$SANDBOX_PORT"
say "Starting the Braze sandbox at $BRAZE with $(($(wc -l < examples/demo/users.csv) - 1)) demo users"
"$SANDBOX" --listen "127.0.0.1:$SANDBOX_PORT" --partner "$PARTNER=$PARTNER_KEY" \
  --data-import-key "$IMPORT_KEY" --rest-api-key "$REST_API_KEY" --users examples/demo/users.csv >"$STATE/sandbox.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the Braze sandbox" curl -sf "$BRAZE/sandbox/stats"

PG_PORT=$(free_port)
say "Starting a throw-away PostgreSQL warehouse on port $PG_PORT"
mkdir -p "$STATE/pg" && chown postgres: "$STATE/pg"
runuser -u postgres -- "$PG_BIN/initdb" -A trust -U postgres -D "$STATE/pg/data" >/dev/null
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/log" -w \
  -o "-p $PG_PORT -k $STATE/pg -c listen_addresses=127.0.0.1" start >/dev/null
psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 'CREATE DATABASE analytics' >/dev/null
psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d analytics -f examples/demo/warehouse.sql >/dev/null

SNOWFLAKE_PORT=$(free_port)
DATABRICKS_PORT=$(free_port)
say "Starting the Snowflake (port $SNOWFLAKE_PORT) and Databricks (port $DATABRICKS_PORT) stand-ins"
# A key pair for Snowflake key-pair authentication; the stand-in knows the public key.
"$WAREHOUSES" keygen --out "$STATE/snowflake" >/dev/null
"$WAREHOUSES" serve --database-url "postgres://postgres@127.0.0.1:$PG_PORT/analytics" \
  --snowflake-listen "127.0.0.1:$SNOWFLAKE_PORT" --snowflake-account MYORG-ANALYTICS \
  --snowflake-user COHORT_READER --snowflake-public-key "$STATE/snowflake/rsa_key.pub" \
  --databricks-listen "127.0.0.1:$DATABRICKS_PORT" --databricks-warehouse-id 8f2a9c0d1e3b4a56 \
  --databricks-client demo-sp=demo-sp-secret >"$STATE/warehouses.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the Snowflake stand-in" bash -c "</dev/tcp/127.0.0.1/$SNOWFLAKE_PORT"
wait_for 30 "the Databricks stand-in" bash -c "</dev/tcp/127.0.0.1/$DATABRICKS_PORT"
BQ_PORT=$(free_port)
BQ="http://127.0.0.1:$BQ_PORT"
say "Starting the BigQuery stand-in at $BQ (its SQL runs on the warehouse)"
"$BIGQUERY" --listen "127.0.0.1:$BQ_PORT" --postgres-url "postgres://postgres@127.0.0.1:$PG_PORT/analytics" \
  --project kubit-analytics --location EU --write-key "$STATE/bigquery-key.json" >"$STATE/bigquery.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the BigQuery stand-in" test -s "$STATE/bigquery-key.json"

EXPORT_PORT=$(free_port)
say "Serving the HTTP export on port $EXPORT_PORT"
/usr/bin/python3 -m http.server "$EXPORT_PORT" --bind 127.0.0.1 --directory examples/demo >"$STATE/export.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the export server" curl -sf "http://127.0.0.1:$EXPORT_PORT/lapsed-subscribers.ndjson"

# --- the operator -------------------------------------------------------------------------
say "Installing the CRD and applying examples/ in namespace $NAMESPACE"
kubectl apply -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s crd/cohortimports.cohorts.dev crd/cohorttriggers.cohorts.dev \
  crd/brazedestinations.cohorts.dev crd/clusterbrazedestinations.cohorts.dev >/dev/null
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The examples name real systems; point them at the local stand-ins.
for f in examples/*.yaml; do
  sed -e "s#https://rest\.[a-z0-9.-]*\.braze\.[a-z]*#$BRAZE#" \
      -e "s#postgres://[^ ]*#postgres://postgres@127.0.0.1:$PG_PORT/analytics?sslmode=disable#" \
      -e "s#https://exports\.example\.com/cohorts/lapsed\.ndjson#http://127.0.0.1:$EXPORT_PORT/lapsed-subscribers.ndjson#" \
      -e "s#https://bigquery\.googleapis\.com#$BQ#" \
      -e "s#data-import-key: change-me#data-import-key: $IMPORT_KEY#" \
      -e "s#api-key: change-me#api-key: $REST_API_KEY#" \
      -e "s#https://myorg-analytics\.snowflakecomputing\.com#http://127.0.0.1:$SNOWFLAKE_PORT#" \
      -e "s#https://dbc-[a-z0-9-]*\.cloud\.databricks\.com#http://127.0.0.1:$DATABRICKS_PORT#" \
      -e "s#clientId: change-me#clientId: demo-sp#" -e "s#clientSecret: change-me#clientSecret: demo-sp-secret#" \
      "$f"
  echo "---"
done > "$STATE/examples.yaml"
kubectl apply -n "$NAMESPACE" -f "$STATE/examples.yaml"
# The Snowflake example's Secret gets the private key the stand-in knows.
kubectl create secret generic snowflake -n "$NAMESPACE" --from-literal=account=myorg-analytics \
  --from-literal=user=COHORT_READER --from-file=privateKey="$STATE/snowflake/rsa_key.p8" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The BigQuery example's key is a placeholder: replace it with the stand-in's service account.
kubectl create secret generic bigquery-reader -n "$NAMESPACE" --from-file=key.json="$STATE/bigquery-key.json" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null

mkdir -p "$STATE/partner-keys" && printf '%s' "$PARTNER_KEY" > "$STATE/partner-keys/us"
METRICS_PORT=$(free_port)
TRIGGER_PORT=$(free_port)
say "Running the operator (logs: $STATE/operator.log, metrics: http://127.0.0.1:$METRICS_PORT/metrics)"
"$OPERATOR" run --log-format text --watch-namespaces "$NAMESPACE" \
  --metrics-addr "127.0.0.1:$METRICS_PORT" --trigger-addr "127.0.0.1:$TRIGGER_PORT" \
  --partner-keys-dir "$STATE/partner-keys" \
  --braze-endpoint-region "$BRAZE=us" --scratch-dir "$STATE" >"$STATE/operator.log" 2>&1 &
PIDS+=($!)
wait_for 60 "the operator" curl -sf "http://127.0.0.1:$METRICS_PORT/readyz"

# `Once` imports run by themselves; the scheduled ones are triggered by hand, as a user would.
say "Running every import"
for name in $(kubectl get cohortimports -n "$NAMESPACE" -o jsonpath='{.items[*].metadata.name}'); do
  "$OPERATOR" trigger "$name" -n "$NAMESPACE" --wait --timeout-seconds 120
done

say "A pipeline says the data is ready: a signed call to the CohortTrigger's webhook runs churn-risk"
kubectl wait --for=condition=Ready --timeout=60s cohorttrigger/warehouse-ready -n "$NAMESPACE" >/dev/null
hook=$(kubectl get cohorttrigger warehouse-ready -n "$NAMESPACE" -o jsonpath='{.status.webhookPath}')
TOKEN=$(kubectl get secret cohort-hook -n "$NAMESPACE" -o jsonpath='{.data.token}' | base64 -d)
runs_of() { kubectl get cohortimport "$1" -n "$NAMESPACE" -o jsonpath='{.status.history[*].id}' | wc -w; }
before=$(runs_of churn-risk)
# As in the README: sign "<timestamp>.<body>" with the token.
body='{"dag":"nightly_cohorts"}'; ts=$(date +%s)
sig=$(printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$TOKEN" -hex | sed 's/^.* //')
curl -sS --fail-with-body -X POST "http://127.0.0.1:$TRIGGER_PORT$hook" \
  -H "X-Cohort-Timestamp: $ts" -H "X-Cohort-Signature: sha256=$sig" -d "$body"
# History holds finished runs only: one more entry is the triggered run, done.
wait_for 120 "the triggered run of churn-risk" bash -c "[ \"\$(kubectl get cohortimport churn-risk -n $NAMESPACE -o jsonpath='{.status.history[*].id}' | wc -w)\" -gt $before ]"
"$OPERATOR" history churn-risk -n "$NAMESPACE" | head -4
kubectl get cohorttriggers -n "$NAMESPACE"

say "kubectl get cohortimports -n $NAMESPACE"
kubectl get cohortimports -n "$NAMESPACE"
say "kubectl get braze-destinations -n $NAMESPACE (the workspace vip-customers names)"
kubectl get braze-destinations -n "$NAMESPACE"
say "cohort-operator history power-users -n $NAMESPACE"
"$OPERATOR" history power-users -n "$NAMESPACE"
say "Cohorts in the Braze sandbox (what Braze's segment filter offers)"
curl -sf "$BRAZE/sandbox/cohorts" | /usr/bin/python3 -c '
import json, sys
for c in json.load(sys.stdin):
    print("  {:<22} {:<30} {:>4} members".format(c["cohort_id"], c["name"] or "(unnamed)", c["members"]))'

say "Users whose attribute cohorts includes active-buyers (the Braze segment of the import by attribute)"
curl -sf "$BRAZE/sandbox/segment?attribute=cohorts&includes=active-buyers" | /usr/bin/python3 -c '
import json, sys
users = json.load(sys.stdin)
print("  {} users, e.g. {}".format(len(users), ", ".join(u.get("external_id", "?") for u in users[:5])))
sys.exit(0 if users else 1)' || { echo "demo: the import by attribute reached no user" >&2; exit 1; }

# The demo's promise: every example's cohort is in Braze, named, with members (the
# partner imports; the one by attribute was checked above).
missing=0
cohorts=$(curl -sf "$BRAZE/sandbox/cohorts")
partner_ids=$(kubectl get cohortimports -n "$NAMESPACE" -o json | /usr/bin/python3 -c '
import json, sys
print(" ".join(i["spec"]["cohort"]["id"] for i in json.load(sys.stdin)["items"]
               if i["spec"]["destination"].get("braze", {}).get("method", "CohortImport") == "CohortImport"))')
for id in $partner_ids; do
  if ! printf '%s' "$cohorts" | /usr/bin/python3 -c '
import json, sys
sys.exit(0 if any(c["cohort_id"] == sys.argv[1] and c["name"] and c["members"] > 0
                  for c in json.load(sys.stdin)) else 1)' "$id"; then
    echo "demo: cohort $id is not in the Braze sandbox (operator log: $STATE/operator.log)" >&2
    missing=1
  fi
done
if [ $missing -ne 0 ]; then
  tail -n 40 "$STATE/operator.log" >&2
  exit 1
fi
say "Every example cohort is in Braze"

if $KEEP; then
  say "Everything keeps running; KUBECONFIG=$KUBECONFIG. Ctrl-C stops it."
  wait
fi
