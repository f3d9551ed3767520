# mcd-serve container image.
#
#   docker build -t mcd-serve .
#   docker run --rm -p 8080:8080 -p 8081:8081 mcd-serve
#
# Stage 1 compiles a release binary with the pinned Rust toolchain (and the onnxruntime
# backend, whose library it takes from the hash-pinned wheel); stage 2 is a slim Debian
# runtime: no compiler, nothing installed, not root.

# ---------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS builder
WORKDIR /build
# Cargo.toml keeps line tables in release builds for profiling; the image does not need
# them (they are 3/4 of the binary's 160 MB). Without debug info cargo strips it, keeping
# the symbols, so panics still name their functions.
ENV CARGO_PROFILE_RELEASE_DEBUG=false

# 0. libonnxruntime.so for `--backend onnxruntime`, from the hash-pinned onnxruntime wheel
#    on PyPI (Debian has no package; the `ort` crate loads the library at run time, so
#    nothing is downloaded by the cargo build). Its own layer: cached until the pin changes.
#    `pip download` only fetches and checks the wheel; nothing is installed.
COPY .ci/onnxruntime-requirements.txt /tmp/onnxruntime-requirements.txt
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && pip3 download --no-cache-dir --no-deps --require-hashes --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
      -r /tmp/onnxruntime-requirements.txt -d /tmp/wheel \
 && python3 -m zipfile -e /tmp/wheel/onnxruntime-1.31.1-*.whl /tmp/ort \
 && install -D -m 0644 /tmp/ort/onnxruntime/capi/libonnxruntime.so.1.31.1 \
      /out/lib/libonnxruntime.so.1.31.1 \
 && rm -rf /tmp/wheel /tmp/ort

# 1. Dependency layer: only the manifests, with stub sources, so that the
#    (slow) compilation of all crates.io dependencies is cached until
#    Cargo.toml / Cargo.lock change. The build script and the .proto it compiles
#    (OIP gRPC, with protox: no protoc needed) come in here too.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > benches/engine.rs \
 && cargo build --release --locked --features onnxruntime --bin mcd-serve \
 && rm -rf src benches

# 2. The real sources. Remove the stub build of our own crate so cargo cannot
#    mistake it for up to date (COPY keeps the sources' old mtimes).
COPY src ./src
COPY benches ./benches
RUN rm -rf target/release/.fingerprint/mcd-serve-* \
           target/release/deps/mcd_serve-* \
           target/release/deps/libmcd_serve-* \
           target/release/mcd-serve \
 && cargo build --release --locked --features onnxruntime --bin mcd-serve \
 && install -D -m 0755 target/release/mcd-serve /out/mcd-serve

# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="mcd-serve" \
      org.opencontainers.image.description="ONNX model server with Monte-Carlo-dropout uncertainty" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 mcd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin mcd

COPY --from=builder /out/mcd-serve /usr/local/bin/mcd-serve
# The onnxruntime backend's library (tract stays the default: `--backend onnxruntime` or
# MCD_BACKEND=onnxruntime picks it). It needs only libstdc++ and libgcc, which the base has.
COPY --from=builder /out/lib/ /usr/local/lib/onnxruntime/
COPY --chown=root:root models /app/models

ENV MCD_MODELS=/app/models \
    MCD_ORT_LIB=/usr/local/lib/onnxruntime/libonnxruntime.so.1.31.1 \
    MCD_ADDR=0.0.0.0:8080 \
    MCD_LOG_FORMAT=json

WORKDIR /app
USER 10001:10001
EXPOSE 8080 8081

# The binary probes itself; no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/mcd-serve", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mcd-serve"]
