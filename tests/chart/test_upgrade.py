"""An upgrade, as a user on the previous release does it: the previous chart and CRD (taken
from git history) installed on a real kube-apiserver, imports created and run against the
Braze sandbox; then this release's CRD applied (`kubectl apply --server-side -f crds/`, the
README's upgrade step: Helm never upgrades CRDs) and this chart, packaged by `helm package`,
rendered as `helm upgrade` does. Every import, its history and its snapshot survive, and
the next run sends only the changes.

The operator binary is this tree's, before and after: chart 0.1.0 never had a published
image, so there is no earlier binary a user could be running; what changes across the
upgrade is the chart and the CRD.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from chartlib import CHART_DIR, REPO, one
from cluster import ControlPlane, install_chart
from test_operator_as_serviceaccount import (
    IMPORT_KEY, PARTNER, PARTNER_KEY, Process, World, binary, free_port, materialize, serving,
    users, wait_for,
)

# The last commit of chart 0.1.0 (main before the 0.2.0 release).
PREVIOUS = "864fecd"
PREVIOUS_VERSION = "0.1.0"
RELEASE = "upgrade"
NAMESPACE = "cohort-upgrade"
WATCHED = "upgrade-team"
POD_NAME = "upgrade-cohort-operator-7f9c8d6b5-q4w2e"


def previous_chart(into: Path) -> Path:
    """charts/cohort-operator as it was at PREVIOUS, from git history."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS, "charts/cohort-operator"],
                             capture_output=True, check=False)
    assert archive.returncode == 0, (f"git archive {PREVIOUS} failed (a clone with its history is needed): "
                                     f"{archive.stderr.decode(errors='replace')}")
    tar = into / "previous.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "charts" / "cohort-operator"


def snapshots(plane: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    """The snapshot ConfigMaps (heads and chunks) in `ns`, by name: their data and uid."""
    listed = json.loads(plane.kubectl("get", "configmaps", "-n", ns, "-l", "cohorts.dev/snapshot-part",
                                      "-o", "json").stdout)["items"]
    return {cm["metadata"]["name"]: {"uid": cm["metadata"]["uid"], "data": cm.get("data", {}),
                                     "binaryData": cm.get("binaryData", {})} for cm in listed}


class Upgrade:
    """The control plane, the sandbox, and the operator of the installed chart version."""

    def __init__(self, plane: ControlPlane, root: Path, sandbox_url: str) -> None:
        self.plane = plane
        self.root = root
        self.sandbox_url = sandbox_url
        self.values = {
            "watchNamespaces": [WATCHED],
            "leaderElection": {"enabled": True},
            "partnerKeys": {"secretName": "braze-partner-keys"},
            "braze": {"endpointRegions": {sandbox_url: "us"}},
        }
        self.world: World | None = None
        self.installed: list[dict[str, Any]] = []

    def install(self, chart: Path, *, upgrade: bool) -> None:
        """`helm install` or `helm upgrade` of `chart`, then its operator started."""
        objects = install_chart(self.plane, self.values, release=RELEASE, namespace=NAMESPACE,
                                chart=chart, upgrade=upgrade)
        # helm upgrade deletes what the previous revision had and this one has not.
        keep = {(o["kind"], o["metadata"]["name"]) for o in objects}
        for gone in self.installed:
            if (gone["kind"], gone["metadata"]["name"]) not in keep:
                ns = ["-n", gone["metadata"]["namespace"]] if gone["metadata"].get("namespace") else []
                self.plane.kubectl("delete", gone["kind"], gone["metadata"]["name"], *ns, "--ignore-not-found")
        self.installed = objects
        self.plane.apply([{"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "braze-partner-keys", "namespace": NAMESPACE},
                           "stringData": {"us": PARTNER_KEY}}])
        self.start(objects, "upgraded" if upgrade else "installed")

    def start(self, objects: list[dict[str, Any]], label: str) -> None:
        deployment = one(objects, "Deployment")
        pod_root = self.root / label
        pod_root.mkdir()
        pod = materialize(self.plane, deployment, pod_root, NAMESPACE)
        sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        kubeconfig = self.plane.write_sa_kubeconfig(pod_root / "sa-kubeconfig", NAMESPACE, sa)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(pod_root), "KUBECONFIG": str(kubeconfig),
               **pod.env, "POD_NAME": f"{POD_NAME}-{label}"}
        operator = Process([str(binary("cohort-operator")), *pod.args], pod_root / "operator.log", env)
        admin_env = {"PATH": "/usr/bin:/bin", "HOME": str(pod_root), "KUBECONFIG": str(self.plane.kubeconfig)}
        self.world = World(self.plane, objects, self.sandbox_url, operator, pod, "", pod_root, admin_env,
                           namespace=NAMESPACE)
        wait_for("the operator's /readyz", lambda: serving(operator, f"{pod.metrics_url}/readyz"))

    def stop(self) -> None:
        if self.world:
            self.world.operator.stop()
            self.world = None


@pytest.fixture(scope="module")
def upgrade(control_plane: ControlPlane) -> Iterator[Upgrade]:
    with tempfile.TemporaryDirectory(prefix="cohort-upgrade.") as tmp:
        root = Path(tmp)
        port = free_port()
        sandbox_url = f"http://127.0.0.1:{port}"
        sandbox = Process([str(binary("braze-sandbox")), "--listen", f"127.0.0.1:{port}",
                           "--partner", f"{PARTNER}={PARTNER_KEY}", "--data-import-key", IMPORT_KEY,
                           "--generated-users", "40"], root / "sandbox.log")
        state = Upgrade(control_plane, root, sandbox_url)
        try:
            wait_for("the Braze sandbox", lambda: serving(sandbox, f"{sandbox_url}/sandbox/stats"))
            yield state
        finally:
            state.stop()
            sandbox.stop()


def packaged(into: Path) -> Path:
    """This chart as `helm package` writes it."""
    archive = Path(helm.package(CHART_DIR, destination=into))
    assert archive.name == f"cohort-operator-{chart_version(CHART_DIR)}.tgz", archive
    return archive


def chart_version(chart: Path) -> str:
    return yaml.safe_load((chart / "Chart.yaml").read_text())["version"]


def test_an_upgrade_from_the_previous_chart_keeps_every_import_its_history_and_snapshot(
        upgrade: Upgrade, tmp_path: Path) -> None:
    previous = previous_chart(tmp_path)
    assert chart_version(previous) == PREVIOUS_VERSION
    assert chart_version(CHART_DIR) != PREVIOUS_VERSION

    # --- on the previous release ---
    upgrade.install(previous, upgrade=False)
    w = upgrade.world
    assert w is not None
    w.put_import_key(WATCHED)
    w.put_source(WATCHED, "weekly-members", users(*range(10)))
    w.put_source(WATCHED, "daily-members", users(*range(20, 25)))
    w.create_import(WATCHED, "weekly", "weekly-members")
    w.create_import(WATCHED, "daily", "daily-members")
    assert w.trigger(WATCHED, "weekly")["added"] == 10
    w.put_source(WATCHED, "weekly-members", users(*range(12)))
    assert w.trigger(WATCHED, "weekly")["added"] == 2
    assert w.trigger(WATCHED, "daily")["added"] == 5
    before = {name: w.status(WATCHED, name) for name in ("weekly", "daily")}
    snapshots_before = snapshots(upgrade.plane, WATCHED)
    assert snapshots_before, "the runs kept no snapshot ConfigMap"
    upgrade.stop()

    # --- the upgrade: this release's CRD, then this chart as packaged ---
    upgrade.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    upgrade.install(packaged(tmp_path / "package"), upgrade=True)
    w = upgrade.world
    assert w is not None
    # The upgraded operator leads (its own Lease holder identity) and sees every import ready.
    wait_for("the upgraded operator holding the Lease", lambda: w.lease_holder() == f"{POD_NAME}-upgraded")
    for name, status in before.items():
        after = w.wait_status(WATCHED, name, "Ready after the upgrade",
                              lambda s: any(c["type"] == "Ready" and c["status"] == "True"
                                            for c in s.get("conditions", [])))
        assert after["history"] == status["history"], name
        assert after["members"] == status["members"], name
    assert snapshots(upgrade.plane, WATCHED) == snapshots_before

    # The next run sends only what changed since the run before the upgrade.
    w.put_source(WATCHED, "weekly-members", users(*range(1, 12), 30))
    run = w.trigger(WATCHED, "weekly")
    assert (run["result"], run["added"], run["removed"], run["cohortSize"]) == ("Succeeded", 1, 1, 12), run
    assert w.members(WATCHED, "weekly") == set(users(*range(1, 12), 30))
    run = w.trigger(WATCHED, "daily")
    assert (run["result"], run["added"], run["removed"]) == ("Succeeded", 0, 0), run
    assert w.members(WATCHED, "daily") == set(users(*range(20, 25)))
    assert len(w.status(WATCHED, "weekly")["history"]) == 3
