"""The operator's Kubernetes API client rate limit in the chart (issue 16): `kubeApi.qps` and
`kubeApi.burst` render as --kube-api-qps/--kube-api-burst on every Deployment (each shard
has its own), and the schema refuses values the operator would refuse."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from chartlib import find, render, validate


def flag(deployment: dict[str, Any], name: str) -> str | None:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return next((a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")), None)


def test_the_defaults_render_as_flags() -> None:
    (deployment,) = find(render(), "Deployment")
    assert flag(deployment, "--kube-api-qps") == "500"
    assert flag(deployment, "--kube-api-burst") == "1000"


def test_chosen_limits_reach_every_shard() -> None:
    objects = render({"shards": ["alpha", "beta"], "kubeApi": {"qps": 12.5, "burst": 40}})
    deployments = find(objects, "Deployment")
    assert len(deployments) == 2
    assert {flag(d, "--kube-api-qps") for d in deployments} == {"12.5"}
    assert {flag(d, "--kube-api-burst") for d in deployments} == {"40"}


def test_no_limit_is_qps_zero() -> None:
    (deployment,) = find(render({"kubeApi": {"qps": 0}}), "Deployment")
    assert flag(deployment, "--kube-api-qps") == "0"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"kubeApi": {"qps": -1}}, "/kubeApi/qps"),
        ({"kubeApi": {"qps": "fast"}}, "/kubeApi/qps"),
        ({"kubeApi": {"burst": 0}}, "/kubeApi/burst"),
        ({"kubeApi": {"brust": 10}}, "brust"),
    ],
)
def test_bad_limits_are_refused_naming_the_value(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        validate(values)
    assert where in str(err.value), str(err.value)
    with pytest.raises(helm.HelmValuesError):
        render(values)
