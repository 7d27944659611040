"""docs/gitops.md, checked: re-applying a manifest changes nothing, the operator's writes
are not drift, and the Argo CD (Lua) and Flux (CEL) health checks — run exactly as printed
in the doc — read real CohortImports from a real kube-apiserver correctly."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import cel
import lupa.lua51 as lua51
import pytest
import yaml

import chartlib
from cluster import ControlPlane, sa_user

DOC = chartlib.REPO / "docs" / "gitops.md"
EXAMPLES = chartlib.REPO / "examples"
NS = "gitops"
CI = "/apis/cohorts.dev/v1alpha1/namespaces/{ns}/cohortimports/{name}"
OPERATOR = sa_user("cohort-gitops", "gitops-cohort-operator")


def yaml_blocks() -> list[Any]:
    text = DOC.read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def argo_health_lua() -> str:
    [cm] = [b for b in yaml_blocks() if isinstance(b, dict) and b.get("kind") == "ConfigMap"
            and b["metadata"]["name"] == "argocd-cm"]
    return cm["data"]["resource.customizations.health.cohorts.dev_CohortImport"]


def flux_exprs() -> dict[str, str]:
    [ks] = [b for b in yaml_blocks() if isinstance(b, dict) and b.get("kind") == "Kustomization"]
    [check] = ks["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("cohorts.dev/v1alpha1", "CohortImport")
    return check


def argo_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Runs the doc's health.lua the way Argo CD does: `obj` global, returns `hs`."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(copy.deepcopy(obj), recursive=True)
    hs = runtime.execute(argo_health_lua())
    assert hs.status in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
    return hs.status, hs.message


def flux_health(obj: dict[str, Any]) -> str:
    """Flux's order: inProgress, failed, current; the first true wins; an expression that
    errors (e.g. no `status` yet) leaves the object in progress."""
    exprs = flux_exprs()
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        try:
            if cel.evaluate(exprs[key], obj) is True:
                return result
        except (ValueError, RuntimeError, KeyError, TypeError):
            return "InProgress"
    return "InProgress"


def manifests(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        d["metadata"]["namespace"] = NS
    return docs


@pytest.fixture(scope="module")
def plane(control_plane: ControlPlane) -> ControlPlane:
    """The CRD, a namespace for the imports, and the operator's RBAC to act with."""
    from cluster import install_chart

    install_chart(control_plane, {"watchNamespaces": [NS]}, release="gitops", namespace="cohort-gitops")
    return control_plane


def versions(plane: ControlPlane, objects: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    out = {}
    for o in objects:
        live = plane.get(o["kind"], o["metadata"]["name"], NS)
        out[f"{o['kind']}/{o['metadata']['name']}"] = (
            live["metadata"]["resourceVersion"], live["metadata"].get("generation", 0))
    return out


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")
                                            if "kind: CohortImport" in p.read_text()))
def test_applying_the_same_manifest_twice_changes_nothing(plane: ControlPlane, example: str) -> None:
    objects = manifests(EXAMPLES / example)
    # Server-side apply, as Flux and Argo CD (ServerSideApply=true) do.
    # (Only the CohortImports are compared: a Secret written with `stringData` is rewritten
    # on every server-side apply, a Kubernetes trait unrelated to this CRD.)
    imports = [o for o in objects if o["kind"] == "CohortImport"]
    plane.apply(objects, field_manager="gitops-tool")
    first = versions(plane, imports)
    plane.apply(objects, field_manager="gitops-tool")
    assert versions(plane, imports) == first
    assert {generation for _, generation in first.values()} == {1}


def test_client_side_apply_twice_is_unchanged(plane: ControlPlane) -> None:
    # Argo CD's default sync is a client-side `kubectl apply`.
    [ci] = [o for o in manifests(EXAMPLES / "inline-once.yaml") if o["kind"] == "CohortImport"]
    ci["metadata"]["name"] = "client-side"
    text = yaml.safe_dump(ci)
    plane.kubectl("apply", "-f", "-", stdin=text)
    before = plane.get("cohortimport", "client-side", NS)["metadata"]["resourceVersion"]
    out = plane.kubectl("apply", "-f", "-", stdin=text).stdout
    assert "unchanged" in out, out
    assert plane.get("cohortimport", "client-side", NS)["metadata"]["resourceVersion"] == before


def operator_patch(plane: ControlPlane, name: str, body: dict[str, Any], status: bool = False) -> None:
    path = CI.format(ns=NS, name=name) + ("/status" if status else "")
    resp = plane.request("PATCH", path, body, content_type="application/merge-patch+json",
                         as_user=OPERATOR)
    assert resp.status == 200, resp.body


# Reasons under which an import gets well by itself (ReadyReason::stalled is false).
SELF_HEALING = {"Scheduled", "Succeeded", "DryRun", "Running", "Suspended", "Missed", "RetryScheduled"}


def ready(status: str, reason: str, message: str, generation: int) -> dict[str, Any]:
    """Ready, Reconciling and Stalled, as the operator writes them together."""
    def condition(type_: str, value: str) -> dict[str, str]:
        return {"type": type_, "status": value, "reason": reason, "message": message,
                "lastTransitionTime": "2026-11-28T06:30:00Z"}
    return {"status": {"observedGeneration": generation, "conditions": [
        condition("Ready", status),
        condition("Reconciling", "True" if reason == "Running" else "False"),
        condition("Stalled", "False" if reason in SELF_HEALING else "True")]}}


def test_operator_writes_are_not_drift_and_health_follows_status(plane: ControlPlane) -> None:
    objects = manifests(EXAMPLES / "configmap-daily.yaml")
    [ci] = [o for o in objects if o["kind"] == "CohortImport"]
    name = ci["metadata"]["name"]
    plane.apply(objects, field_manager="gitops-tool")
    live = plane.get("cohortimport", name, NS)
    assert "status" not in live
    assert argo_health(live)[0] == "Progressing"
    assert flux_health(live) == "InProgress"

    # The operator adds its finalizer and reports Ready; then the tool applies Git again.
    operator_patch(plane, name, {"metadata": {"finalizers": ["cohorts.dev/cleanup"]}})
    operator_patch(plane, name, ready("True", "Scheduled", "Next run 2026-11-29T07:00:00Z", 1), status=True)
    # A person asks for a run now.
    plane.kubectl("annotate", "-n", NS, f"cohortimport/{name}", "cohorts.dev/run-requested-at=2026-11-28T10:00:00Z")
    before = plane.get("cohortimport", name, NS)
    plane.apply(objects, field_manager="gitops-tool")
    after = plane.get("cohortimport", name, NS)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["metadata"]["generation"] == 1
    assert after["metadata"]["finalizers"] == ["cohorts.dev/cleanup"]
    assert after["metadata"]["annotations"]["cohorts.dev/run-requested-at"] == "2026-11-28T10:00:00Z"
    assert argo_health(after) == ("Healthy", "Scheduled: Next run 2026-11-29T07:00:00Z")
    assert flux_health(after) == "Current"

    # A change in Git bumps the generation; until the operator sees it, both tools wait.
    ci["spec"]["cohort"]["name"] = "Churn risk (v2)"
    plane.apply(objects, field_manager="gitops-tool")
    changed = plane.get("cohortimport", name, NS)
    assert changed["metadata"]["generation"] == 2
    status, message = argo_health(changed)
    assert status == "Progressing" and "generation 2" in message
    assert flux_health(changed) == "InProgress"

    # The operator finds a problem, or holds a run for approval.
    operator_patch(plane, name, ready("False", "SecretNotFound",
                                      "Secret gitops/braze-data-import not found", 2), status=True)
    broken = plane.get("cohortimport", name, NS)
    assert argo_health(broken) == ("Degraded", "SecretNotFound: Secret gitops/braze-data-import not found")
    assert flux_health(broken) == "Failed"
    operator_patch(plane, name, ready("False", "Blocked", "Run r1 was blocked: 40% removals", 2), status=True)
    blocked = plane.get("cohortimport", name, NS)
    assert argo_health(blocked) == ("Degraded", "Blocked: Run r1 was blocked: 40% removals")
    assert flux_health(blocked) == "Failed"

    # A failed run waiting for its retry, or a missed one: it gets well by itself.
    for reason in ["RetryScheduled", "Missed"]:
        operator_patch(plane, name, ready("False", reason, "Run r2 failed; retry 1 of 3 at 06:35", 2), status=True)
        waiting = plane.get("cohortimport", name, NS)
        assert argo_health(waiting) == ("Progressing", f"{reason}: Run r2 failed; retry 1 of 3 at 06:35")
        assert flux_health(waiting) == "InProgress"

    # Unknown is still in progress.
    operator_patch(plane, name, ready("Unknown", "Running", "Run in progress", 2), status=True)
    running = plane.get("cohortimport", name, NS)
    assert argo_health(running)[0] == "Progressing"
    assert flux_health(running) == "InProgress"

    # Suspended through Git.
    ci["spec"]["suspend"] = True
    plane.apply(objects, field_manager="gitops-tool")
    # Until the operator has seen it, still in progress; then Suspended, which the operator
    # reports as Ready=False and both checks read as intended, not failed.
    pending = plane.get("cohortimport", name, NS)
    assert pending["metadata"]["generation"] == 3
    assert argo_health(pending)[0] == "Progressing"
    assert flux_health(pending) == "InProgress"
    operator_patch(plane, name, ready("False", "Suspended",
                                      "Suspended: no runs until spec.suspend is false", 3), status=True)
    suspended = plane.get("cohortimport", name, NS)
    assert argo_health(suspended) == ("Suspended", "Suspended: no runs until spec.suspend is false")
    assert flux_health(suspended) == "Current"

    # Status without a Ready condition yet: in progress, not healthy by default.
    operator_patch(plane, name, {"status": {"conditions": None}}, status=True)
    bare = plane.get("cohortimport", name, NS)
    ci["spec"].pop("suspend")
    assert argo_health({**bare, "spec": ci["spec"]})[0] == "Progressing"
    assert flux_health({**bare, "spec": ci["spec"]}) == "InProgress"

    # Clean up the finalizer so the namespace can go.
    operator_patch(plane, name, {"metadata": {"finalizers": None}})
