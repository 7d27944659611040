"""The Dockerfile cannot be built here (no container engine); these keep it consistent with
the chart and Cargo.toml, which can be checked."""

from __future__ import annotations

import re
import tomllib

import values_sets as vs
from chartlib import REPO, one, render

DOCKERFILE = (REPO / "Dockerfile").read_text()


def stages() -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M)


def test_multi_stage_onto_a_static_non_root_base() -> None:
    froms = stages()
    assert len(froms) >= 2
    assert froms[-1].startswith("gcr.io/distroless/static"), froms[-1]
    assert "--target" in DOCKERFILE and "unknown-linux-musl" in DOCKERFILE
    assert "--locked" in DOCKERFILE


def test_rust_version_matches_cargo_toml() -> None:
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    wanted = cargo["workspace"]["package"]["rust-version"]
    assert re.search(rf"^ARG RUST_VERSION={re.escape(wanted)}$", DOCKERFILE, re.M), wanted


def test_image_user_is_the_chart_user() -> None:
    [user] = re.findall(r"^USER\s+(\d+):(\d+)$", DOCKERFILE, re.M)
    for values in vs.ALL.values():
        pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
        assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user


def test_entrypoint_is_the_binary_and_the_chart_passes_a_subcommand() -> None:
    assert 'ENTRYPOINT ["/usr/local/bin/cohort-operator"]' in DOCKERFILE
    c = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in c
    assert c["args"][0] == "run"
    port = c["ports"][0]["containerPort"]
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "target"} <= ignored
    # The build needs these; ignoring them would break it.
    for needed in ("src", "crates", "Cargo.toml", "Cargo.lock"):
        assert needed not in ignored
