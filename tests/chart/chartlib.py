"""Render charts/cohort-operator with Helm v4's own library (PyPI helm-python-sdk).

Also a command line, for tests in other languages that need the rendered objects:

    python tests/chart/chartlib.py [--namespace NS] [--release NAME] [--values FILE]...
                                   [--set k=v]... [--crds]

prints the rendered manifests (and with --crds the chart's CRDs first) as one YAML stream.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "cohort-operator"
RELEASE = "cohort"
NAMESPACE = "cohort-system"


def load(chart: Path = CHART_DIR) -> helm.Chart:
    """The chart in a directory, or in a packaged archive (`helm package`'s .tgz)."""
    if chart.is_file():
        return helm.Chart.load_archive(chart.read_bytes())
    return helm.Chart.load(chart)


def render(
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    chart: Path = CHART_DIR,
    upgrade: bool = False,
) -> list[dict[str, Any]]:
    """The chart's objects for `values`, as `helm install` (or `helm upgrade`) would create
    them (CRDs apart). `chart`: a chart directory or a packaged archive."""
    with load(chart) as loaded:
        rendered = loaded.render(values, name=release, namespace=namespace,
                                 is_install=not upgrade, is_upgrade=upgrade)
    objects: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def crds(chart: Path = CHART_DIR) -> list[dict[str, Any]]:
    """The CRDs Helm installs from the chart's crds/ directory."""
    with load(chart) as loaded:
        return [doc for crd in loaded.crds for doc in yaml.safe_load_all(crd["data"]) if doc]


def validate(values: dict[str, Any] | None) -> None:
    """Raises helm_python.HelmValuesError when values.schema.json rejects `values`."""
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.merge_values(copy.deepcopy(values)))


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None,
        namespace: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--release", default=RELEASE)
    parser.add_argument("--values", action="append", default=[], help="a values YAML file")
    parser.add_argument("--set", action="append", default=[], help="a Helm --set expression")
    parser.add_argument("--crds", action="store_true", help="also print the chart's CRDs, first")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for path in args.values:
        values = _merge(values, helm.values_from_yaml(Path(path).read_text()))
    for expression in args.set:
        values = _merge(values, helm.parse_set_string(expression))
    objects = crds() if args.crds else []
    objects += render(values, release=args.release, namespace=args.namespace)
    sys.stdout.write(to_yaml(objects))
    return 0


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
