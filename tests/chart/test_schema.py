"""values.schema.json: Helm refuses bad values before rendering anything."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

import values_sets as vs
from chartlib import render, validate


@pytest.mark.parametrize("name", vs.ALL)
def test_good_values_pass(name: str) -> None:
    validate(vs.ALL[name])


BAD: list[tuple[dict[str, Any], str]] = [
    ({"replicas": "two"}, "/replicas"),
    ({"replicas": 0}, "/replicas"),
    ({"reeplicas": 2}, "reeplicas"),  # typos are caught, not ignored
    ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": ["team-a", "team-a"]}, "/watchNamespaces"),
    ({"log": {"format": "xml"}}, "/log/format"),
    ({"log": {"level": ""}}, "/log/level"),
    ({"startingDeadlineSeconds": -1}, "/startingDeadlineSeconds"),
    ({"startingDeadlineSeconds": "1h"}, "/startingDeadlineSeconds"),
    ({"maxConcurrentRuns": 0}, "/maxConcurrentRuns"),
    ({"maxConcurrentRunsPerNamespace": 0}, "/maxConcurrentRunsPerNamespace"),
    ({"maxRunAttempts": 0}, "/maxRunAttempts"),
    ({"runTimeoutSeconds": "6h"}, "/runTimeoutSeconds"),
    ({"minCronIntervalMinutes": 0}, "/minCronIntervalMinutes"),
    ({"minCronIntervalMinutes": 1441}, "/minCronIntervalMinutes"),
    ({"pagerDutyEventsUrl": "http://events.pagerduty.com/v2/enqueue"}, "/pagerDutyEventsUrl"),
    ({"memoryBudgetMiB": 0}, "/memoryBudgetMiB"),
    ({"maxSourcePageBytes": 2147483648}, "/maxSourcePageBytes"),
    ({"braze": {"maxBudgetWaitSeconds": -1}}, "/braze/maxBudgetWaitSeconds"),
    # (Helm's validator reports a bad property name by the name itself.)
    ({"braze": {"endpointRegions": {"rest.iad-01.braze.com": "us"}}}, "'rest.iad-01.braze.com'"),
    ({"braze": {"endpointRegions": {"https://rest.x.braze.com": "US"}}}, "/braze/endpointRegions"),
    ({"smtp": {"caConfigMap": {"name": "Relay CA"}}}, "/smtp/caConfigMap/name"),
    ({"smtp": {"tls": "ssl"}}, "/smtp/tls"),
    ({"smtp": {"timeoutSeconds": 0}}, "/smtp/timeoutSeconds"),
    ({"smtp": {"retries": 11}}, "/smtp/retries"),
    ({"leaderElection": {"leaseDurationSeconds": "15s"}}, "/leaderElection/leaseDurationSeconds"),
    ({"leaderElection": {"renewGraceSeconds": 0}}, "/leaderElection/renewGraceSeconds"),
    ({"egress": {"notificationDenyCidrs": ["10.0.0.0"]}}, "/egress/notificationDenyCidrs/0"),
    ({"watchLabelSelector": ["team=growth"]}, "/watchLabelSelector"),
    ({"smtp": {"port": 70000}}, "/smtp/port"),
    ({"smtp": {"password": "hunter2"}}, "password"),  # no plain-text password value exists
    ({"partnerKeys": {"secretName": "Partner Keys"}}, "/partnerKeys/secretName"),
    ({"snapshots": {"store": "s3"}}, "/snapshots/store"),
    ({"snapshots": {"filesystem": {"accessModes": ["ReadWriteSometimes"]}}},
     "/snapshots/filesystem/accessModes/0"),
    ({"tmp": {"sizeLimit": "lots"}}, "/tmp/sizeLimit"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"metrics": {"port": 0}}, "/metrics/port"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"prometheusRule": {"thresholds": {"failingFor": "soon"}}}, "/prometheusRule/thresholds/failingFor"),
    ({"prometheusRule": {"thresholds": {"cohortShrinkPercent": 0}}},
     "/prometheusRule/thresholds/cohortShrinkPercent"),
    ({"prometheusRule": {"thresholds": {"staleSeconds": "2d"}}}, "/prometheusRule/thresholds/staleSeconds"),
    ({"prometheusRule": {"notReadyReasons": ["secret not found"]}}, "/prometheusRule/notReadyReasons/0"),
    ({"prometheusRule": {"thresholds": {"staleAfter": "2d"}}}, "staleAfter"),
    ({"resources": {"limits": {"memory": "a lot"}}}, "/resources/limits/memory"),
    ({"podDisruptionBudget": {"maxUnavailable": 0}}, "/podDisruptionBudget/maxUnavailable"),
    # The hardening the chart promises cannot be switched off through values.
    ({"securityContext": {"readOnlyRootFilesystem": False}}, "/securityContext/readOnlyRootFilesystem"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
    ({"securityContext": {"privileged": True}}, "/securityContext/privileged"),
    ({"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "/securityContext/capabilities/drop"),
    ({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, "/securityContext/capabilities/add"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
     "/podSecurityContext/seccompProfile/type"),
    ({"extraArgs": ["watch-namespaces=x"]}, "/extraArgs/0"),
    ({"egress": {"default": "maybe"}}, "/egress/default"),
    ({"egress": {"deny": ["http://169.254.169.254/"]}}, "/egress/deny/0"),
    ({"egress": {"allow": "10.0.0.0/8"}}, "/egress/allow"),
    ({"egress": {"allows": []}}, "allows"),
    ({"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1"]}}}, "/networkPolicy/apiServer/cidrs/0"),
    ({"networkPolicy": {"https": {"ipBlocks": [{"except": ["10.0.0.0/8"]}]}}}, "cidr"),
]


@pytest.mark.parametrize("values, where", BAD, ids=[w for _, w in BAD])
def test_bad_values_are_rejected_naming_the_key(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        validate(values)
    assert where in str(err.value), str(err.value)
    # helm install/template validate the same way before rendering.
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_openshift_style_uid_removal_is_allowed() -> None:
    # Platforms that assign UIDs need runAsUser unset: null deletes a default in Helm.
    objects = render({"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
                      "securityContext": {"runAsUser": None, "runAsGroup": None}})
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert "runAsUser" not in pod["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in pod["containers"][0]["securityContext"]
