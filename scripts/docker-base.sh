#!/usr/bin/env bash
# Builds the stack's base image, twotower-base:bookworm (Debian bookworm with the packages in
# deploy/base-packages.txt), when it is missing. Our build machines reach Debian's mirrors but no
# container registry, so the root file system is made with debootstrap on the host and turned
# into an image with `docker import`; packages are installed before the import, never in a
# container. Where a registry is reachable, deploy/base.Dockerfile builds the same image.
#
#   scripts/docker-base.sh            # build if missing
#   TWOTOWER_BASE_REBUILD=1 ...       # rebuild even if present
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
IMAGE=twotower-base:bookworm
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "docker-base.sh: $*" >&2; }
die() { say "$*"; exit 1; }

if [ "${TWOTOWER_BASE_REBUILD:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
packages=$(grep -v '^#' "$repo_root/deploy/base-packages.txt" | grep -v '^$' | paste -sd, -)

if timeout 60 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
  say "a registry is reachable: building $IMAGE from deploy/base.Dockerfile"
  docker build -q -t "$IMAGE" -f "$repo_root/deploy/base.Dockerfile" "$repo_root/deploy" >/dev/null
  exit 0
fi

say "no registry: building $IMAGE with debootstrap (about 3 minutes)"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || die "debootstrap is missing and there is no apt-get to install it"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/twotower-base.XXXXXX")
trap '$sudo rm -rf "$work"' EXIT
start=$SECONDS
$sudo debootstrap --variant=minbase --include="$packages" bookworm "$work/root" \
  "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
$sudo rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
$sudo tar -C "$work/root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
say "built $IMAGE in $(( SECONDS - start )) s"
