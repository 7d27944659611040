"""The chart ships the CRD as a copy of crds/; the copy must not drift."""

from __future__ import annotations

import yaml

from chartlib import CHART_DIR, REPO, crds

SOURCE = REPO / "crds" / "cohortimports.cohorts.dev.yaml"
COPY = CHART_DIR / "crds" / "cohortimports.cohorts.dev.yaml"


def test_chart_crd_is_a_byte_for_byte_copy_of_crds_dir() -> None:
    assert COPY.read_bytes() == SOURCE.read_bytes(), (
        "charts/cohort-operator/crds/ drifted from crds/; refresh it with:\n"
        "  cp crds/cohortimports.cohorts.dev.yaml charts/cohort-operator/crds/"
    )


def test_helm_loads_exactly_that_crd() -> None:
    assert crds() == [yaml.safe_load(SOURCE.read_text())]
    assert sorted(p.name for p in (CHART_DIR / "crds").iterdir()) == [SOURCE.name]
