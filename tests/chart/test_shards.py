"""Shards in the chart (issue 16): `shards: [...]` renders one Deployment per shard, each with
its own Lease and shard args, exactly one default shard, RBAC shared; on a real API server the
ServiceAccount may take and renew every shard's Lease (and read the others', to hand a moved
import's run over) and no other."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from chartlib import NAMESPACE, RELEASE, find, lint, one, render, validate
from cluster import ControlPlane, install_chart, sa_user

FULLNAME = f"{RELEASE}-cohort-operator"
SHARDS = ["alpha", "beta", "gamma"]


def args_of(deployment: dict[str, Any]) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def arg(deployment: dict[str, Any], flag: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args_of(deployment) if a.startswith(f"{flag}=")), None)


def lease_of(deployment: dict[str, Any]) -> str:
    """The Lease the operator elects on: --lease-name, suffixed with -<shard> when sharded."""
    base = arg(deployment, "--lease-name")
    shard = arg(deployment, "--shard")
    assert base
    return f"{base}-{shard}" if shard else base


def test_no_shards_renders_one_deployment_as_before() -> None:
    objects = render()
    deployment = one(objects, "Deployment", FULLNAME)
    assert arg(deployment, "--shard") is None and "--shard-default" not in args_of(deployment)
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "cohort-operator",
        "app.kubernetes.io/instance": RELEASE,
    }
    role = one(objects, "Role", f"{FULLNAME}-leader-election")
    assert role["rules"][1]["resourceNames"] == [FULLNAME]


def test_n_shards_render_n_deployments_with_distinct_leases_and_one_default() -> None:
    objects = render({"shards": SHARDS})
    deployments = find(objects, "Deployment")
    assert sorted(d["metadata"]["name"] for d in deployments) == [f"{FULLNAME}-{s}" for s in SHARDS]
    by_shard = {arg(d, "--shard"): d for d in deployments}
    assert sorted(by_shard) == SHARDS
    leases = {s: lease_of(d) for s, d in by_shard.items()}
    assert leases == {s: f"{FULLNAME}-{s}" for s in SHARDS}
    assert len(set(leases.values())) == len(SHARDS)
    # Every shard knows the whole installation; the first is the default.
    for shard, d in by_shard.items():
        assert arg(d, "--shards") == ",".join(SHARDS)
        assert ("--shard-default" in args_of(d)) == (shard == "alpha"), shard
        assert "--leader-election" in args_of(d)
        # Distinct selectors: no Deployment adopts another's pods.
        labels = d["spec"]["selector"]["matchLabels"]
        assert labels["cohorts.dev/operator-shard"] == shard
        assert d["spec"]["template"]["metadata"]["labels"]["cohorts.dev/operator-shard"] == shard
        # The shared ServiceAccount, the Braze budget per pod.
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME
        assert arg(d, "--braze-requests-per-hour") == "250000"
        assert arg(d, "--braze-burst") == "250000"
    # RBAC is shared: one ServiceAccount, one Lease Role naming every shard's Lease.
    assert len(find(objects, "ServiceAccount")) == 1
    role = one(objects, "Role", f"{FULLNAME}-leader-election")
    assert sorted(role["rules"][1]["resourceNames"]) == sorted(leases.values())


def test_the_default_shard_and_the_budget_can_be_chosen() -> None:
    objects = render({"shards": SHARDS, "shardDefault": "gamma", "leaderElection": {"leaseName": "ops"},
                      "braze": {"requestsPerHour": 120000, "burst": 50}})
    defaults = [arg(d, "--shard") for d in find(objects, "Deployment") if "--shard-default" in args_of(d)]
    assert defaults == ["gamma"]
    assert sorted(lease_of(d) for d in find(objects, "Deployment")) == ["ops-alpha", "ops-beta", "ops-gamma"]
    assert {arg(d, "--braze-requests-per-hour") for d in find(objects, "Deployment")} == {"120000"}
    assert {arg(d, "--braze-burst") for d in find(objects, "Deployment")} == {"50"}


def test_sharded_install_lints_clean() -> None:
    report = lint({"shards": SHARDS})
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values, message", [
    ({"shards": ["a", "b"], "leaderElection": {"enabled": False}}, "shards need leaderElection.enabled=true"),
    ({"shards": ["a", "b"], "shardDefault": "c"}, "shardDefault \"c\" is not one of shards"),
    ({"shards": ["a", "b"], "snapshots": {"store": "filesystem"}}, "several shards needs .*ReadWriteMany"),
])
def test_inconsistent_shard_values_fail_with_the_fix(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize("values", [
    {"shards": ["a", "a"]},
    {"shards": ["Bad_Name"]},
    {"shards": ["a"], "shardDefault": "-x"},
    {"braze": {"requestsPerHour": 0}},
    {"braze": {"burst": "many"}},
])
def test_schema_refuses_bad_shard_and_budget_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        validate(values)


def test_every_shard_may_take_its_lease_and_read_the_others_on_a_real_server(control_plane: ControlPlane) -> None:
    namespace = "cohort-shards"
    objects = install_chart(control_plane, {"shards": SHARDS}, release="shards", namespace=namespace)
    user = sa_user(namespace, one(objects, "ServiceAccount")["metadata"]["name"])
    leases = [lease_of(d) for d in find(objects, "Deployment")]
    assert len(set(leases)) == len(SHARDS)
    assert control_plane.can_i(user, "create", "leases.coordination.k8s.io", namespace)
    for lease in leases:
        for verb in ("get", "patch"):
            assert control_plane.can_i(user, verb, "leases.coordination.k8s.io", namespace, lease), (verb, lease)
        for verb in ("update", "delete"):
            assert not control_plane.can_i(user, verb, "leases.coordination.k8s.io", namespace, lease), (verb, lease)
    assert not control_plane.can_i(user, "get", "leases.coordination.k8s.io", namespace, "someone-else")
    assert NAMESPACE != namespace
