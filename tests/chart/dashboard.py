"""The chart's Grafana dashboard and what its queries read: the rendered dashboard JSON, each
PromQL query (panel targets and the template variable's `label_values`), and in each the
metric names, label names (matchers, `by (...)`, legend `{{label}}`) it relies on; and a
Prometheus text exposition reduced to the series names and label names it holds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from chartlib import find, render

METRIC = re.compile(r"\b(cohort_operator_[a-z0-9_]+)\b(\s*\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\(\s*(cohort_operator_[a-z0-9_]+)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$")
# Grafana's variables, replaced by what Grafana would put there, so promtool can parse.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$namespace": ".*"}


@dataclass(frozen=True)
class Query:
    panel: str
    expr: str
    legend: str = ""

    def promql(self) -> str:
        expr = self.expr
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        return expr

    def metrics(self) -> dict[str, set[str]]:
        """Each metric the query selects, with the label names its matchers use."""
        found: dict[str, set[str]] = {}
        for match in METRIC.finditer(self.expr):
            found.setdefault(match.group(1), set()).update(MATCHER.findall(match.group(3) or ""))
        return found

    def grouping_labels(self) -> set[str]:
        return {label.strip() for group in GROUPING.findall(self.expr) for label in group.split(",") if label.strip()}

    def legend_labels(self) -> set[str]:
        return set(LEGEND.findall(self.legend))


def rendered_dashboard(values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dashboard ConfigMap the chart renders with the dashboard on, and its JSON."""
    merged = {"grafanaDashboard": {"enabled": True}, **(values or {})}
    (config_map,) = [cm for cm in find(render(merged), "ConfigMap") if cm["metadata"]["name"].endswith("-dashboard")]
    return config_map, json.loads(config_map["data"]["cohort-operator.json"])


def queries(dashboard: dict[str, Any]) -> list[Query]:
    found = [Query(panel["title"], target["expr"], target.get("legendFormat", ""))
             for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = LABEL_VALUES.match(text)
        assert match, f"variable {variable['name']}: only label_values(metric, label) is used: {text}"
        found.append(Query(f"variable {variable['name']}", f"{match.group(1)}{{{match.group(2)}=~\".+\"}}"))
    return found


def exposition(text: str) -> dict[str, set[str]]:
    """Series name → label names, from a Prometheus/OpenMetrics text exposition."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*?)\})?\s", line)
        assert match, line
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"", match.group(3) or ""))
        series.setdefault(match.group(1), set()).update(labels)
    return series


def unexported(dashboard: dict[str, Any], exported: dict[str, set[str]]) -> list[str]:
    """Every metric or label a query relies on that `exported` does not hold."""
    problems = []
    for query in queries(dashboard):
        metrics = query.metrics()
        if not metrics:
            problems.append(f"{query.panel}: reads no cohort_operator_ metric: {query.expr}")
        on_metrics: set[str] = set()
        for metric, labels in metrics.items():
            if metric not in exported:
                problems.append(f"{query.panel}: {metric} is not exported")
                continue
            on_metrics |= exported[metric]
            problems += [f"{query.panel}: {metric} has no label {label}" for label in labels - exported[metric]]
        for label in query.grouping_labels() - on_metrics:
            problems.append(f"{query.panel}: groups by {label}, which none of {sorted(metrics)} has")
        shown = query.grouping_labels() or on_metrics
        for label in query.legend_labels() - shown:
            problems.append(f"{query.panel}: legend shows {label}, which the query's result has not")
    return problems
