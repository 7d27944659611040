"""The chart, rendered by Helm v4's library: lint, objects, pod hardening, args, RBAC shape."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import pytest

import values_sets as vs
from chartlib import NAMESPACE, RELEASE, find, lint, notes, one, render

FULLNAME = f"{RELEASE}-cohort-operator"


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    return pod["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.mark.parametrize("name", vs.ALL)
def test_lint_is_clean(name: str) -> None:
    report = lint(vs.ALL[name])
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_default_install_objects() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render())
    assert kinds == sorted([
        ("ServiceAccount", FULLNAME),
        ("ClusterRole", FULLNAME),
        ("ClusterRoleBinding", FULLNAME),
        ("ClusterRole", f"{FULLNAME}-edit"),
        ("ClusterRole", f"{FULLNAME}-view"),
        ("Role", f"{FULLNAME}-leader-election"),
        ("RoleBinding", f"{FULLNAME}-leader-election"),
        ("Deployment", FULLNAME),
        ("Service", f"{FULLNAME}-metrics"),
        ("Service", f"{FULLNAME}-triggers"),
        ("PodDisruptionBudget", FULLNAME),
    ])
    for o in render():
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]


@pytest.mark.parametrize("name", vs.ALL)
def test_pod_is_hardened(name: str) -> None:
    objects = render(vs.ALL[name])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True

    c = container(objects)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}

    for kind in ("requests", "limits"):
        assert set(c["resources"][kind]) >= {"cpu", "memory"}, c["resources"]

    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert f"--metrics-addr=0.0.0.0:{port}" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # The read-only root filesystem leaves /tmp for sorting: an emptyDir with a size limit.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
    # Every Secret is mounted read-only.
    for m in c["volumeMounts"]:
        if "secret" in volumes[m["name"]]:
            assert m.get("readOnly") is True, m


def test_default_args_and_env() -> None:
    objects = render()
    c = container(objects)
    assert c["image"] == "ghcr.io/cohorts-dev/cohort-operator:0.2.0"
    assert c["args"] == [
        "run",
        "--metrics-addr=0.0.0.0:8080",
        "--trigger-addr=0.0.0.0:9292",
        "--log-format=json",
        "--starting-deadline-seconds=3600",
        "--max-concurrent-runs=16",
        "--max-concurrent-runs-per-namespace=4",
        "--max-run-attempts=3",
        "--run-timeout-seconds=21600",
        "--min-cron-interval-minutes=5",
        "--memory-budget-mib=384",
        "--pagerduty-events-url=https://events.pagerduty.com/v2/enqueue",
        "--max-source-page-bytes=33554432",
        "--watch-secrets=false",
        "--egress-default=allow",
        "--leader-election",
        "--lease-namespace=$(POD_NAMESPACE)",
        f"--lease-name={FULLNAME}",
        "--lease-duration-seconds=15",
        "--lease-renew-grace-seconds=5",
        "--braze-requests-per-hour=250000",
        "--braze-burst=250000",
        "--braze-max-budget-wait-seconds=3600",
        "--kube-api-qps=500",
        "--kube-api-burst=1000",
        "--snapshot-store=cluster",
    ]
    env = env_of(c)
    assert env["RUST_LOG"] == "info"
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not [k for k in env if k.startswith("COHORT_")], env
    assert one(objects, "Deployment")["spec"]["replicas"] == 1
    assert one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_full_values_args_env_and_mounts() -> None:
    objects = render(vs.FULL)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    assert deployment["spec"]["replicas"] == 2
    assert c["image"] == "registry.example.com/cohort-operator@sha256:" + "ab" * 32
    assert c["args"] == [
        "run",
        "--metrics-addr=0.0.0.0:9090",
        "--trigger-addr=0.0.0.0:9292",
        "--log-format=text",
        "--starting-deadline-seconds=600",
        "--max-concurrent-runs=4",
        "--max-concurrent-runs-per-namespace=2",
        "--max-run-attempts=5",
        "--run-timeout-seconds=7200",
        "--min-cron-interval-minutes=10",
        "--memory-budget-mib=768",
        "--pagerduty-events-url=https://events.pagerduty.com/v2/enqueue",
        "--max-source-page-bytes=33554432",
        "--destination-secret-namespace=cohort-keys",
        "--watch-namespaces=team-a,team-b",
        "--egress-deny=10.96.0.0/12,*.internal.example",
        "--egress-allow=169.254.10.10,10.20.0.0/16",
        "--egress-default=deny",
        "--notification-deny-cidr=10.0.0.0/8,fd00::/8",
        "--watch-label-selector=!cohorts.dev/shard",
        "--partner-keys-dir=/etc/cohort-operator/partner-keys",
        "--braze-endpoint-region=https://rest.fra-09.braze.eu=eu",
        "--braze-endpoint-region=https://rest.iad-99.braze.com=us",
        "--leader-election",
        "--lease-namespace=$(POD_NAMESPACE)",
        "--lease-name=cohort-leader",
        "--lease-duration-seconds=30",
        "--lease-renew-grace-seconds=8",
        "--braze-requests-per-hour=250000",
        "--braze-burst=250000",
        "--braze-max-budget-wait-seconds=600",
        "--kube-api-qps=500",
        "--kube-api-burst=1000",
        "--snapshot-store=filesystem",
        "--snapshot-dir=/var/lib/cohort-operator/snapshots",
    ]
    env = env_of(c)
    assert env["RUST_LOG"] == "info,cohort_operator=debug"
    assert env["COHORT_SMTP_HOST"] == "smtp.example.com"
    assert env["COHORT_SMTP_PORT"] == "465"
    assert env["COHORT_SMTP_TLS"] == "implicit"
    assert env["COHORT_SMTP_USERNAME"] == "cohorts"
    assert env["COHORT_SMTP_FROM"] == "Cohort imports <cohorts@example.com>"
    assert env["COHORT_SMTP_PASSWORD_FILE"] == "/etc/cohort-operator/smtp/password"
    assert env["COHORT_SMTP_CA_FILE"] == "/etc/cohort-operator/smtp-ca/ca.crt"
    assert env["COHORT_SMTP_TIMEOUT_SECONDS"] == "30"
    assert env["COHORT_SMTP_RETRIES"] == "5"
    assert env["EXTRA"] == "1"
    assert pod["priorityClassName"] == "platform"

    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    smtp = volumes[mounts["/etc/cohort-operator/smtp"]["name"]]["secret"]
    assert smtp["secretName"] == "smtp-credentials"
    assert smtp["items"] == [{"key": "pass", "path": "password"}]
    ca = volumes[mounts["/etc/cohort-operator/smtp-ca"]["name"]]["configMap"]
    assert ca == {"name": "smtp-relay-ca", "items": [{"key": "relay.pem", "path": "ca.crt"}]}
    keys = volumes[mounts["/etc/cohort-operator/partner-keys"]["name"]]["secret"]
    assert keys["secretName"] == "braze-partner-keys" and "items" not in keys
    snapshots = volumes[mounts["/var/lib/cohort-operator/snapshots"]["name"]]
    pvc = one(objects, "PersistentVolumeClaim")
    assert snapshots["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "shared"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["sizeLimit"] == "8Gi"

    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"metrics": 9090, "triggers": 9292}


@pytest.mark.parametrize(("values", "flag"), [
    ({"maxConcurrentRunsPerNamespace": 1}, "--max-concurrent-runs-per-namespace=1"),
    ({"maxRunAttempts": 1}, "--max-run-attempts=1"),
    ({"runTimeoutSeconds": 900}, "--run-timeout-seconds=900"),
    ({"minCronIntervalMinutes": 15}, "--min-cron-interval-minutes=15"),
    ({"pagerDutyEventsUrl": "https://events.eu.pagerduty.com/v2/enqueue"},
     "--pagerduty-events-url=https://events.eu.pagerduty.com/v2/enqueue"),
    ({"memoryBudgetMiB": 1536}, "--memory-budget-mib=1536"),
    ({"maxSourcePageBytes": 8388608}, "--max-source-page-bytes=8388608"),
    ({"braze": {"maxBudgetWaitSeconds": 60}}, "--braze-max-budget-wait-seconds=60"),
])
def test_operator_limits_render_as_their_flags(values: dict[str, Any], flag: str) -> None:
    """Each limit a platform team sets reaches the operator as its flag, once, in every shard."""
    objects = render({**values, "shards": ["a", "b"]})
    for deployment in find(objects, "Deployment"):
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        name = flag.split("=", 1)[0]
        assert [a for a in args if a.startswith(name + "=")] == [flag], args


def test_secrets_never_reach_env_or_args() -> None:
    c = container(render(vs.FULL))
    for e in c["env"]:
        assert "secretKeyRef" not in e.get("valueFrom", {}), e
    assert not any("password" in a.lower() for a in c["args"])


def test_no_leader_election_means_recreate_and_no_lease_rbac() -> None:
    objects = render(vs.NO_LEADER)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in container(objects)["args"] if "lease" in a or "leader" in a]
    assert not find(objects, "Role")


@pytest.mark.parametrize("values, message", [
    ({"replicas": 2, "leaderElection": {"enabled": False}}, "needs leaderElection.enabled=true"),
    ({"replicas": 2, "snapshots": {"store": "filesystem"}}, "ReadWriteMany"),
    ({"smtp": {"enabled": True, "host": "smtp.example.com"}}, "smtp.host and smtp.from"),
    ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
    ({"leaderElection": {"leaseDurationSeconds": 5, "renewGraceSeconds": 5}},
     "renewGraceSeconds must be below leaderElection.leaseDurationSeconds"),
])
def test_inconsistent_values_fail_with_the_fix(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_filesystem_ha_with_an_existing_claim_is_allowed() -> None:
    values = {"replicas": 2, "snapshots": {"store": "filesystem",
                                           "filesystem": {"existingClaim": "shared-snapshots"}}}
    objects = render(values)
    assert not find(objects, "PersistentVolumeClaim")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == ["shared-snapshots"]


def test_metrics_service_servicemonitor_and_pdb_select_the_pods() -> None:
    objects = render(vs.FULL)
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090,
                                         "targetPort": "metrics", "protocol": "TCP"}]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "honorLabels": True,
                                             "interval": "1m", "scrapeTimeout": "10s"}]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert not find(render(), "ServiceMonitor")


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule or role["kind"] == "Role", rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# In each listed namespace (watchNamespaces set).
OPERATOR_RULES = {
    ("cohorts.dev", "cohortimports"): {"get", "list", "watch", "patch"},
    ("cohorts.dev", "cohortimports/status"): {"get", "patch"},
    ("cohorts.dev", "cohorttriggers"): {"get", "list", "watch"},
    ("cohorts.dev", "cohorttriggers/status"): {"get", "update", "patch"},
    ("cohorts.dev", "brazedestinations"): {"get", "list", "watch"},
    ("cohorts.dev", "brazedestinations/status"): {"get", "patch"},
    ("", "secrets"): {"get", "list", "watch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "update", "delete", "deletecollection"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# Cluster-wide (the default): Secrets by name only.
CLUSTER_RULES = {**OPERATOR_RULES, ("", "secrets"): {"get"}}
# With clusterDestinations.enabled: cluster destinations and Namespace labels, nothing else
# cluster-wide.
CLUSTER_DESTINATION_RULES = {
    ("cohorts.dev", "clusterbrazedestinations"): {"get", "list", "watch"},
    ("cohorts.dev", "clusterbrazedestinations/status"): {"get", "patch"},
    ("", "namespaces"): {"get", "list", "watch"},
}


def test_default_rbac_is_one_cluster_role_with_only_the_operators_verbs() -> None:
    objects = render()
    role = one(objects, "ClusterRole", FULLNAME)
    assert rules_of(role) == CLUSTER_RULES
    binding = one(objects, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME,
                                    "namespace": NAMESPACE}]


def test_watched_namespaces_get_a_role_each_and_nothing_cluster_wide() -> None:
    objects = render(vs.CONFINED)
    assert [r["metadata"]["name"] for r in find(objects, "ClusterRole")] == \
        [f"{FULLNAME}-edit", f"{FULLNAME}-view"]
    assert not find(objects, "ClusterRoleBinding")
    assert "--destination-secret-namespace" not in " ".join(container(objects)["args"])
    for ns in ("team-a", "team-b"):
        assert rules_of(one(objects, "Role", FULLNAME, ns)) == OPERATOR_RULES
        binding = one(objects, "RoleBinding", FULLNAME, ns)
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME,
                                        "namespace": NAMESPACE}]
    namespaces = {o["metadata"].get("namespace") for o in find(objects, "Role")}
    assert namespaces == {"team-a", "team-b", NAMESPACE}


@pytest.mark.parametrize("secret_namespace, expected", [("", NAMESPACE), ("cohort-keys", "cohort-keys")])
def test_cluster_destinations_are_off_unless_enabled_and_then_read_only_their_namespace(
    secret_namespace: str, expected: str
) -> None:
    assert not [o for o in render() if "destination" in o["metadata"]["name"]]
    enabled = {"clusterDestinations": {"enabled": True, "secretNamespace": secret_namespace}}
    objects = render({**vs.CONFINED, **enabled})
    # Cluster-wide only what cluster destinations need: themselves and Namespace labels.
    assert rules_of(one(objects, "ClusterRole", f"{FULLNAME}-cluster-destinations")) == CLUSTER_DESTINATION_RULES
    assert [b["metadata"]["name"] for b in find(objects, "ClusterRoleBinding")] == \
        [f"{FULLNAME}-cluster-destinations"]
    # Their keys: Secrets of the one namespace, by name.
    secrets = one(objects, "Role", f"{FULLNAME}-destination-secrets", expected)
    assert rules_of(secrets) == {("", "secrets"): {"get"}}
    assert f"--destination-secret-namespace={expected}" in container(objects)["args"]


def test_filesystem_snapshots_leave_configmaps_read_only() -> None:
    objects = render({"snapshots": {"store": "filesystem"}})
    rules = rules_of(one(objects, "ClusterRole", FULLNAME))
    assert rules[("", "configmaps")] == {"get", "list", "watch"}


def test_lease_role_is_in_the_release_namespace_and_names_the_lease() -> None:
    objects = render(vs.FULL)
    role = one(objects, "Role", f"{FULLNAME}-leader-election", NAMESPACE)
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["cohort-leader"], "verbs": ["get", "patch"]},
    ]
    assert "--lease-name=cohort-leader" in container(objects)["args"]


def test_user_roles_aggregate_into_edit_and_view() -> None:
    objects = render()
    edit = one(objects, "ClusterRole", f"{FULLNAME}-edit")
    view = one(objects, "ClusterRole", f"{FULLNAME}-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in view["metadata"]["labels"]
    assert rules_of(view)[("cohorts.dev", "cohortimports")] == {"get", "list", "watch"}
    assert {"create", "update", "patch", "delete"} <= rules_of(edit)[("cohorts.dev", "cohortimports")]
    # People read status; only the operator writes it.
    assert rules_of(edit)[("cohorts.dev", "cohortimports/status")] == {"get"}
    assert rules_of(edit)[("cohorts.dev", "cohorttriggers/status")] == {"get"}
    assert {"create", "delete"} <= rules_of(edit)[("cohorts.dev", "cohorttriggers")]
    assert rules_of(view)[("cohorts.dev", "cohorttriggers")] == {"get", "list", "watch"}
    # A namespace's own destinations are its users'; cluster destinations are not.
    assert {"create", "delete"} <= rules_of(edit)[("cohorts.dev", "brazedestinations")]
    assert rules_of(edit)[("cohorts.dev", "brazedestinations/status")] == {"get"}
    assert rules_of(view)[("cohorts.dev", "brazedestinations")] == {"get", "list", "watch"}
    for role in (edit, view):
        assert not [r for r in rules_of(role) if r[1].startswith("clusterbrazedestinations")]
    assert not find(render({"rbac": {"userRoles": False}}), "ClusterRole", f"{FULLNAME}-edit")


def test_rbac_and_service_account_can_be_brought_by_the_user() -> None:
    objects = render({"rbac": {"create": False},
                      "serviceAccount": {"create": False, "name": "platform-operator"}})
    kinds = {o["kind"] for o in objects}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"


def test_names_follow_overrides() -> None:
    objects = render({"fullnameOverride": "cohorts"})
    assert one(objects, "Deployment")["metadata"]["name"] == "cohorts"
    assert "--lease-name=cohorts" in container(objects)["args"]


def test_notes_say_what_is_watched() -> None:
    assert "every namespace" in notes()
    text = notes(copy.deepcopy(vs.FULL))
    assert "team-a, team-b (a Role in each)" in text
    assert "No partnerKeys.secretName" not in text


def test_network_policy_is_optional_and_lets_only_what_the_operator_needs() -> None:
    assert not find(render(), "NetworkPolicy")
    objects = render(vs.FULL)
    policy = one(objects, "NetworkPolicy", FULLNAME, NAMESPACE)["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}],
                                  "from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
                                 {"ports": [{"port": "triggers", "protocol": "TCP"}]}]
    dns, api, https, smtp, warehouse = policy["egress"]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert api == {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 6443, "protocol": "TCP"}]}
    # Braze is public HTTPS: never private, link-local or metadata ranges.
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}]
    v4 = https["to"][0]["ipBlock"]
    assert v4["cidr"] == "0.0.0.0/0" and {"169.254.0.0/16", "10.0.0.0/8", "100.64.0.0/10"} <= set(v4["except"])
    assert "fe80::/10" in https["to"][1]["ipBlock"]["except"]
    assert smtp["ports"] == [{"port": 465, "protocol": "TCP"}]
    assert warehouse == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 5439, "protocol": "TCP"}]}
    # Without SMTP or sources, only DNS, the API server and HTTPS; metrics open to the cluster.
    minimal = render({"networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}}})
    policy = one(minimal, "NetworkPolicy")["spec"]
    assert len(policy["egress"]) == 3
    assert policy["ingress"][0]["from"] == [{"namespaceSelector": {}}]


def test_trigger_port_has_its_own_service_and_can_be_turned_off() -> None:
    objects = render()
    c = container(objects)
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", f"{FULLNAME}-triggers")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "triggers", "port": 80, "targetPort": "triggers", "protocol": "TCP"}]
    assert {"name": "triggers", "containerPort": 9292, "protocol": "TCP"} in c["ports"]
    # Never the metrics port.
    assert one(objects, "Service", f"{FULLNAME}-metrics")["spec"]["ports"][0]["targetPort"] == "metrics"
    off = render({"triggers": {"enabled": False}})
    assert not find(off, "Service", f"{FULLNAME}-triggers")
    assert not [a for a in container(off)["args"] if a.startswith("--trigger-addr")]
    assert [p["name"] for p in container(off)["ports"]] == ["metrics"]
    # Who may call can be narrowed by the NetworkPolicy.
    peers = [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]
    narrowed = render({"networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]},
                                          "triggersFrom": peers}})
    assert one(narrowed, "NetworkPolicy")["spec"]["ingress"][1] == {
        "ports": [{"port": "triggers", "protocol": "TCP"}], "from": peers}


def test_network_policy_needs_the_api_server_addresses() -> None:
    with pytest.raises(helm.HelmRenderError, match="networkPolicy.apiServer.cidrs"):
        render({"networkPolicy": {"enabled": True}})


def test_egress_values_become_flags() -> None:
    args = container(render({"egress": {"deny": ["127.0.0.2/32"], "default": "allow"}}))["args"]
    assert "--egress-deny=127.0.0.2/32" in args and "--egress-default=allow" in args
    assert not [a for a in args if a.startswith("--egress-allow")]
