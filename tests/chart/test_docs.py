"""Docs that cannot drift: the README's flag table is `cohort-operator run --help` (every
flag, its environment variable and its default) and names, for each flag, the chart value
that sets it — a value that exists and reaches the Deployment — or why the chart does not
expose it; and the README's alert snippet is the PrometheusRule the chart ships.

The binary comes from "$CARGO_TARGET_DIR/debug" (scripts/test-chart.sh builds it).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from chartlib import CHART_DIR, REPO, one, render
from test_operator_as_serviceaccount import binary

README = (REPO / "README.md").read_text()
DEPLOYMENT_TEMPLATE = (CHART_DIR / "templates" / "deployment.yaml").read_text()
VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
NOT_EXPOSED = "not exposed:"
SET_BY_CHART = "set by the chart:"


@dataclass(frozen=True)
class Flag:
    env: str
    default: str | None


def help_flags() -> dict[str, Flag]:
    """`--flag` → its environment variable and default, from `cohort-operator run --help`."""
    done = subprocess.run([str(binary("cohort-operator")), "run", "--help"], capture_output=True,
                          text=True, timeout=30, check=True)
    flags: dict[str, Flag] = {}
    # Each option starts a line with `--name` (after an optional `-x, `); its description
    # runs until the next option, and ends with clap's `[env: NAME=]` and `[default: V]`.
    for block in re.split(r"\n(?=\s*(?:-\w, )?--[a-z])", done.stdout):
        name = re.match(r"\s*(?:-\w, )?(--[a-z0-9-]+)", block)
        if not name or name[1] == "--help":
            continue
        env = re.search(r"\[env: ([A-Z_0-9]+)[=\]]", block)
        default = re.search(r"\[default: ([^\]]+)\]", block)
        assert env, f"{name[1]} has no environment variable:\n{block}"
        flags[name[1]] = Flag(env[1], default[1] if default else None)
    return flags


@dataclass(frozen=True)
class Row:
    flag: str
    env: str
    default: str
    chart: str


def table_rows() -> dict[str, Row]:
    table = README.split("<!-- flags:begin -->", 1)[1].split("<!-- flags:end -->", 1)[0]
    rows: dict[str, Row] = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, line
        flag, env = cells[0].strip("`"), cells[1].strip("`")
        assert flag not in rows, f"{flag} twice in the README's flag table"
        rows[flag] = Row(flag, env, cells[2], cells[3])
    return rows


HELP = help_flags()
ROWS = table_rows()


def test_every_run_flag_is_in_the_readme_table_and_nothing_else() -> None:
    assert sorted(HELP) == sorted(ROWS), (
        f"missing from the README: {sorted(set(HELP) - set(ROWS))}; "
        f"not flags of `run`: {sorted(set(ROWS) - set(HELP))}")


@pytest.mark.parametrize("flag", sorted(HELP))
def test_the_table_has_the_flags_environment_variable_and_default(flag: str) -> None:
    row, actual = ROWS[flag], HELP[flag]
    assert row.env == actual.env, f"{flag}: README says {row.env}, --help says {actual.env}"
    if actual.default is not None:
        assert f"`{actual.default}`" in row.default, f"{flag}: default {actual.default!r}, README: {row.default!r}"


def value_at(path: str) -> Any:
    node: Any = VALUES
    for key in path.split("."):
        assert isinstance(node, dict) and key in node, f"values.yaml has no {path}"
        node = node[key]
    return node


def in_template(flag: Flag, name: str) -> bool:
    """The flag or its variable, whole (not `--smtp-password` inside `--smtp-password-file`)."""
    return any(re.search(re.escape(word) + r"(?![-\w])", DEPLOYMENT_TEMPLATE) for word in (name, flag.env))


@pytest.mark.parametrize("flag", sorted(HELP))
def test_each_flag_has_a_chart_value_or_a_reason(flag: str) -> None:
    row = ROWS[flag]
    if row.chart.startswith(NOT_EXPOSED):
        assert len(row.chart) > len(NOT_EXPOSED) + 10, f"{flag}: say why it is not exposed"
        assert not in_template(HELP[flag], flag), f"{flag} is in the chart's Deployment, yet the README says not exposed"
        return
    assert in_template(HELP[flag], flag), f"{flag}: the chart's Deployment never sets it ({row.chart})"
    if row.chart.startswith(SET_BY_CHART):
        return
    paths = re.findall(r"`([a-zA-Z][a-zA-Z0-9.]*)`", row.chart)
    assert paths, f"{flag}: name the chart value, or say `{NOT_EXPOSED} …` or `{SET_BY_CHART} …`"
    for path in paths:
        value_at(path)
        assert f".Values.{path}" in DEPLOYMENT_TEMPLATE or f".Values.{path.split('.')[0]}" in DEPLOYMENT_TEMPLATE, (
            f"{flag}: {path} never reaches the Deployment")


def rendered_rules() -> list[dict[str, Any]]:
    rule = one(render({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    rules = []
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            rules.append({"alert": r["alert"], "expr": r["expr"].strip(), **({"for": r["for"]} if "for" in r else {}),
                          "severity": r["labels"]["severity"]})
    return rules


def readme_rules() -> list[dict[str, Any]]:
    snippet = README.split("<!-- alerts:begin -->", 1)[1].split("<!-- alerts:end -->", 1)[0]
    body = snippet.split("```yaml\n", 1)[1].split("```", 1)[0]
    rules = []
    for r in yaml.safe_load(body):
        rules.append({"alert": r["alert"], "expr": r["expr"].strip(), **({"for": r["for"]} if "for" in r else {}),
                      "severity": r["labels"]["severity"]})
    return rules


def test_the_readme_alerts_are_the_shipped_prometheusrule() -> None:
    """The README's snippet (default thresholds) is the chart's PrometheusRule, rule for rule:
    name, expression, `for` and severity."""
    assert readme_rules() == rendered_rules(), "README alert snippet differs from the chart's PrometheusRule:\n" + \
        yaml.safe_dump([{"alert": r["alert"], "expr": r["expr"], **({"for": r["for"]} if "for" in r else {}),
                         "labels": {"severity": r["severity"]}} for r in rendered_rules()], sort_keys=False, width=200)


EXAMPLES = re.findall(r"<!-- example: (\S+) -->\n```yaml\n(.*?)```", README, re.S)


def without_namespace(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "metadata": {k: v for k, v in doc["metadata"].items() if k != "namespace"}}


@pytest.mark.parametrize(("path", "snippet"), EXAMPLES, ids=[p for p, _ in EXAMPLES])
def test_readme_examples_are_the_files_the_demo_applies(path: str, snippet: str) -> None:
    """Each manifest the README shows for copying is, document for document (the namespace
    apart), a file of examples/, which scripts/demo.sh applies and runs."""
    assert path.startswith("examples/") and (REPO / path).is_file(), path
    files = [without_namespace(d) for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    for doc in yaml.safe_load_all(snippet):
        assert without_namespace(doc) in files, f"the README's {doc['kind']} differs from {path}"


def test_the_readme_has_example_markers() -> None:
    assert len(EXAMPLES) >= 2


def test_the_readme_install_command_renders() -> None:
    """`helm install …` as the README shows it (the digest placeholder filled in): the schema
    accepts its values and the chart renders with them, pulling the image by digest."""
    import helm_python as helm  # noqa: PLC0415

    from chartlib import _merge, validate  # noqa: PLC0415

    command = re.search(r"helm install cohort-operator charts/cohort-operator .*?\n```", README, re.S)
    assert command, "the README's helm install command"
    values: dict[str, Any] = {}
    for expression in re.findall(r"--set '?([^' \\\n]+)'?", command[0]):
        expression = expression.replace("sha256:...", "sha256:" + "0" * 64)
        values = _merge(values, helm.parse_set_string(expression))
    assert values["partnerKeys"]["secretName"] == "braze-partner-keys"
    validate(values)
    deployment = one(render(values), "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{values['image']['repository']}@sha256:{'0' * 64}", image
