# syntax=docker/dockerfile:1.7
# cohort-operator: a static (musl) binary on distroless/static, running as non-root.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/cohort-operator:TAG .
#
# Each platform builds natively (under emulation for a foreign one), so no cross toolchain
# is needed. The runtime image has no shell and no package manager; it holds the binary, CA
# certificates (for Braze, HTTP exports and TLS to the warehouse) and /etc/passwd.

# Keep equal to rust-version in Cargo.toml (tests/chart/test_image.py checks).
ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# musl-gcc for the C parts (aws-lc-sys, ring, zstd-sys); cmake and clang for aws-lc-sys's
# fallback build path.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends musl-tools cmake clang \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
# Static, with the locked dependency versions; caches survive between builds.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TERM_COLOR=never
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked -p cohort-operator --bin cohort-operator --target "$target" \
 && install -D -m 0555 "target/$target/release/cohort-operator" /out/cohort-operator \
 && /out/cohort-operator --version

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="cohort-operator" \
      org.opencontainers.image.description="Keeps analytics cohorts imported into Braze, as a Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/cohort-operator /usr/local/bin/cohort-operator
# Numeric, so Kubernetes can verify runAsNonRoot; distroless's `nonroot` user (65532).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cohort-operator"]
CMD ["run"]
