"""The chart's default install — every namespace, Secrets by name only — with the real
operator binary running as the chart's ServiceAccount (its own TokenRequest token) on a real
kube-apiserver with the Braze sandbox: it cannot list or watch a Secret anywhere, and still
does its whole job; a Secret created after its import is found without a watch.

A module of its own: this operator handles every namespace, so it must not run beside the
confined one of test_operator_as_serviceaccount.py. Imports other modules left behind are
suspended first, so that it runs only the ones made here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chartlib import one
from cluster import ControlPlane, install_chart
from test_operator_as_serviceaccount import (
    PARTNER,
    PARTNER_KEY,
    IMPORT_KEY,
    Process,
    World,
    binary,
    free_port,
    materialize,
    ready_reason,
    refusals,
    serving,
    users,
    wait_for,
)

RELEASE = "sa-all"
NAMESPACE = "cohort-sa-all"
TEAM = "sa-all-team"


def suspend_every_import(plane: ControlPlane) -> None:
    listed = json.loads(plane.kubectl("get", "cohortimports", "--all-namespaces", "-o", "json").stdout)
    for item in listed["items"]:
        meta = item["metadata"]
        plane.kubectl("patch", "cohortimport", meta["name"], "-n", meta["namespace"], "--type", "merge",
                      "-p", '{"spec":{"suspend":true}}')


@pytest.fixture(scope="module")
def world(control_plane: ControlPlane) -> Iterator[World]:
    plane = control_plane
    with tempfile.TemporaryDirectory(prefix="cohort-sa-all.") as tmp:
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

            # The defaults, plus what any install sets: partner keys and (here) the sandbox.
            values = {
                "partnerKeys": {"secretName": "braze-partner-keys"},
                "braze": {"endpointRegions": {sandbox_url: "us"}},
                "log": {"format": "json", "level": "info,cohort_operator=debug"},
            }
            objects = install_chart(plane, values, release=RELEASE, namespace=NAMESPACE)
            plane.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TEAM}}])
            plane.apply([{"apiVersion": "v1", "kind": "Secret",
                          "metadata": {"name": "braze-partner-keys", "namespace": NAMESPACE},
                          "stringData": {"us": PARTNER_KEY}}])
            suspend_every_import(plane)

            deployment = one(objects, "Deployment")
            pod = materialize(plane, deployment, root, NAMESPACE)
            sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
            kubeconfig = plane.write_sa_kubeconfig(root / "sa-kubeconfig", NAMESPACE, sa)
            sa_token = plane.sa_token(NAMESPACE, sa)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
                   "KUBECONFIG": str(kubeconfig), **pod.env}
            operator = Process([str(binary("cohort-operator")), *pod.args], root / "operator.log", env)
            started.append(operator)
            admin_env = {"PATH": env["PATH"], "HOME": str(root), "KUBECONFIG": str(plane.kubeconfig)}
            w = World(plane, objects, sandbox_url, operator, pod, sa_token, root, admin_env, NAMESPACE)
            wait_for("the operator's /readyz", lambda: serving(operator, f"{pod.metrics_url}/readyz"))
            yield w
        finally:
            for process in reversed(started):
                process.stop()


def test_the_default_install_cannot_list_or_watch_secrets(world: World) -> None:
    assert "--watch-secrets=false" in world.pod.args
    assert not any(a.startswith("--watch-namespaces") for a in world.pod.args)
    world.put_import_key(TEAM)
    req = world.plane.request
    for path in ("/api/v1/secrets", f"/api/v1/namespaces/{TEAM}/secrets", "/api/v1/namespaces/kube-system/secrets",
                 f"/api/v1/namespaces/{TEAM}/secrets?watch=true&timeoutSeconds=1",
                 "/api/v1/secrets?watch=true&timeoutSeconds=1"):
        got = req("GET", path, token=world.sa_token)
        assert got.status == 403, (path, got)
    # A Secret an import names is read by its name.
    assert req("GET", f"/api/v1/namespaces/{TEAM}/secrets/braze-data-import", token=world.sa_token).status == 200


def test_a_missing_secret_is_found_without_a_watch_and_the_import_runs(world: World) -> None:
    world.put_source(TEAM, "late-members", users(1, 2, 3))
    world.create_import(TEAM, "late", "late-members", secret="braze-late")
    status = world.wait_status(TEAM, "late", "SecretNotFound", lambda s: ready_reason(s) == "SecretNotFound")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert f"Secret {TEAM}/braze-late not found" in ready["message"], ready

    # Nothing watches Secrets: the operator looks again on its own, and finds it.
    world.put_import_key(TEAM, "braze-late")
    world.wait_status(TEAM, "late", "Scheduled", lambda s: ready_reason(s) == "Scheduled")
    run = world.trigger(TEAM, "late")
    assert (run["result"], run["added"]) == ("Succeeded", 3), run
    assert world.members(TEAM, "late") == set(users(1, 2, 3))


def test_a_run_reads_its_secret_afresh(world: World) -> None:
    """A Secret deleted after a success is missed by the next run (read at each run, not
    cached), and the import recovers once it is back."""
    world.put_import_key(TEAM, "braze-rotating")
    world.put_source(TEAM, "rotating-members", users(4))
    world.create_import(TEAM, "rotating", "rotating-members", secret="braze-rotating")
    assert world.trigger(TEAM, "rotating")["result"] == "Succeeded"
    world.plane.kubectl("delete", "secret", "braze-rotating", "-n", TEAM)
    run = world.trigger(TEAM, "rotating")
    assert run["result"] == "Failed" and f"Secret {TEAM}/braze-rotating not found" in run["message"], run
    world.put_import_key(TEAM, "braze-rotating")
    world.wait_status(TEAM, "rotating", "recovered", lambda s: ready_reason(s) not in (None, "SecretNotFound"))
    world.put_source(TEAM, "rotating-members", users(4, 5))
    run = world.trigger(TEAM, "rotating")
    assert (run["result"], run["added"]) == ("Succeeded", 1), run


def test_nothing_it_did_was_refused(world: World) -> None:
    """Last: the operator's whole log so far — without list or watch on Secrets, it never
    asked for them."""
    assert world.operator.alive(), world.operator.output()[-4000:]
    refused = refusals(world.operator.output())
    assert not refused, "\n".join(refused[:20])
