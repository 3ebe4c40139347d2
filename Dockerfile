# syntax=docker/dockerfile:1
# twotower:local built entirely in Docker, for machines that can pull from a registry
# (TWOTOWER_BUILD_CONTEXT=. docker-compose build). Without a registry, scripts/stack.sh builds
# the same image from deploy/runtime.Dockerfile and a binary built on the host.

# Builder: what scripts/setup.sh installs, then the release binary.
FROM rust:1.95-bookworm AS builder
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip g++ cmake libopenblas-dev protobuf-compiler pkg-config unzip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# setup.sh installs libtorch into /opt/libtorch and writes .cargo/config.toml (rpath to it).
ENV TWOTOWER_LIBTORCH_DIR=/opt/libtorch PIP_BREAK_SYSTEM_PACKAGES=1
RUN scripts/setup.sh && cargo build --release -p cli && strip target/release/twotower

# Runtime: the stack's base packages (deploy/base-packages.txt), the binary and libtorch.
FROM debian:bookworm-slim
COPY deploy/base-packages.txt /tmp/base-packages.txt
RUN apt-get update \
    && grep -v '^#' /tmp/base-packages.txt | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/base-packages.txt
COPY --from=builder /opt/libtorch/torch/lib /opt/libtorch/lib
COPY --from=builder /src/target/release/twotower /usr/local/bin/twotower
COPY pipelines /app/pipelines
COPY deploy /app/deploy
ENV LD_LIBRARY_PATH=/opt/libtorch/lib PIP_BREAK_SYSTEM_PACKAGES=1 OMP_WAIT_POLICY=PASSIVE
WORKDIR /work
EXPOSE 50051 9464
CMD ["twotower", "--help"]
