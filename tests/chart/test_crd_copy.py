"""The chart ships the CRD as a copy of crds/; the copy must not drift."""

from __future__ import annotations

import yaml

from chartlib import CHART_DIR, REPO, crds

NAMES = [
    "brazedestinations.cohorts.dev.yaml",
    "clusterbrazedestinations.cohorts.dev.yaml",
    "cohortimports.cohorts.dev.yaml",
    "cohorttriggers.cohorts.dev.yaml",
]
SOURCES = [REPO / "crds" / name for name in NAMES]


def test_chart_crds_are_byte_for_byte_copies_of_crds_dir() -> None:
    for source in SOURCES:
        copy = CHART_DIR / "crds" / source.name
        assert copy.read_bytes() == source.read_bytes(), (
            "charts/cohort-operator/crds/ drifted from crds/; refresh it with:\n"
            "  cp crds/*.yaml charts/cohort-operator/crds/"
        )


def test_helm_loads_exactly_those_crds() -> None:
    assert sorted(crds(), key=lambda c: c["metadata"]["name"]) == [yaml.safe_load(s.read_text()) for s in SOURCES]
    assert sorted(p.name for p in (CHART_DIR / "crds").iterdir()) == NAMES
    assert sorted(p.name for p in (REPO / "crds").iterdir()) == NAMES
