#!/usr/bin/env bash
# The local compose stack (docker-compose.yml) on a machine with Docker and no registry.
#
#   scripts/stack.sh up      # set up, build, make the images, fetch the demo data, start it all
#                            # and wait until the balancer answers (prints how long it took)
#   scripts/stack.sh down    # stop it and remove its volumes
#   scripts/stack.sh images  # only build the images (twotower-base:bookworm, twotower:local)
#   scripts/stack.sh docker  # only make sure the Docker daemon answers (starting dockerd)
#   scripts/stack.sh compose ARGS...   # docker compose ARGS, with the stack's project and env
#
# Starts dockerd when the daemon does not answer. The project name is fixed (COMPOSE_PROJECT_NAME,
# default twotower), so volumes and networks have predictable names.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-twotower}
say() { echo "stack.sh: $*" >&2; }
die() { say "$*"; exit 1; }

ensure_docker() {
  command -v docker >/dev/null || die "docker is not installed"
  if docker info >/dev/null 2>&1; then return; fi
  command -v dockerd >/dev/null || die "the Docker daemon does not answer and dockerd is not installed"
  say "the Docker daemon does not answer: starting dockerd"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  die "dockerd did not answer within 60 s (see /var/log/dockerd.log)"
}

compose() {
  # compose reads the build context even to stop; before one is staged, point it at the
  # repository's own.
  [ -d "$repo_root/deploy/context" ] || export TWOTOWER_BUILD_CONTEXT=${TWOTOWER_BUILD_CONTEXT:-.}
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  elif command -v docker-compose >/dev/null; then
    docker-compose "$@"
  else
    die "neither 'docker compose' nor 'docker-compose' is installed"
  fi
}

# The release binary the image carries: TWOTOWER_STACK_BINARY when set (nothing is built), else
# cargo's release build.
binary() {
  echo "${TWOTOWER_STACK_BINARY:-${CARGO_TARGET_DIR:-$repo_root/target}/release/twotower}"
}

# Stages the build context of twotower:local: the stripped binary, the libtorch libraries it
# loads (found with ldd, so CUDA's stay out), the pipelines and deploy/.
stage_context() {
  local bin ctx lib
  bin=$(binary)
  ctx="$repo_root/deploy/context"
  rm -rf "$ctx.tmp" && mkdir -p "$ctx.tmp/lib" "$ctx.tmp/deploy"
  strip -o "$ctx.tmp/twotower" "$bin"
  lib=$(sed -n 's/^TWOTOWER_LIBTORCH_LIB = "\(.*\)"$/\1/p' "$repo_root/.cargo/config.toml")
  [ -d "$lib" ] || die "libtorch libraries not found (run scripts/setup.sh)"
  ldd "$bin" | awk -v dir="$lib/" 'index($3, dir) == 1 { print $3 }' | while read -r so; do
    cp -L "$so" "$ctx.tmp/lib/"
  done
  [ -n "$(ls "$ctx.tmp/lib")" ] || die "ldd found no libtorch library in $bin"
  cp -r pipelines "$ctx.tmp/pipelines"
  cp deploy/*.cfg deploy/*.yml deploy/*.txt "$ctx.tmp/deploy/"
  cp deploy/runtime.Dockerfile "$ctx.tmp/Dockerfile"
  rm -rf "$ctx" && mv "$ctx.tmp" "$ctx"
}

images() {
  ensure_docker
  if [ -z "${TWOTOWER_STACK_BINARY:-}" ]; then
    scripts/setup.sh
    cargo build --release -p cli
  fi
  [ -x "$(binary)" ] || die "no release binary at $(binary)"
  scripts/docker-base.sh
  stage_context
  local start=$SECONDS
  docker build -q -t twotower:local "$repo_root/deploy/context" >/dev/null
  say "built twotower:local in $(( SECONDS - start )) s"
}

# Fetches the stack pipeline's dataset on the host (a container may have no way out) into the
# cache the pipeline container mounts.
fetch_data() {
  export TWOTOWER_DATA_CACHE=${TWOTOWER_DATA_CACHE:-$HOME/.cache/twotower/data}
  mkdir -p "$TWOTOWER_DATA_CACHE"
  local dataset tmp
  dataset=$(sed -n 's/^dataset = "\(.*\)"$/\1/p' pipelines/compose.toml | head -1)
  tmp=$(mktemp -d)
  "$(binary)" prepare --dataset "$dataset" --out "$tmp/data" >/dev/null
  rm -rf "$tmp"
}

wait_ready() {
  local start=$1
  for _ in $(seq 1200); do
    if curl -fsS http://127.0.0.1:8404/healthz >/dev/null 2>&1 \
      && "$(binary)" health --addr http://127.0.0.1:50051 >/dev/null 2>&1; then
      say "the stack is serving through the balancer on :50051, $(( SECONDS - start )) s after 'up'"
      return
    fi
    if [ -n "$(compose ps -q pipeline 2>/dev/null)" ]; then
      local code
      code=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(compose ps -q pipeline)" 2>/dev/null || true)
      case "$code" in
        "exited 0"|running*|created*|"") ;;
        *) compose logs --tail 40 pipeline >&2; die "the pipeline failed ($code)" ;;
      esac
    fi
    sleep 1
  done
  compose ps >&2
  die "the stack did not come up within 20 minutes"
}

case "${1:-}" in
  up)
    start=$SECONDS
    images
    fetch_data
    compose up -d
    wait_ready "$start"
    ;;
  down)
    ensure_docker
    compose down -v --remove-orphans
    ;;
  images)
    images
    ;;
  docker)
    ensure_docker
    ;;
  compose)
    shift
    ensure_docker
    export TWOTOWER_DATA_CACHE=${TWOTOWER_DATA_CACHE:-$HOME/.cache/twotower/data}
    compose "$@"
    ;;
  *)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
