# syntax=docker/dockerfile:1.7
# cohort-operator: the release binary and exactly the libraries it loads, on an empty base,
# running as non-root. The same image scripts/image.sh builds without a container engine:
# both assemble the root filesystem with scripts/image-rootfs.sh (binary, its glibc
# libraries, CA certificates, /etc/passwd with `nonroot`, license texts; no shell) and set
# the same user, entrypoint, command, environment and OCI labels.
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg REVISION="$(git rev-parse HEAD)" -t REGISTRY/cohort-operator:TAG .
#
# How the two differ: scripts/image.sh takes the libraries and CA certificates from the
# machine it runs on (Debian 12 in CI) and sets the OCI annotations on the manifest too
# (source, revision from git, version from Cargo.toml); here they come from the
# rust:bookworm image (Debian 12 too) and the annotations are labels only, with the
# revision passed as a build argument (.git is not in the build context). Each platform
# builds natively (under emulation for a foreign one), so no cross toolchain is needed.
# This file is not built in CI (no container engine there); tests/chart/test_image.py keeps
# it consistent with the script and the chart.

# Keep equal to rust-version in Cargo.toml (tests/chart/test_image.py checks).
ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
ENV CARGO_TERM_COLOR=never
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cohort-operator --bin cohort-operator \
 && install -D -m 0555 target/release/cohort-operator /out/cohort-operator \
 && /out/cohort-operator --version
RUN bash scripts/image-rootfs.sh /out/cohort-operator /rootfs

FROM scratch
ARG REVISION=unknown
ARG VERSION=0.2.0
LABEL org.opencontainers.image.title="cohort-operator" \
      org.opencontainers.image.description="Keeps analytics cohorts imported into Braze, as a Kubernetes operator" \
      org.opencontainers.image.source="https://cohorts.dev" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /rootfs /
# Numeric, so Kubernetes can verify runAsNonRoot: the `nonroot` user of /etc/passwd.
USER 65532:65532
ENV TMPDIR=/tmp
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cohort-operator"]
CMD ["run"]
