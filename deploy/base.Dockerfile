# twotower-base:bookworm from a registry's Debian image, for machines that can pull one. Where no
# registry can be reached, scripts/docker-base.sh builds the same image with debootstrap and
# `docker import` instead. Build context: deploy/.
FROM debian:bookworm-slim
COPY base-packages.txt /tmp/base-packages.txt
RUN apt-get update \
    && grep -v '^#' /tmp/base-packages.txt | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/base-packages.txt
