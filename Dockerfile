# syntax=docker/dockerfile:1
# Builder: what scripts/setup.sh installs, then the release binary.
FROM rust:1.95-bookworm AS builder
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip g++ cmake libopenblas-dev protobuf-compiler pkg-config unzip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# setup.sh installs libtorch into /opt/libtorch and writes .cargo/config.toml (rpath to it).
ENV TWOTOWER_LIBTORCH_DIR=/opt/libtorch PIP_BREAK_SYSTEM_PACKAGES=1
RUN scripts/setup.sh && cargo build --release -p cli && strip target/release/twotower

# Runtime: the binary, the libtorch libraries it links, OpenBLAS and OpenMP.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libopenblas0 libgomp1 python3-pip unzip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/libtorch/torch/lib /opt/libtorch/torch/lib
COPY --from=builder /src/target/release/twotower /usr/local/bin/twotower
COPY pipelines /app/pipelines
COPY deploy /app/deploy
ENV PIP_BREAK_SYSTEM_PACKAGES=1 OMP_WAIT_POLICY=PASSIVE
WORKDIR /work
EXPOSE 50051 9464
CMD ["twotower", "--help"]
