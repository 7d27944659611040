"""The real operator binary, configured as the chart's Deployment says and running as the
chart's ServiceAccount (its own TokenRequest token) under the chart's RBAC, on a real
kube-apiserver with the Braze sandbox: every feature works, nothing it does is refused, and
it cannot read what it has no business with.

The binaries come from "$CARGO_TARGET_DIR/debug" (scripts/test-chart.sh builds them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from chartlib import one
from cluster import ControlPlane, install_chart
from dashboard import exposition, queries, rendered_dashboard, unexported

RELEASE = "sa-run"
NAMESPACE = "cohort-sa-run"
WATCHED = ("sa-watched-1", "sa-watched-2")
UNWATCHED = "sa-unwatched"
POD_NAME = "sa-run-cohort-operator-5d8c7b9f4-x2x7q"
PARTNER = "kubit"
PARTNER_KEY = "partner-key-us"
IMPORT_KEY = "import-key-sa"
FINALIZER = "cohorts.dev/cleanup"
WAIT_S = 60.0

T = TypeVar("T")


def target_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cohort-operator" / "target"
    return Path(os.environ.get("CARGO_TARGET_DIR") or default)


def binary(name: str) -> Path:
    path = target_dir() / "debug" / name
    if not path.is_file():
        raise RuntimeError(f"{path} not found: build it first (scripts/test-chart.sh does: "
                           "cargo build -p cohort-operator -p braze-sandbox --bins)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    """Polls `probe` until it returns something truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def http(method: str, url: str, body: Any = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError:
        return 0, ""


class Process:
    """A child process whose output goes to a file; stopped with SIGTERM, then killed."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


# --- the chart's pod, run locally -------------------------------------------------------------

def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in container args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


@dataclass
class Pod:
    """The operator container of the rendered Deployment as a local process: its args and env
    as rendered, its volumes as local directories filled the way the kubelet fills them."""

    args: list[str]
    env: dict[str, str]
    metrics_url: str
    trigger_url: str | None = None


def materialize(plane: ControlPlane, deployment: dict[str, Any], root: Path, namespace: str = NAMESPACE) -> Pod:
    spec = deployment["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "operator")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        local = root / "mounts" / mount["name"]
        local.mkdir(parents=True)
        volume = volumes[mount["name"]]
        for kind, resource in (("secret", "secret"), ("configMap", "configmap")):
            if kind not in volume:
                continue
            source = volume[kind]
            name = source.get("secretName") or source.get("name")
            obj = plane.get(resource, name, namespace)
            data = ({k: base64.b64decode(v) for k, v in obj.get("data", {}).items()} if kind == "secret"
                    else {k: v.encode() for k, v in obj.get("data", {}).items()})
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (local / item["path"]).write_bytes(data[item["key"]])
        mounts[mount["mountPath"]] = local

    def local_path(value: str) -> str:
        for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path):]
        return value

    field_values = {"metadata.namespace": namespace, "metadata.name": POD_NAME}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = local_path(_expand(var["value"], env))
        else:
            env[var["name"]] = field_values[var["valueFrom"]["fieldRef"]["fieldPath"]]

    metrics_port = free_port()
    trigger_url = None
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args: list[str] = []
    for arg in container["args"]:
        arg = _expand(arg, env)
        if arg.startswith("--metrics-addr="):
            # The pod listens on every interface of its own network; here, loopback only.
            assert arg.endswith(f":{ports['metrics']}"), arg
            arg = f"--metrics-addr=127.0.0.1:{metrics_port}"
        elif arg.startswith("--trigger-addr="):
            assert arg.endswith(f":{ports['triggers']}"), arg
            trigger_port = free_port()
            arg = f"--trigger-addr=127.0.0.1:{trigger_port}"
            trigger_url = f"http://127.0.0.1:{trigger_port}"
        elif arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            arg = f"{flag}={local_path(value)}"
        args.append(arg)
    return Pod(args, env, f"http://127.0.0.1:{metrics_port}", trigger_url)


# --- the world: control plane, chart, sandbox, operator ---------------------------------------

@dataclass
class World:
    plane: ControlPlane
    objects: list[dict[str, Any]]
    sandbox_url: str
    operator: Process
    pod: Pod
    sa_token: str
    root: Path
    admin_env: dict[str, str] = field(default_factory=dict)
    namespace: str = NAMESPACE

    def arg(self, flag: str) -> str:
        return next(a.split("=", 1)[1] for a in self.pod.args if a.startswith(flag + "="))

    # --- as a person, with the administrator's kubeconfig ---

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(binary("cohort-operator")), *args], env=self.admin_env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"cohort-operator {' '.join(args)}: {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    def put_source(self, ns: str, name: str, members: list[str]) -> None:
        self.plane.apply([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
                           "data": {"members.txt": "".join(f"{m}\n" for m in members)}}])

    def put_import_key(self, ns: str, name: str = "braze-data-import") -> None:
        self.plane.apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
                           "stringData": {"data-import-key": IMPORT_KEY}}])

    def create_import(self, ns: str, name: str, source: str, *, secret: str = "braze-data-import",
                      **extra: Any) -> None:
        self.plane.apply([{
            "apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "cohort": {"id": cohort_id(ns, name), "name": f"{name} ({ns})"},
                "source": {"configMap": {"name": source, "key": "members.txt", "format": "Lines", "column": "id"}},
                "identifiers": {"externalId": "id"},
                "destination": {"braze": {"restEndpoint": self.sandbox_url, "partner": PARTNER,
                                          "dataImportKeySecretRef": {"name": secret, "key": "data-import-key"}}},
                "schedule": {"cadence": "Daily", "at": "03:00", "timeZone": "Europe/Lisbon"},
                **extra,
            },
        }])

    def get_import(self, ns: str, name: str) -> dict[str, Any] | None:
        done = self.plane.kubectl("get", "cohortimport", name, "-n", ns, "-o", "json", check=False)
        if done.returncode != 0:
            assert "NotFound" in done.stderr, done.stderr
            return None
        return json.loads(done.stdout)

    def status(self, ns: str, name: str) -> dict[str, Any]:
        found = self.get_import(ns, name)
        assert found is not None, f"{ns}/{name} is gone"
        return found.get("status") or {}

    def wait_status(self, ns: str, name: str, what: str,
                    test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(ns, name)
            return status if status and test(status) else None
        try:
            return wait_for(f"{ns}/{name}: {what}", probe)
        except AssertionError as err:
            raise AssertionError(f"{err}\nstatus: {json.dumps(self.status(ns, name), indent=1)}\n"
                                 f"operator log tail:\n{self.operator.output()[-4000:]}") from None

    def trigger(self, ns: str, name: str) -> dict[str, Any]:
        """`cohort-operator trigger --wait`, as a person; returns the run it waited for."""
        runs = len(self.status(ns, name).get("history", []))
        out = self.cli("trigger", name, "-n", ns, "--wait", "--timeout-seconds", str(int(WAIT_S)))
        status = self.status(ns, name)
        assert len(status.get("history", [])) == runs + 1, out
        assert f"run {status['lastRun']['id']}:" in out, out
        return status["lastRun"]

    # --- the sandbox ---

    def members(self, ns: str, name: str) -> set[str] | None:
        code, body = http("GET", f"{self.sandbox_url}/sandbox/cohorts/{cohort_id(ns, name)}/members?partner={PARTNER}")
        if code == 404:
            return None
        assert code == 200, (code, body)
        return {m["external_id"] for m in json.loads(body)}

    def has_event(self, ns: str, name: str, reason: str) -> bool:
        listed = json.loads(self.plane.kubectl("get", "events.v1.events.k8s.io", "-n", ns, "-o", "json").stdout)
        return any(e.get("regarding", {}).get("name") == name and e.get("reason") == reason
                   and e.get("reportingController") for e in listed["items"])

    def lease_holder(self) -> str | None:
        got = self.plane.kubectl("get", "lease", self.arg("--lease-name"), "-n", self.namespace, "-o", "json", check=False)
        return json.loads(got.stdout)["spec"].get("holderIdentity") if got.returncode == 0 else None

    def metrics(self) -> str:
        code, text = http("GET", f"{self.pod.metrics_url}/metrics")
        assert code == 200, (code, text)
        return text


def serving(process: Process, url: str) -> bool:
    if not process.alive():
        raise AssertionError(f"{process.proc.args[0]} exited ({process.proc.returncode}):\n{process.output()[-4000:]}")
    return http("GET", url)[0] == 200


def cohort_id(ns: str, name: str) -> str:
    return f"{ns}-{name}"


def users(*numbers: int) -> list[str]:
    return [f"user-{n}" for n in numbers]


@pytest.fixture(scope="module")
def world(control_plane: ControlPlane) -> Iterator[World]:
    plane = control_plane
    with tempfile.TemporaryDirectory(prefix="cohort-sa-run.") as tmp:
        root = Path(tmp)
        started: list[Process] = []
        try:
            port = free_port()
            sandbox_url = f"http://127.0.0.1:{port}"
            sandbox = Process([str(binary("braze-sandbox")), "--listen", f"127.0.0.1:{port}",
                               "--partner", f"{PARTNER}={PARTNER_KEY}", "--data-import-key", IMPORT_KEY,
                               "--generated-users", "40"], root / "sandbox.log")
            started.append(sandbox)
            wait_for("the Braze sandbox", lambda: serving(sandbox, f"{sandbox_url}/sandbox/stats"))

            values = {
                "watchNamespaces": list(WATCHED),
                "leaderElection": {"enabled": True},
                "partnerKeys": {"secretName": "braze-partner-keys"},
                "braze": {"endpointRegions": {sandbox_url: "us"}},
                "log": {"format": "json", "level": "info,cohort_operator=debug"},
            }
            objects = install_chart(plane, values, release=RELEASE, namespace=NAMESPACE)
            plane.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": UNWATCHED}}])
            # The partner keys Secret the chart mounts, as the platform team would create it.
            plane.apply([{"apiVersion": "v1", "kind": "Secret",
                          "metadata": {"name": "braze-partner-keys", "namespace": NAMESPACE},
                          "stringData": {"us": PARTNER_KEY}}])

            deployment = one(objects, "Deployment")
            pod = materialize(plane, deployment, root)
            sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
            kubeconfig = plane.write_sa_kubeconfig(root / "sa-kubeconfig", NAMESPACE, sa)
            sa_token = plane.sa_token(NAMESPACE, sa)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
                   "KUBECONFIG": str(kubeconfig), **pod.env}
            operator = Process([str(binary("cohort-operator")), *pod.args], root / "operator.log", env)
            started.append(operator)
            admin_env = {"PATH": env["PATH"], "HOME": str(root), "KUBECONFIG": str(plane.kubeconfig)}
            w = World(plane, objects, sandbox_url, operator, pod, sa_token, root, admin_env)
            wait_for("the operator's /readyz", lambda: serving(operator, f"{pod.metrics_url}/readyz"))
            yield w
        finally:
            for process in reversed(started):
                process.stop()


# --- the features --------------------------------------------------------------------------

def test_the_operator_runs_with_the_charts_configuration(world: World) -> None:
    args = world.pod.args
    assert args[0] == "run"
    assert f"--watch-namespaces={','.join(WATCHED)}" in args
    assert "--leader-election" in args
    assert f"--lease-namespace={NAMESPACE}" in args
    assert f"--braze-endpoint-region={world.sandbox_url}=us" in args
    assert "--log-format=json" in args
    keys_dir = Path(world.arg("--partner-keys-dir"))
    assert (keys_dir / "us").read_text() == PARTNER_KEY
    # JSON log lines, as the chart asks.
    first = wait_for("a log line", lambda: world.operator.output().splitlines()[:1])
    assert json.loads(first[0])["level"]


def test_it_holds_the_lease_and_serves_metrics(world: World) -> None:
    # The Lease the chart names, in the release namespace, held by this pod.
    assert world.arg("--lease-name") == one(world.objects, "Role", f"{RELEASE}-cohort-operator-leader-election")[
        "rules"][1]["resourceNames"][0]
    wait_for(f"the Lease held by {POD_NAME}", lambda: world.lease_holder() == POD_NAME)
    assert http("GET", f"{world.pod.metrics_url}/healthz")[0] == 200
    wait_for("cohort_operator_leader 1", lambda: "cohort_operator_leader 1" in world.metrics())
    assert "cohort_operator_reconciles_total" in world.metrics()


def test_runs_import_the_configmap_and_follow_its_changes(world: World) -> None:
    ns = WATCHED[0]
    world.put_import_key(ns)
    world.put_source(ns, "churn-members", users(*range(10)))
    world.create_import(ns, "churn-risk", "churn-members")
    # Scheduled, not run: a Daily import waits for its time or a person.
    status = world.wait_status(ns, "churn-risk", "Scheduled", lambda s: s.get("nextRunAt") is not None)
    assert not status.get("history")

    run = world.trigger(ns, "churn-risk")
    assert (run["result"], run["trigger"], run["added"], run["removed"]) == ("Succeeded", "Manual", 10, 0), run
    assert world.members(ns, "churn-risk") == set(users(*range(10)))

    # The warehouse changes: one leaves, two join; only the changes are sent.
    world.put_source(ns, "churn-members", users(*range(9), 10, 11))
    run = world.trigger(ns, "churn-risk")
    assert (run["result"], run["added"], run["removed"], run["cohortSize"]) == ("Succeeded", 2, 1, 11), run
    assert world.members(ns, "churn-risk") == set(users(*range(9), 10, 11))

    # Snapshots kept in ConfigMaps, Events recorded, history shown by the CLI.
    cms = json.loads(world.plane.kubectl("get", "configmaps", "-n", ns, "-o", "json").stdout)["items"]
    assert any(snapshot_of(cm) == "churn-risk" for cm in cms), [cm["metadata"]["name"] for cm in cms]
    wait_for("a RunSucceeded event", lambda: world.has_event(ns, "churn-risk", "RunSucceeded"))
    history = world.cli("history", "churn-risk", "-n", ns)
    for record in world.status(ns, "churn-risk")["history"]:
        assert record["id"] in history


def test_a_trigger_call_runs_its_import_with_the_charts_rbac(world: World) -> None:
    """The chart's RBAC lets the operator watch CohortTriggers, write their status and set an
    import's run request; a signed call on the trigger port runs the import once."""
    ns = WATCHED[0]
    world.put_import_key(ns)
    world.put_source(ns, "pushed-members", users(1, 2, 3))
    world.create_import(ns, "pushed", "pushed-members")
    world.plane.kubectl("label", "cohortimport", "pushed", "-n", ns, "pipeline=nightly")
    token = "0123456789abcdef0123456789abcdef"
    world.plane.apply([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hook", "namespace": ns},
         "stringData": {"token": token}},
        {"apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortTrigger", "metadata": {"name": "nightly", "namespace": ns},
         "spec": {"type": "Generic", "secretRef": {"name": "hook", "key": "token"},
                  "selector": {"matchLabels": {"pipeline": "nightly"}}}},
    ])

    def path() -> str | None:
        got = json.loads(world.plane.kubectl("get", "cohorttrigger", "nightly", "-n", ns, "-o", "json").stdout)
        return (got.get("status") or {}).get("webhookPath")
    hook = wait_for("the trigger's webhook path", path)
    assert world.pod.trigger_url, world.pod.args
    body = b'{"dag":"nightly"}'
    ts = str(int(time.time()))
    signature = hmac.new(token.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(f"{world.pod.trigger_url}{hook}", data=body, method="POST",
                                 headers={"X-Cohort-Timestamp": ts, "X-Cohort-Signature": f"sha256={signature}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202, resp.read()
    status = world.wait_status(ns, "pushed", "the triggered run", lambda s: len(s.get("history", [])) == 1
                               and not s.get("currentRun"))
    assert status["lastRun"]["result"] == "Succeeded", status["lastRun"]
    assert "cohorttrigger/nightly" in status["lastHandledRunRequest"]
    assert world.members(ns, "pushed") == set(users(1, 2, 3))
    # The metrics port is not the trigger port.
    assert http("POST", f"{world.pod.metrics_url}{hook}", {})[0] == 404


def test_the_removal_guard_blocks_until_approved(world: World) -> None:
    ns = WATCHED[1]  # the second watched namespace: its own Role and RoleBinding
    world.put_import_key(ns)
    world.put_source(ns, "guarded-members", users(*range(10)))
    world.create_import(ns, "guarded", "guarded-members", removalGuard={"maxRemovalPercent": 20})
    assert world.trigger(ns, "guarded")["result"] == "Succeeded"

    world.put_source(ns, "guarded-members", users(*range(5)))
    blocked = world.trigger(ns, "guarded")
    # A blocked run sent nothing; what it would have removed is recorded apart.
    assert (blocked["result"], blocked["removed"], blocked.get("wouldRemove")) == ("Blocked", 0, 5), blocked
    assert blocked["id"] in blocked["message"]
    ready = next(c for c in world.status(ns, "guarded")["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Blocked")
    assert world.members(ns, "guarded") == set(users(*range(10)))
    wait_for("a RunBlocked event", lambda: world.has_event(ns, "guarded", "RunBlocked"))

    world.cli("approve", "guarded", blocked["id"], "-n", ns)
    status = world.wait_status(ns, "guarded", "the approved run", lambda s: len(s.get("history", [])) == 3
                               and not s.get("currentRun"))
    approved = status["history"][0]
    assert (approved["result"], approved["removed"]) == ("Succeeded", 5), approved
    assert world.members(ns, "guarded") == set(users(*range(5)))


def test_suspend_and_resume(world: World) -> None:
    ns = WATCHED[0]
    world.put_import_key(ns)
    world.put_source(ns, "paused-members", users(20, 21))
    world.create_import(ns, "paused", "paused-members")
    world.wait_status(ns, "paused", "Scheduled", lambda s: s.get("nextRunAt") is not None)
    world.cli("suspend", "paused", "-n", ns)
    world.wait_status(ns, "paused", "Suspended", lambda s: ready_reason(s) == "Suspended")
    world.cli("resume", "paused", "-n", ns)
    status = world.wait_status(ns, "paused", "resumed", lambda s: ready_reason(s) not in (None, "Suspended"))
    assert status.get("nextRunAt"), status
    assert world.trigger(ns, "paused")["result"] == "Succeeded"
    assert world.members(ns, "paused") == set(users(20, 21))


def test_a_missing_secret_is_reported_and_its_creation_noticed(world: World) -> None:
    ns = WATCHED[1]
    world.put_source(ns, "later-members", users(22))
    world.create_import(ns, "later", "later-members", secret="braze-later")
    status = world.wait_status(ns, "later", "SecretNotFound", lambda s: ready_reason(s) == "SecretNotFound")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert f"Secret {ns}/braze-later not found" in ready["message"], ready
    # The Secret watch (list/watch on secrets in the namespace) notices it being created.
    world.put_import_key(ns, "braze-later")
    world.wait_status(ns, "later", "Scheduled", lambda s: ready_reason(s) == "Scheduled")


def snapshot_of(cm: dict) -> str | None:
    """The import a snapshot ConfigMap (head or chunk) belongs to, if it is one."""
    meta = cm["metadata"]
    if "cohorts.dev/snapshot-part" not in meta.get("labels", {}):
        return None
    return meta.get("annotations", {}).get("cohorts.dev/import")


def test_deleting_with_remove_members_empties_the_cohort(world: World) -> None:
    ns = WATCHED[0]
    world.put_import_key(ns)
    world.put_source(ns, "leaving-members", users(30, 31, 32))
    world.create_import(ns, "leaving", "leaving-members", deletionPolicy="RemoveMembers")
    assert world.trigger(ns, "leaving")["result"] == "Succeeded"
    assert world.members(ns, "leaving") == set(users(30, 31, 32))
    found = world.get_import(ns, "leaving")
    assert FINALIZER in found["metadata"].get("finalizers", []), found["metadata"]

    world.plane.kubectl("delete", "cohortimport", "leaving", "-n", ns, "--wait=false")
    wait_for("the import gone (finalizer removed)", lambda: world.get_import(ns, "leaving") is None)
    assert world.members(ns, "leaving") == set()
    cms = json.loads(world.plane.kubectl("get", "configmaps", "-n", ns, "-o", "json").stdout)["items"]
    assert not [cm for cm in cms if snapshot_of(cm) == "leaving"]


def test_an_unwatched_namespace_is_never_touched(world: World) -> None:
    world.put_import_key(UNWATCHED)
    world.put_source(UNWATCHED, "members", users(33))
    world.create_import(UNWATCHED, "outside", "members")
    world.plane.kubectl("annotate", "cohortimport", "outside", "-n", UNWATCHED,
                        "cohorts.dev/run-requested-at=2026-01-01T00:00:00Z")
    # Created after it: once this one is scheduled and has run, the other would have been too.
    ns = WATCHED[1]
    world.put_import_key(ns)
    world.put_source(ns, "inside-members", users(34))
    world.create_import(ns, "inside", "inside-members")
    assert world.trigger(ns, "inside")["result"] == "Succeeded"

    outside = world.get_import(UNWATCHED, "outside")
    assert not outside.get("status"), outside.get("status")
    assert not outside["metadata"].get("finalizers")
    assert world.members(UNWATCHED, "outside") is None

    # Its own credentials cannot read Secrets there, nor in kube-system.
    world.plane.apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cluster-admin-stuff",
                                                                           "namespace": "kube-system"},
                        "stringData": {"token": "do-not-read"}}])
    req = world.plane.request
    assert req("GET", f"/api/v1/namespaces/{ns}/secrets/braze-data-import", token=world.sa_token).status == 200
    for where, name in ((UNWATCHED, "braze-data-import"), ("kube-system", "cluster-admin-stuff"),
                        (NAMESPACE, "braze-partner-keys")):
        got = req("GET", f"/api/v1/namespaces/{where}/secrets/{name}", token=world.sa_token)
        assert got.status == 403, (where, got)
    assert req("GET", f"/apis/cohorts.dev/v1alpha1/namespaces/{UNWATCHED}/cohortimports/outside",
               token=world.sa_token).status == 403


def refusals(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if re.search(r"forbidden|code: 403|\"code\":\s*403", line, re.IGNORECASE)]


def test_asked_to_watch_a_namespace_the_chart_did_not_grant_it_is_refused(world: World) -> None:
    """The same binary and ServiceAccount, told to watch the unwatched namespace: the API
    server refuses, and the log says so (which is what the last test looks for)."""
    args = [a for a in world.pod.args if not a.startswith(("--watch-namespaces=", "--metrics-addr=", "--trigger-addr=", "--leader"))
            and not a.startswith("--lease-")]
    args += [f"--watch-namespaces={UNWATCHED}", f"--metrics-addr=127.0.0.1:{free_port()}"]
    env = {"PATH": world.admin_env["PATH"], "HOME": str(world.root),
           "KUBECONFIG": str(world.root / "sa-kubeconfig"), **world.pod.env, "POD_NAME": "intruder"}
    intruder = Process([str(binary("cohort-operator")), *args], world.root / "intruder.log", env)
    try:
        refused = wait_for(f"a 403 naming {UNWATCHED} in its log",
                           lambda: [line for line in refusals(intruder.output()) if UNWATCHED in line])
    finally:
        intruder.stop()
    assert "system:serviceaccount:" + NAMESPACE in refused[0], refused[0]


def test_the_grafana_dashboard_reads_only_what_the_operator_exports(world: World) -> None:
    """Every metric and label the chart's dashboard queries is in this operator's /metrics
    once it has run an import (so every labelled family has a series)."""
    ns = WATCHED[1]
    world.put_import_key(ns)
    world.put_source(ns, "dashboard-members", users(*range(5)))
    world.create_import(ns, "dashboarded", "dashboard-members")
    run = world.trigger(ns, "dashboarded")
    assert run["result"] == "Succeeded", run
    config_map, dashboard = rendered_dashboard({"grafanaDashboard": {"enabled": True}})
    # The API server takes the ConfigMap as rendered (in the release namespace).
    config_map["metadata"]["namespace"] = NAMESPACE
    world.plane.apply([config_map])

    # The per-import gauges follow the run's status write: wait for them, then compare.
    try:
        wait_for("the dashboard's metrics and labels exported",
                 lambda: not unexported(dashboard, exposition(world.metrics())) or None, timeout_s=20.0)
    except AssertionError:
        pass  # the assertion below names what is missing
    exported = exposition(world.metrics())
    assert not unexported(dashboard, exported), unexported(dashboard, exported)
    assert any(m for q in queries(dashboard) for m in q.metrics()), "the dashboard queries something"


def test_nothing_it_did_was_refused(world: World) -> None:
    """Last: the operator's whole log so far, through every feature above."""
    assert world.operator.alive(), world.operator.output()[-4000:]
    log = world.operator.output()
    refused = refusals(log)
    assert not refused, "\n".join(refused[:20])
    errors = [line for line in log.splitlines() if '"level":"ERROR"' in line]
    assert not errors, "\n".join(errors[:20])


def ready_reason(status: dict[str, Any]) -> str | None:
    return next((c["reason"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)
