"""The Dockerfile cannot be built here (no container engine); these keep it consistent with
scripts/image.sh (which is built and run: scripts/test-image.sh), the chart and Cargo.toml."""

from __future__ import annotations

import re
import tomllib

import values_sets as vs
from chartlib import REPO, one, render

DOCKERFILE = (REPO / "Dockerfile").read_text()
IMAGE_SH = (REPO / "scripts" / "image.sh").read_text()
CARGO = tomllib.loads((REPO / "Cargo.toml").read_text())


def stages() -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M)


def test_multi_stage_onto_an_empty_base_with_the_scripts_root_filesystem() -> None:
    froms = stages()
    assert len(froms) >= 2
    assert froms[-1] == "scratch", froms[-1]
    assert "--locked" in DOCKERFILE
    # The same root filesystem as scripts/image.sh: one script assembles both.
    assert "scripts/image-rootfs.sh /out/cohort-operator /rootfs" in DOCKERFILE
    assert 'scripts/image-rootfs.sh "$BINARY" "$ROOTFS"' in IMAGE_SH
    assert "COPY --from=build /rootfs /" in DOCKERFILE


def test_rust_version_matches_cargo_toml() -> None:
    wanted = CARGO["workspace"]["package"]["rust-version"]
    assert re.search(rf"^ARG RUST_VERSION={re.escape(wanted)}$", DOCKERFILE, re.M), wanted


def test_version_and_license_labels_match_cargo_toml() -> None:
    assert f"ARG VERSION={CARGO['package']['version']}" in DOCKERFILE
    assert f'org.opencontainers.image.licenses="{CARGO["workspace"]["package"]["license"]}"' in DOCKERFILE
    for annotation in ("title", "description", "source", "revision", "version", "licenses"):
        assert f"org.opencontainers.image.{annotation}=" in DOCKERFILE, annotation
        assert f"org.opencontainers.image.{annotation}=" in IMAGE_SH, annotation


def test_image_user_is_the_chart_user_in_both_builds() -> None:
    [user] = re.findall(r"^USER\s+(\d+):(\d+)$", DOCKERFILE, re.M)
    assert f"--config.user {user[0]}:{user[1]}" in IMAGE_SH
    for values in vs.ALL.values():
        pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
        assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user


def test_entrypoint_is_the_binary_and_the_chart_passes_a_subcommand() -> None:
    assert 'ENTRYPOINT ["/usr/local/bin/cohort-operator"]' in DOCKERFILE
    assert 'CMD ["run"]' in DOCKERFILE
    assert "--config.entrypoint /usr/local/bin/cohort-operator" in IMAGE_SH
    assert "--config.cmd run" in IMAGE_SH
    c = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in c
    assert c["args"][0] == "run"
    port = c["ports"][0]["containerPort"]
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M)
    assert f"--config.exposedports {port}/tcp" in IMAGE_SH


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "target"} <= ignored
    # The build needs these; ignoring them would break it.
    for needed in ("src", "crates", "Cargo.toml", "Cargo.lock", "scripts", "docs", "LICENSE"):
        assert needed not in ignored
