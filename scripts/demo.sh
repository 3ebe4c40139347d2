#!/usr/bin/env bash
# The main job end to end on the built-in default data (ml-100k). Called by `make demo` after
# set-up and a release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-target/release/twotower}
work=${TWOTOWER_WORKDIR:-work/ml-100k}

stage() { printf '\n== %s\n' "$*"; }
timed() { local t0=$SECONDS; "$@"; echo "   ($(( SECONDS - t0 )) s)"; }

stage "prepare ml-100k into $work/data"
timed "$bin" prepare --dataset ml-100k --out "$work/data"

echo
echo "demo: stopping after prepare: train, index, serve and recommend are not built yet."
