"""The chart's Grafana dashboard, rendered: off by default, a ConfigMap with the sidecar's
label when on, valid dashboard JSON, and every query valid PromQL (Prometheus's own promtool,
Debian's `prometheus` package). That the queries read only what the operator exports is
checked against a running operator in test_operator_as_serviceaccount.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from chartlib import find, render
from dashboard import exposition, queries, rendered_dashboard, unexported

PROMTOOL = shutil.which("promtool")


def test_off_by_default() -> None:
    assert not [cm for cm in find(render(), "ConfigMap") if cm["metadata"]["name"].endswith("-dashboard")]


def test_a_configmap_the_sidecar_picks_up() -> None:
    config_map, dashboard = rendered_dashboard()
    assert config_map["metadata"]["name"] == "cohort-cohort-operator-dashboard"
    assert config_map["metadata"]["namespace"] == "cohort-system"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["uid"] == "cohort-operator-imports"
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Import health: Ready reason", "Time since last success", "Members",
                   "Members added and removed per run", "Braze requests by status", "Braze 429 (rate limited)",
                   "Braze budget waits", "Run start delay"):
        assert wanted in titles, titles
    # Every panel reads the data source the dashboard's variable chooses.
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_its_label_namespace_and_annotations_are_settable() -> None:
    config_map, _ = rendered_dashboard({"grafanaDashboard": {
        "enabled": True, "label": "dashboards", "labelValue": "cohorts", "namespace": "monitoring",
        "annotations": {"grafana_folder": "Cohorts"}}})
    assert config_map["metadata"]["labels"]["dashboards"] == "cohorts"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Cohorts"}


def test_the_checker_catches_an_unknown_metric_or_label() -> None:
    """The check the live test makes is not vacuous: a wrong name or label is reported."""
    _, dashboard = rendered_dashboard()
    exported = exposition("cohort_operator_runs_total{result=\"Succeeded\"} 1\n")
    problems = "\n".join(unexported(dashboard, exported))
    assert "cohort_operator_import_ready is not exported" in problems
    broken = {"panels": [{"title": "typo", "targets": [
        {"expr": "sum by (reslt) (cohort_operator_runs_total{result=\"Failed\"})", "legendFormat": "{{reslt}}"}]}],
        "templating": {"list": []}}
    problems = unexported(broken, exported)
    assert problems == ["typo: groups by reslt, which none of ['cohort_operator_runs_total'] has"], problems


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: scripts/test.sh installs Debian's prometheus package")
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    _, dashboard = rendered_dashboard()
    rules = [{"record": f"cohort:dashboard_query_{i}", "expr": q.promql()} for i, q in enumerate(queries(dashboard))]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
