"""The rendered chart on a real kube-apiserver: every object is accepted, and the operator's
ServiceAccount can do exactly what the operator needs — checked with `kubectl auth can-i`
and with real requests, impersonating it and with its own TokenRequest token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import values_sets as vs
from chartlib import one
from cluster import ControlPlane, Response, install_chart, sa_user

CI = "/apis/cohorts.dev/v1alpha1/namespaces/{ns}/cohortimports"


@dataclass
class Install:
    plane: ControlPlane
    release: str
    namespace: str
    objects: list[dict[str, Any]]

    @property
    def sa(self) -> str:
        return one(self.objects, "ServiceAccount")["metadata"]["name"]

    @property
    def user(self) -> str:
        return sa_user(self.namespace, self.sa)

    @property
    def lease(self) -> str:
        arg = next(a for a in one(self.objects, "Deployment")["spec"]["template"]["spec"]
                   ["containers"][0]["args"] if a.startswith("--lease-name="))
        return arg.split("=", 1)[1]

    def can(self, verb: str, resource: str, namespace: str | None = None, *,
            name: str | None = None, subresource: str | None = None) -> bool:
        return self.plane.can_i(self.user, verb, resource, namespace, name, subresource)


def _install(plane: ControlPlane, values: dict[str, Any] | None, release: str) -> Install:
    namespace = f"cohort-{release}"
    # The teams' namespaces, and the one the full install keeps ClusterBrazeDestinations'
    # keys in (an administrator creates it, as for any namespace a value names).
    plane.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                 for ns in ("team-a", "team-b", "team-c", "cohort-keys")])
    objects = install_chart(plane, values, release=release, namespace=namespace)
    return Install(plane, release, namespace, objects)


@pytest.fixture(scope="module")
def confined(control_plane: ControlPlane) -> Install:
    return _install(control_plane, vs.CONFINED, "confined")


@pytest.fixture(scope="module")
def everywhere(control_plane: ControlPlane) -> Install:
    return _install(control_plane, vs.DEFAULT, "everywhere")


@pytest.fixture(scope="module")
def full(control_plane: ControlPlane) -> Install:
    return _install(control_plane, vs.FULL, "full")


def seed(plane: ControlPlane, ns: str) -> None:
    """A CohortImport, its Secret and a ConfigMap source in `ns`, as a team would apply."""
    plane.apply([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "braze-data-import", "namespace": ns},
         "stringData": {"data-import-key": "not-a-real-key"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "members", "namespace": ns},
         "data": {"members.txt": "user-1\nuser-2\n"}},
        {"apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
         "metadata": {"name": "churn-risk", "namespace": ns},
         "spec": {
             "cohort": {"id": f"{ns}-churn-risk", "name": "Churn risk"},
             "source": {"configMap": {"name": "members", "key": "members.txt",
                                      "format": "Lines", "column": "id"}},
             "identifiers": {"externalId": "id"},
             "destination": {"braze": {
                 "restEndpoint": "https://rest.iad-01.braze.com", "partner": "kubit",
                 "dataImportKeySecretRef": {"name": "braze-data-import", "key": "data-import-key"}}},
             "schedule": {"cadence": "Daily", "at": "02:00", "timeZone": "America/New_York"},
         }},
    ])


# --- every rendered object is accepted -----------------------------------------------------

@pytest.mark.parametrize("which", ["confined", "everywhere", "full"])
def test_the_server_accepts_and_keeps_the_hardened_pod(which: str, request: pytest.FixtureRequest) -> None:
    install: Install = request.getfixturevalue(which)
    rendered = one(install.objects, "Deployment")
    live = install.plane.get("deployment", rendered["metadata"]["name"], install.namespace)
    want, got = rendered["spec"]["template"]["spec"], live["spec"]["template"]["spec"]
    assert got["securityContext"] == want["securityContext"]
    assert got["containers"][0]["securityContext"] == want["containers"][0]["securityContext"]
    assert got["containers"][0]["args"] == want["containers"][0]["args"]
    assert got["containers"][0]["resources"] == want["containers"][0]["resources"]
    assert got["serviceAccountName"] == install.sa
    # The PodDisruptionBudget went in too (as policy/v1beta1 on this 1.20 server).
    pdb = one(install.objects, "PodDisruptionBudget")["metadata"]["name"]
    install.plane.get("poddisruptionbudget", pdb, install.namespace)


# --- confined to watched namespaces ------------------------------------------------------

def test_confined_operator_can_do_its_job_in_watched_namespaces(confined: Install) -> None:
    for ns in ("team-a", "team-b"):
        for verb in ("get", "list", "watch", "patch"):
            assert confined.can(verb, "cohortimports.cohorts.dev", ns), (verb, ns)
        for verb in ("get", "patch"):
            assert confined.can(verb, "cohortimports.cohorts.dev", ns, subresource="status")
        for verb in ("get", "list", "watch"):
            assert confined.can(verb, "secrets", ns), (verb, ns)
        for verb in ("get", "list", "watch", "create", "update", "delete", "deletecollection"):
            assert confined.can(verb, "configmaps", ns), (verb, ns)
        for verb in ("create", "patch"):
            assert confined.can(verb, "events.events.k8s.io", ns), (verb, ns)
    assert confined.can("create", "leases.coordination.k8s.io", confined.namespace)
    for verb in ("get", "patch"):
        assert confined.can(verb, "leases.coordination.k8s.io", confined.namespace, name=confined.lease)


@pytest.mark.parametrize("verb, resource, where", [
    # Secrets outside the watched namespaces, including its own and kube-system.
    ("get", "secrets", "kube-system"),
    ("list", "secrets", "kube-system"),
    ("get", "secrets", "team-c"),
    ("get", "secrets", "cohort-confined"),
    ("get", "secrets", "default"),
    ("list", "secrets", None),
    ("watch", "secrets", None),
    # CohortImports elsewhere, and any write people own.
    ("list", "cohortimports.cohorts.dev", None),
    ("get", "cohortimports.cohorts.dev", "team-c"),
    ("patch", "cohortimports.cohorts.dev", "team-c"),
    ("create", "cohortimports.cohorts.dev", "team-a"),
    ("update", "cohortimports.cohorts.dev", "team-a"),
    ("delete", "cohortimports.cohorts.dev", "team-a"),
    ("deletecollection", "cohortimports.cohorts.dev", "team-a"),
    # Secrets are only read.
    ("create", "secrets", "team-a"),
    ("update", "secrets", "team-a"),
    ("patch", "secrets", "team-a"),
    ("delete", "secrets", "team-a"),
    # ConfigMaps: snapshots are created and replaced, never patched; none outside.
    ("patch", "configmaps", "team-a"),
    ("get", "configmaps", "kube-system"),
    ("create", "configmaps", "team-c"),
    ("create", "events.events.k8s.io", "team-c"),
    ("create", "events", "team-a"),  # core/v1 events: the recorder uses events.k8s.io
    # Leases: only its own, only in its namespace.
    ("create", "leases.coordination.k8s.io", "team-a"),
    ("create", "leases.coordination.k8s.io", "kube-system"),
    ("list", "leases.coordination.k8s.io", "cohort-confined"),
    ("delete", "leases.coordination.k8s.io", "cohort-confined"),
    # Nothing else.
    ("list", "pods", "team-a"),
    ("create", "pods", "team-a"),
    ("list", "namespaces", None),
    ("list", "nodes", None),
    ("create", "serviceaccounts/token", "cohort-confined"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "team-a"),
    ("impersonate", "users", None),
    ("escalate", "roles.rbac.authorization.k8s.io", "team-a"),
])
def test_confined_operator_cannot(confined: Install, verb: str, resource: str, where: str | None) -> None:
    assert not confined.can(verb, resource, where), f"{confined.user} may {verb} {resource} in {where}"


def test_confined_operator_cannot_touch_another_lease(confined: Install) -> None:
    for verb in ("get", "update", "patch", "delete"):
        assert not confined.can(verb, "leases.coordination.k8s.io", confined.namespace, name="someone-else")
    for verb in ("update", "delete"):
        assert not confined.can(verb, "leases.coordination.k8s.io", confined.namespace, name=confined.lease)


def _ok(resp: Response, *codes: int) -> None:
    assert resp.status in codes, f"{resp.status}: {resp.body.get('message', resp.body)}"


@pytest.mark.parametrize("identity", ["impersonated", "token"])
def test_confined_operator_real_requests(confined: Install, identity: str) -> None:
    plane = confined.plane
    seed(plane, "team-a")
    seed(plane, "team-c")
    if identity == "token":
        token = plane.sa_token(confined.namespace, confined.sa)
        auth: dict[str, Any] = {"token": token}
    else:
        auth = {"as_user": confined.user}

    def req(method: str, path: str, body: Any = None, content_type: str = "application/json") -> Response:
        return plane.request(method, path, body, content_type=content_type, **auth)

    imports = CI.format(ns="team-a")
    # Lists and watches its imports.
    _ok(req("GET", imports), 200)
    _ok(req("GET", imports + "?watch=true&timeoutSeconds=1"), 200)
    before = plane.get("cohortimport", "churn-risk", "team-a")

    # Adds and removes its finalizer: metadata only, the generation does not move.
    fin = {"metadata": {"finalizers": ["cohorts.dev/chart-test"]}}
    _ok(req("PATCH", f"{imports}/churn-risk", fin, "application/merge-patch+json"), 200)
    _ok(req("PATCH", f"{imports}/churn-risk", {"metadata": {"finalizers": None}},
            "application/merge-patch+json"), 200)

    # Writes status through the status subresource; a spec in that patch is ignored.
    status = {"status": {"observedGeneration": before["metadata"]["generation"],
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Scheduled",
                                         "message": "next run at 02:00",
                                         "lastTransitionTime": "2026-11-28T00:00:00Z"}]},
              "spec": {"cohort": {"id": "hijacked", "name": "Hijacked"}}}
    _ok(req("PATCH", f"{imports}/churn-risk/status", status, "application/merge-patch+json"), 200)
    after = plane.get("cohortimport", "churn-risk", "team-a")
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["status"]["conditions"][0]["reason"] == "Scheduled"

    # Cannot replace, create or delete imports.
    _ok(req("PUT", f"{imports}/churn-risk", after), 403)
    _ok(req("DELETE", f"{imports}/churn-risk"), 403)
    _ok(req("POST", imports, {**after, "metadata": {"name": "another"}}), 403)

    # Reads the Secrets of watched namespaces, and no others.
    _ok(req("GET", "/api/v1/namespaces/team-a/secrets/braze-data-import"), 200)
    _ok(req("GET", "/api/v1/namespaces/team-c/secrets/braze-data-import"), 403)
    _ok(req("GET", "/api/v1/namespaces/kube-system/secrets"), 403)
    _ok(req("GET", "/api/v1/secrets"), 403)
    _ok(req("GET", CI.format(ns="team-c")), 403)

    # Reads ConfigMap sources and keeps snapshot ConfigMaps.
    _ok(req("GET", "/api/v1/namespaces/team-a/configmaps/members"), 200)
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": f"cohort-snapshot-test-{identity}",
                       "labels": {"cohorts.dev/snapshot-of": f"test-{identity}"}},
          "data": {"snapshot.json": "{}"}}
    _ok(req("POST", "/api/v1/namespaces/team-a/configmaps", cm), 201)
    cm["data"]["snapshot.json"] = '{"generation": 2}'
    _ok(req("PUT", f"/api/v1/namespaces/team-a/configmaps/{cm['metadata']['name']}", cm), 200)
    _ok(req("DELETE", f"/api/v1/namespaces/team-a/configmaps?labelSelector=cohorts.dev/snapshot-of=test-{identity}"), 200)
    _ok(req("POST", "/api/v1/namespaces/team-c/configmaps", cm), 403)

    # Records events on its imports.
    event = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
             "metadata": {"name": f"churn-risk.{identity}", "namespace": "team-a"},
             "eventTime": "2026-11-28T00:00:00.000000Z", "type": "Normal",
             "reason": "RunSucceeded", "action": "Import", "note": "2 members, +2 -0",
             "reportingController": "cohorts.dev/cohort-operator",
             "reportingInstance": "cohort-operator-0",
             "regarding": {"apiVersion": "cohorts.dev/v1alpha1", "kind": "CohortImport",
                           "namespace": "team-a", "name": "churn-risk", "uid": after["metadata"]["uid"]}}
    _ok(req("POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", event), 201)
    _ok(req("PATCH", f"/apis/events.k8s.io/v1/namespaces/team-a/events/churn-risk.{identity}",
            {"series": {"count": 2, "lastObservedTime": "2026-11-28T00:01:00.000000Z"}},
            "application/merge-patch+json"), 200)
    _ok(req("POST", "/apis/events.k8s.io/v1/namespaces/team-c/events",
            {**event, "metadata": {"name": "x", "namespace": "team-c"}}), 403)

    # Creates, takes and renews its Lease the way kube-lease-manager does, in its namespace only.
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{confined.namespace}/leases"
    lease = f"{leases}/{confined.lease}"
    plane.request("DELETE", lease)  # as the administrator: each identity starts afresh
    _ok(req("GET", lease), 404)
    _ok(req("POST", leases, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                             "metadata": {"name": confined.lease}, "spec": {}}), 201)
    _ok(req("GET", lease), 200)
    take = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "spec": {"holderIdentity": f"pod-{identity}", "leaseDurationSeconds": 15,
                     "acquireTime": "2026-11-28T00:00:00.000000Z",
                     "renewTime": "2026-11-28T00:00:00.000000Z"}}
    _ok(req("PATCH", lease + "?fieldManager=cohort-operator-lease", take, "application/apply-patch+yaml"), 200)
    renew = {"spec": {"renewTime": "2026-11-28T00:00:10.000000Z", "leaseDurationSeconds": 15}}
    _ok(req("PATCH", lease + "?fieldManager=cohort-operator-lease", renew,
            "application/strategic-merge-patch+json"), 200)
    assert plane.get("lease", confined.lease, confined.namespace)["spec"]["holderIdentity"] == f"pod-{identity}"
    _ok(req("PUT", lease, plane.get("lease", confined.lease, confined.namespace)), 403)
    _ok(req("GET", f"/apis/coordination.k8s.io/v1/namespaces/team-a/leases/{confined.lease}"), 403)
    _ok(req("DELETE", lease), 403)


# --- every namespace (the default) -------------------------------------------------------

def test_default_operator_works_in_every_namespace(everywhere: Install) -> None:
    for verb in ("list", "watch"):
        assert everywhere.can(verb, "cohortimports.cohorts.dev", None)
    assert everywhere.can("patch", "cohortimports.cohorts.dev", "team-c", subresource="status")
    assert everywhere.can("create", "configmaps", "team-c")
    assert everywhere.can("create", "events.events.k8s.io", "team-c")
    # Secrets: by name, in any namespace (the imports' keys), and nothing more.
    assert everywhere.can("get", "secrets", "team-c")
    assert "--watch-secrets=false" in one(everywhere.objects, "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]


@pytest.mark.parametrize("identity", ["impersonated", "token"])
def test_default_operator_cannot_list_or_watch_secrets(everywhere: Install, identity: str) -> None:
    plane = everywhere.plane
    seed(plane, "team-c")
    auth: dict[str, Any] = ({"token": plane.sa_token(everywhere.namespace, everywhere.sa)} if identity == "token"
                            else {"as_user": everywhere.user})
    for verb in ("list", "watch"):
        assert not everywhere.can(verb, "secrets", None), verb
        for ns in ("team-c", "kube-system", everywhere.namespace):
            assert not everywhere.can(verb, "secrets", ns), (verb, ns)
    for path in ("/api/v1/secrets", "/api/v1/namespaces/kube-system/secrets", "/api/v1/namespaces/team-c/secrets",
                 "/api/v1/namespaces/team-c/secrets?watch=true&timeoutSeconds=1",
                 "/api/v1/secrets?watch=true&timeoutSeconds=1"):
        _ok(plane.request("GET", path, **auth), 403)
    # What an import names is read by name.
    _ok(plane.request("GET", "/api/v1/namespaces/team-c/secrets/braze-data-import", **auth), 200)


@pytest.mark.parametrize("verb, resource, where", [
    ("create", "cohortimports.cohorts.dev", "team-a"),
    ("update", "cohortimports.cohorts.dev", "team-a"),
    ("delete", "cohortimports.cohorts.dev", "team-a"),
    ("create", "secrets", "team-a"),
    ("delete", "secrets", "kube-system"),
    ("list", "secrets", None),
    ("watch", "secrets", "team-a"),
    ("patch", "configmaps", "team-a"),
    ("create", "leases.coordination.k8s.io", "team-a"),
    ("list", "pods", None),
    ("list", "namespaces", None),
])
def test_default_operator_still_cannot(everywhere: Install, verb: str, resource: str, where: str | None) -> None:
    assert not everywhere.can(verb, resource, where)


def test_status_is_patched_never_replaced(everywhere: Install) -> None:
    assert not everywhere.can("update", "cohortimports.cohorts.dev", "team-a", subresource="status")


# --- filesystem snapshots, HA, renamed lease ----------------------------------------------

def test_full_install_network_policy_is_accepted(full: Install) -> None:
    rendered = one(full.objects, "NetworkPolicy")
    live = full.plane.get("networkpolicy", rendered["metadata"]["name"], full.namespace)
    assert live["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert live["spec"]["egress"] == rendered["spec"]["egress"]
    assert live["spec"]["podSelector"] == rendered["spec"]["podSelector"]


def test_full_install_reads_configmaps_but_keeps_no_snapshots_in_them(full: Install) -> None:
    assert full.lease == "cohort-leader"
    for ns in ("team-a", "team-b"):
        assert full.can("get", "configmaps", ns)
        for verb in ("create", "update", "patch", "delete", "deletecollection"):
            assert not full.can(verb, "configmaps", ns), verb
    assert full.can("patch", "leases.coordination.k8s.io", full.namespace, name="cohort-leader")
    assert not full.can("patch", "leases.coordination.k8s.io", full.namespace, name="full-cohort-operator")
    assert not full.can("get", "secrets", "team-c")
    # The snapshot claim was created, and kept through uninstall.
    pvc = one(full.objects, "PersistentVolumeClaim")["metadata"]["name"]
    live = full.plane.get("persistentvolumeclaim", pvc, full.namespace)
    assert live["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


# --- people's roles -----------------------------------------------------------------------

def test_user_roles_grant_edit_and_view_of_cohortimports(confined: Install) -> None:
    plane = confined.plane
    plane.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": f"alice-{role}", "namespace": "team-a"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": f"{confined.release}-cohort-operator-{role}"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
        for role, user in (("edit", "alice"), ("view", "bob"))
    ])
    for verb in ("create", "patch", "update", "delete", "get", "list"):
        assert plane.can_i("alice", verb, "cohortimports.cohorts.dev", "team-a"), verb
    assert not plane.can_i("alice", "patch", "cohortimports.cohorts.dev", "team-a", subresource="status")
    assert not plane.can_i("alice", "get", "secrets", "team-a")
    assert plane.can_i("bob", "list", "cohortimports.cohorts.dev", "team-a")
    assert not plane.can_i("bob", "patch", "cohortimports.cohorts.dev", "team-a")
    # The aggregation labels are on the live objects (the aggregation itself is done by
    # kube-controller-manager, which this test server does not run).
    live = plane.get("clusterrole", f"{confined.release}-cohort-operator-edit")
    assert live["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
