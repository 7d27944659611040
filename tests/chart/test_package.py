"""The chart as released: `helm lint --strict` and `helm package` (Helm v4's own library),
its version and appVersion those of the operator, and the packaged archive rendering the
same objects as the chart directory."""

from __future__ import annotations

import tarfile
import tomllib
from pathlib import Path

import helm_python as helm
import yaml

import values_sets as vs
from chartlib import CHART_DIR, REPO, render

CHART = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
OPERATOR_VERSION = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def test_chart_version_and_app_version_are_the_release() -> None:
    assert CHART["appVersion"] == OPERATOR_VERSION, "bump appVersion with Cargo.toml's version"
    assert CHART["version"] == OPERATOR_VERSION, "the chart is released with the operator: same version"


def test_lint_strict_has_no_findings() -> None:
    report = helm.lint(CHART_DIR, None, strict=True, namespace="cohort-system")
    assert not report["errors"], report
    # Helm's severities: 1 info (e.g. "icon is recommended"), 2 warning, 4 error.
    assert [m for m in report["messages"] if m["severity"] > 1] == [], report["messages"]


def test_package_holds_the_chart_and_renders_the_same(tmp_path: Path) -> None:
    archive = Path(helm.package(CHART_DIR, destination=tmp_path))
    assert archive.name == f"cohort-operator-{CHART['version']}.tgz"
    assert helm.digest(archive).startswith("sha256:")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for needed in ("Chart.yaml", "values.yaml", "values.schema.json", "README.md",
                   "crds/cohortimports.cohorts.dev.yaml", "templates/deployment.yaml"):
        assert f"cohort-operator/{needed}" in names, needed
    for values in (vs.DEFAULT, vs.FULL):
        assert render(values, chart=archive) == render(values)
