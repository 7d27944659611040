"""Value sets the chart tests render: the defaults and non-default installs."""

from __future__ import annotations

from typing import Any

DEFAULT: dict[str, Any] | None = None

# Confined to two namespaces: a Role in each, nothing cluster-wide.
CONFINED: dict[str, Any] = {"watchNamespaces": ["team-a", "team-b"]}

# Everything that is off by default, on.
FULL: dict[str, Any] = {
    "image": {"repository": "registry.example.com/cohort-operator",
              "digest": "sha256:" + "ab" * 32},
    "replicas": 2,
    "leaderElection": {"enabled": True, "leaseName": "cohort-leader", "leaseDurationSeconds": 30,
                       "renewGraceSeconds": 8},
    "watchLabelSelector": "!cohorts.dev/shard",
    "watchNamespaces": ["team-a", "team-b"],
    "log": {"level": "info,cohort_operator=debug", "format": "text"},
    "startingDeadlineSeconds": 600,
    "maxConcurrentRuns": 4,
    "maxConcurrentRunsPerNamespace": 2,
    "maxRunAttempts": 5,
    "runTimeoutSeconds": 7200,
    "minCronIntervalMinutes": 10,
    "memoryBudgetMiB": 768,
    "braze": {"endpointRegions": {"https://rest.iad-99.braze.com": "us",
                                  "https://rest.fra-09.braze.eu": "eu"},
              "maxBudgetWaitSeconds": 600},
    "smtp": {
        "enabled": True,
        "host": "smtp.example.com",
        "port": 465,
        "tls": "implicit",
        "username": "cohorts",
        "from": "Cohort imports <cohorts@example.com>",
        "passwordSecret": {"name": "smtp-credentials", "key": "pass"},
        "caConfigMap": {"name": "smtp-relay-ca", "key": "relay.pem"},
        "timeoutSeconds": 30,
        "retries": 5,
    },
    "partnerKeys": {"secretName": "braze-partner-keys"},
    "clusterDestinations": {"enabled": True, "secretNamespace": "cohort-keys"},
    "snapshots": {
        "store": "filesystem",
        "filesystem": {"size": "50Gi", "storageClassName": "shared",
                       "accessModes": ["ReadWriteMany"]},
    },
    "tmp": {"sizeLimit": "8Gi"},
    "metrics": {"port": 9090,
                "serviceMonitor": {"enabled": True, "interval": "1m",
                                   "labels": {"release": "prometheus"}}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"},
                       "alertLabels": {"team": "growth-platform"},
                       "thresholds": {"staleSeconds": 86400, "failingFor": "15m"}},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "priorityClassName": "platform",
    "extraEnv": [{"name": "EXTRA", "value": "1"}],
    "egress": {"deny": ["10.96.0.0/12", "*.internal.example"], "allow": ["169.254.10.10", "10.20.0.0/16"],
               "default": "deny", "notificationDenyCidrs": ["10.0.0.0/8", "fd00::/8"]},
    "networkPolicy": {
        "enabled": True,
        "apiServer": {"cidrs": ["10.0.0.1/32"], "port": 6443},
        "sources": [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 5439, "protocol": "TCP"}]}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
}

# Leader election off: a single pod replaced with Recreate, no Lease RBAC.
NO_LEADER: dict[str, Any] = {"leaderElection": {"enabled": False}}

ALL = {"default": DEFAULT, "confined": CONFINED, "full": FULL, "no-leader": NO_LEADER}
