"""Fixtures for the chart tests. Run through scripts/test-chart.sh."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import ControlPlane  # noqa: E402


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One real etcd + kube-apiserver for the session, stopped at the end.

    scripts/test-chart.sh passes COHORT_CHART_CLUSTER_DIR and also stops it on exit, so an
    interrupted run leaves nothing behind either."""
    directory = Path(os.environ.get("COHORT_CHART_CLUSTER_DIR") or tmp_path_factory.mktemp("cluster"))
    plane = ControlPlane.start(directory)
    try:
        yield plane
    finally:
        plane.stop()
