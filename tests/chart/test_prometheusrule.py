"""The chart's optional PrometheusRule: the README's alerts, checked by Prometheus's own
promtool (Debian's `prometheus` package): `promtool check rules` on the rendered rules, and
`promtool test rules` unit tests that feed each alert series and check when it fires, with
which labels and annotations."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import values_sets as vs
from chartlib import REPO, find, one, render

# The per-import gauges the controller exports (issue 14, item 2), rebuilt from status.
PER_IMPORT_GAUGES = {
    "cohort_operator_import_ready",
    "cohort_operator_import_last_run_result",
    "cohort_operator_import_last_success_timestamp_seconds",
    "cohort_operator_import_cohort_size",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: scripts/test.sh installs Debian's prometheus package")


def enabled(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"prometheusRule": {"enabled": True, **(extra or {})}}


def rule_spec(values: dict[str, Any] | None) -> dict[str, Any]:
    return one(render(values), "PrometheusRule")["spec"]


def alerts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"]}


def documented_metrics() -> set[str]:
    """The metric names README.md's Operations section lists."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("**Metrics**", 1)[1].split("**Alerts**", 1)[0]
    return set(re.findall(r"cohort_operator_[a-z_]+", section))


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_rules(tmp_path: Path, values: dict[str, Any] | None) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_spec(values), sort_keys=False))
    return path


def test_off_by_default() -> None:
    assert not find(render(), "PrometheusRule")


def test_rule_object_and_labels() -> None:
    rule = one(render(vs.FULL), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "cohort-system"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "cohort-operator"
    for name, alert in alerts(rule["spec"]).items():
        assert alert["labels"]["team"] == "growth-platform", name
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name


def test_alerts_use_only_metrics_that_exist_or_are_the_per_import_gauges() -> None:
    known = documented_metrics()
    assert "cohort_operator_leader" in known  # the README section was found
    used = set()
    for alert in alerts(rule_spec(enabled())).values():
        used |= set(re.findall(r"cohort_operator_[a-z_]+", alert["expr"]))
    assert used <= known | PER_IMPORT_GAUGES, used - known - PER_IMPORT_GAUGES
    assert PER_IMPORT_GAUGES <= used


def test_thresholds_come_from_values() -> None:
    rules = alerts(rule_spec(enabled({
        "notReadyReasons": ["InvalidSpec"],
        "thresholds": {"staleSeconds": 3600, "cohortShrinkPercent": 20, "failingFor": "30m",
                       "brazeRejectionsWindow": "15m"},
    })))
    assert "> 3600)" in rules["CohortImportStale"]["expr"]
    assert "< 80 / 100 *" in rules["CohortImportCohortShrank"]["expr"]
    assert "80%" in rules["CohortImportCohortShrank"]["annotations"]["description"]
    assert rules["CohortImportFailing"]["for"] == "30m"
    assert 'reason=~"InvalidSpec"' in rules["CohortImportNotReady"]["expr"]
    assert "[15m]" in rules["BrazeRejectingRequests"]["expr"]


@needs_promtool
@pytest.mark.parametrize("values", [enabled(), vs.FULL], ids=["defaults", "full"])
def test_promtool_check_rules(tmp_path: Path, values: dict[str, Any]) -> None:
    path = write_rules(tmp_path, values)
    done = promtool("check", "rules", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout, done.stdout


# ---- promtool test rules ----

def fill(template: str, labels: dict[str, str], value: str = "") -> str:
    """The alert's annotation as Prometheus renders it for these labels and value."""
    text = re.sub(r"\{\{ \$labels\.([a-z]+) \}\}", lambda m: labels[m.group(1)], template)
    return re.sub(r"\{\{ \$value( \| humanizeDuration)? \}\}", value, text)


def expect(rule: dict[str, Any], labels: dict[str, str], value: str = "") -> dict[str, Any]:
    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {k: fill(v, labels, value) for k, v in rule["annotations"].items()},
    }


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def run_unit_tests(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    write_rules(tmp_path, enabled())
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    done = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


RULES = alerts(rule_spec(enabled()))
CHURN = {"namespace": "growth", "name": "churn"}
VIP = {"namespace": "growth", "name": "vip"}
POD = {"instance": "10.0.0.7:8080", "job": "cohort-operator"}


@needs_promtool
def test_failed_missed_and_blocked_runs_alert_per_import(tmp_path: Path) -> None:
    result = "cohort_operator_import_last_run_result"
    failing, blocked = RULES["CohortImportFailing"], RULES["CohortImportBlocked"]
    run_unit_tests(tmp_path, [{
        "interval": "1m",
        "input_series": [
            series(result, {**CHURN, "result": "Failed", **POD}, "1x20"),
            series(result, {**VIP, "result": "Succeeded", **POD}, "1x20"),
            series(result, {"namespace": "crm", "name": "lapsed", "result": "Missed", **POD}, "1x20"),
            series(result, {"namespace": "crm", "name": "vip", "result": "Blocked", **POD}, "1x20"),
            # A run that failed and was followed by a success: the Failed series went to 0.
            series(result, {"namespace": "crm", "name": "healed", "result": "Failed", **POD}, "1 1 0x18"),
            # A run that failed and waits for its retry (spec.retry): the operator handles it.
            series(result, {"namespace": "crm", "name": "retrying", "result": "Failed", **POD}, "1x20"),
            series("cohort_operator_import_ready",
                   {"namespace": "crm", "name": "retrying", "reason": "RetryScheduled", **POD}, "1x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "CohortImportFailing", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "CohortImportFailing", "exp_alerts": [
                expect(failing, {**CHURN, "result": "Failed"}),
                expect(failing, {"namespace": "crm", "name": "lapsed", "result": "Missed"}),
            ]},
            {"eval_time": "6m", "alertname": "CohortImportBlocked", "exp_alerts": [
                expect(blocked, {"namespace": "crm", "name": "vip"}),
            ]},
        ],
    }])


@needs_promtool
def test_stale_only_when_the_last_run_did_not_succeed_either(tmp_path: Path) -> None:
    stale = RULES["CohortImportStale"]
    last_success = "cohort_operator_import_last_success_timestamp_seconds"
    result = "cohort_operator_import_last_run_result"
    run_unit_tests(tmp_path, [{
        # Samples every minute for 51 hours; both imports last succeeded at Unix time 0.
        "interval": "1m",
        "input_series": [
            series(last_success, {**CHURN, **POD}, "0x3060"),
            series(result, {**CHURN, "result": "Failed", **POD}, "1x3060"),
            # A `Once` import that succeeded long ago and has nothing more to do.
            series(last_success, {**VIP, **POD}, "0x3060"),
            series(result, {**VIP, "result": "Succeeded", **POD}, "1x3060"),
        ],
        "alert_rule_test": [
            {"eval_time": "47h", "alertname": "CohortImportStale", "exp_alerts": []},
            {"eval_time": "50h", "alertname": "CohortImportStale", "exp_alerts": [
                expect(stale, CHURN, "2d 2h 0m 0s"),
            ]},
        ],
    }])


@needs_promtool
def test_not_ready_for_the_reasons_that_need_a_person(tmp_path: Path) -> None:
    ready = "cohort_operator_import_ready"
    rule = RULES["CohortImportNotReady"]
    run_unit_tests(tmp_path, [{
        "interval": "1m",
        "input_series": [
            series(ready, {**CHURN, "reason": "SecretNotFound", **POD}, "1x30"),
            series(ready, {**VIP, "reason": "Scheduled", **POD}, "1x30"),
            series(ready, {"namespace": "crm", "name": "paused", "reason": "Suspended", **POD}, "1x30"),
        ],
        "alert_rule_test": [
            {"eval_time": "14m", "alertname": "CohortImportNotReady", "exp_alerts": []},
            {"eval_time": "16m", "alertname": "CohortImportNotReady", "exp_alerts": [
                expect(rule, {**CHURN, "reason": "SecretNotFound"}),
            ]},
        ],
    }])


@needs_promtool
def test_a_cohort_that_lost_half_its_members_alerts(tmp_path: Path) -> None:
    size = "cohort_operator_import_cohort_size"
    rule = RULES["CohortImportCohortShrank"]
    run_unit_tests(tmp_path, [{
        "interval": "1m",
        "input_series": [
            series(size, {**CHURN, **POD}, "100x10 40x20"),
            series(size, {**VIP, **POD}, "100x10 60x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "CohortImportCohortShrank", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "CohortImportCohortShrank", "exp_alerts": [
                expect(rule, CHURN, "40"),
            ]},
        ],
    }])


@needs_promtool
def test_operator_alerts(tmp_path: Path) -> None:
    no_leader = RULES["CohortOperatorNoLeader"]
    braze = RULES["BrazeRejectingRequests"]
    notify = RULES["CohortOperatorNotificationsFailing"]
    run_unit_tests(tmp_path, [
        {
            "interval": "1m",
            "input_series": [
                series("cohort_operator_leader", POD, "1x5 0x20"),
                series("cohort_operator_braze_requests_total", {"status": "401", **POD}, "0x5 1+1x20"),
                series("cohort_operator_braze_requests_total", {"status": "201", **POD}, "0+10x25"),
                series("cohort_operator_notification_failures_total", POD, "0x10 1x15"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "CohortOperatorNoLeader", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "CohortOperatorNoLeader", "exp_alerts": [
                    expect(no_leader, {}),
                ]},
                {"eval_time": "5m", "alertname": "BrazeRejectingRequests", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "BrazeRejectingRequests", "exp_alerts": [
                    expect(braze, {"status": "401"}),
                ]},
                {"eval_time": "9m", "alertname": "CohortOperatorNotificationsFailing", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "CohortOperatorNotificationsFailing", "exp_alerts": [
                    expect(notify, {}),
                ]},
            ],
        },
        {
            # No replica scraped at all: the leader series is absent.
            "interval": "1m",
            "input_series": [series("cohort_operator_runs_total", {"result": "Succeeded", **POD}, "1x20")],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "CohortOperatorNoLeader", "exp_alerts": [
                    expect(no_leader, {}),
                ]},
            ],
        },
    ])
